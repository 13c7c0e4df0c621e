"""The `fewstep` command. ``main(argv)`` is callable in-process (tests use it)."""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import bench, demo, distill, lora, ls, pairs, push, sample, validate
from .commands import eval as eval_cmd
from .errors import FewstepError

COMMANDS = (distill, pairs, validate, sample, eval_cmd, bench, lora, push, ls, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewstep", description="Distill diffusion and flow models into few-step generators.")
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one CLI command; return its exit code (2 for bad input, with one line on stderr)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # overrides may follow flags: `distill RECIPE --dry-run k=v`
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = list(args.overrides) + extra
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code or 0)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return 130
    finally:
        end_process_group()


def end_process_group() -> None:
    """Destroy the launch's process group (accelerate launch / torchrun) before the interpreter exits.

    Left to interpreter shutdown, gloo's process group is destructed while its worker threads may still
    be joinable, and the C++ runtime aborts that rank ("terminate called without an active exception",
    a non-zero exit after a finished run). A single process has no group: nothing to do.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
