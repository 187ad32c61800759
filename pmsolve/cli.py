"""Command line: `pmsolve <command> ...`.

Each area registers its own subcommand (see _COMMANDS); `pmsolve` with no
command runs the demo on the built-in defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import PMSolveError

# subcommand name -> module exposing add_parser(subparsers) and run(args) -> int
_COMMANDS = {
    "demo": "pmsolve.commands.demo",
    "edit": "pmsolve.commands.edit",
    "apply": "pmsolve.commands.apply",
    "stats": "pmsolve.commands.stats",
    "merge-stats": "pmsolve.commands.merge_stats",
    "eval": "pmsolve.commands.evaluate",
    "profile": "pmsolve.commands.profile",
    "experiments": "pmsolve.commands.experiments",
    "info": "pmsolve.commands.info",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmsolve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    for name, module in _COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # command not built yet in this checkout
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv:
        argv = ["demo"]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PMSolveError as exc:  # bad input or data that a command did not catch itself
        print(f"pmsolve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback; what was saved is said by the command
        print(f"pmsolve {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
