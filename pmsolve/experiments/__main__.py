"""python -m pmsolve.experiments: same as `pmsolve experiments`."""

import sys

from ..cli import main

raise SystemExit(main(["experiments", *sys.argv[1:]]))
