#!/usr/bin/env bash
# The main job: set up, then boot the bundled test guest with pvsched on 2 vCPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec ${PYTHON:-python3} -m pyvmm.cli boot "$@"
