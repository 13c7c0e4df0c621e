"""Try any shipped recipe on a CPU in about a minute, on the test suite's tiny pipeline of its family:

    python -m fewstep.testing.tryout sd15_lcm_lora [OUT] [key=value ...]

builds the tiny pipeline (random weights, the real classes), a captioned image folder of sklearn digits and random
LPIPS weights under OUT/stand-ins (default: tryout/), then runs ``fewstep distill`` on them at toy sizes (2 steps,
batch 2, float32, 32 px) into OUT/RECIPE. It shows a recipe's stages, logs, checkpoints and export end to end; the
tiny teacher knows nothing, so the samples are noise."""
from __future__ import annotations

import sys
from pathlib import Path

from ..config import available_recipes
from ..errors import FewstepError
from .recipes import FAMILY, cpu_overrides, family_of, standin_overrides

#: toy lengths: with cpu_overrides' batch and precision, a CPU finishes any shipped recipe's stages in about a minute
TOY = ["train.max_steps=2", "train.progress=false", "train.sample_every=0", "sample.num=2", "sample.steps=2",
       "pairs.num=4", "pairs.shard_size=4", "pairs.steps=2", "train.launch_processes=1"]


def tryout_args(name: str, out: Path) -> list[str]:
    """The ``fewstep distill`` arguments of the try-out, building the stand-ins under ``out/stand-ins``."""
    from .tiny import TINY_RESOLUTION, save_captioned_digits, save_random_lpips, save_tiny_pipeline

    family = family_of(name)
    if family is None:
        raise FewstepError(f"{name} is not an SD-family recipe; valid: "
                           f"{', '.join(n for n in available_recipes() if n.startswith(tuple(FAMILY)))}")
    stand = out / "stand-ins"
    pipe = stand / family
    if not (pipe / "model_index.json").exists():
        save_tiny_pipeline(family, pipe)
    images = stand / "images"
    if not images.exists():
        save_captioned_digits(images, resolution=TINY_RESOLUTION)
    lpips = stand / "lpips_vgg.safetensors"
    if not lpips.exists():
        save_random_lpips(lpips)
    over = standin_overrides(name, pipelines={family: pipe}, images=images, resolution=TINY_RESOLUTION,
                             lpips_weights=lpips)
    return ["distill", name, f"train.output_dir={out / name}", *TOY, *cpu_overrides(name), *over]


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    out = Path(rest.pop(0)) if rest and "=" not in rest[0] else Path("tryout")
    try:
        args = tryout_args(name, out)
    except FewstepError as e:
        print(f"fewstep: error: {e}", file=sys.stderr)
        return 2
    print("fewstep " + " ".join(args + rest), flush=True)
    return cli(args + rest)


if __name__ == "__main__":
    raise SystemExit(main())
