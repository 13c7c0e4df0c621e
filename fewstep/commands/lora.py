"""`fewstep lora fuse FINAL --out DIR`: bake a LoRA final/ into a full diffusers pipeline directory."""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from ..errors import FewstepError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="work with LoRA students (fuse a LoRA into a full pipeline)")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    f = actions.add_parser("fuse", help="write base + LoRA as one full pipeline directory")
    f.add_argument("model", help="the final/ directory of a LoRA run")
    f.add_argument("--out", required=True, help="a new directory for the fused pipeline (must not exist or be empty)")
    f.set_defaults(run=fuse)
    p.set_defaults(run=lambda args: (p.print_help(), 2)[1])


def _recipe_yaml(directory: Path) -> str:
    """The recipe block of a final/ model card ('' if absent)."""
    card = (directory / "README.md").read_text() if (directory / "README.md").is_file() else ""
    _, _, rest = card.partition("## Recipe\n\n```yaml\n")
    return rest.partition("\n```")[0]


def fuse(args: argparse.Namespace) -> int:
    from ..export import read_meta, write_final

    source, out = Path(args.model), Path(args.out)
    meta = read_meta(source)
    if meta["kind"] != "lora":
        raise FewstepError(f"{source} is a {meta['kind']} model, not a LoRA; valid input: the final/ of a run with a lora: section")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FewstepError(f"{out} already exists and is not empty; pass a new directory to --out")
    from ..export import load_final

    den, meta, lp = load_final(source)
    keep = {k: v for k, v in meta.items() if k not in ("kind", "base", "base_loras", "weights", "pipeline_class", "family",
                                                       "fewstep_version", "prediction_type", "scheduler")}
    keep["fused_from"] = {"base": meta["base"], "loras": lp.origin["base_loras"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_final(den, tmp, kind="pipeline", meta=keep, recipe_yaml=_recipe_yaml(source), pipeline=lp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"fewstep: fused {source} into {out} (a full {type(lp.pipe).__name__})")
    return 0
