"""`fewstep push DIR --repo-id NAME [--private]`: a run's final/ to the Hugging Face Hub (fewstep/push.py)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a run's final/ to the Hugging Face Hub, with a model card")
    p.add_argument("model", help="a run's final/ directory")
    p.add_argument("--repo-id", required=True, help="the Hub repository: NAME or OWNER/NAME (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--token", default=None, help="a Hub token (default: huggingface_hub's login)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..push import push

    url = push(args.model, args.repo_id, private=args.private, token=args.token)
    print(f"fewstep: pushed {args.model} to {args.repo_id}: {url}")
    return 0
