"""`python -m pyvmm.cli ...` is `pyvmm ...`."""

import sys

from pyvmm.cli.main import main

sys.exit(main())
