"""`python -m pyvmm.cli ...` is `pyvmm ...`; both start here."""

import sys

from pyvmm.abi import AbiNotBuiltError
from pyvmm.common.artifacts import BuildError


def run() -> int:
    """The `pyvmm` command: a checkout whose build outputs are missing gets one line (exit 2), not a traceback."""
    try:
        from pyvmm.cli.main import main  # imports the policy's cffi view, a build output
    except (AbiNotBuiltError, BuildError) as e:
        print(f"pyvmm: {e}", file=sys.stderr)
        return 2
    return main()


if __name__ == "__main__":
    sys.exit(run())
