#!/usr/bin/env bash
# The test command: set up everything, then run the suite. Fails when no test ran.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh || { echo "test: setup failed" >&2; exit 1; }
# test helpers (the stand-in VMM) are built here, not by the setup of the product
make -s -C tests/standin >&2 || { echo "test: building tests/standin failed" >&2; exit 1; }
PY=${PYTHON:-python3}
$PY -m pytest "$@"
rc=$?
if [ $rc -eq 5 ]; then
    echo "test: pytest collected no tests: failing" >&2
    exit 1
fi
exit $rc
