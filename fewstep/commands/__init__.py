"""CLI verbs, one module each; each exposes ``add_parser(subparsers)`` and ``run(args) -> int``."""
