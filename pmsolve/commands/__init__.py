"""One module per `pmsolve` subcommand: add_parser(subparsers) registers it and sets func."""
