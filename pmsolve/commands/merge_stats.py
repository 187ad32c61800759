"""`pmsolve merge-stats`: add up statistics computed apart into one file per layer.

    pmsolve merge-stats part1/ part2/ part3/ --out stats/

Each part is what `pmsolve stats` wrote for another corpus, another slice of one, or on
another machine (the same model and layers). The merged files go where `pmsolve edit
--stats` finds them.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import PMSolveError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge-stats", help="add up statistics files computed apart (other corpora or machines)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files or folders written by `pmsolve stats`")
    p.add_argument("--out", required=True, help="folder for the merged files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..stats import merge_stats

    try:
        written = merge_stats(args.inputs, args.out)
    except PMSolveError as exc:
        print(f"pmsolve merge-stats: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({module: str(path) for module, path in written.items()}, indent=2))
    return 0
