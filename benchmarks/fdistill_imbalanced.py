"""f-distill's mode-seeking claim on the imbalanced ring (16:1 weights): does Jensen-Shannon or forward KL move
mass between modes better than reverse KL (DMD)?

Protocol: start every run from the same one-step generator trained on the equal-weight ring (a finished
gmm_fdistill run; its fake score too), the same GAN weight for all divergences, no EMA, and distill toward the analytic imbalanced-ring teacher with each of the seven divergences
and several seeds, and report at 100, 200 and 600 generator updates:
- mode-weight error: total variation between the histogram of nearest modes of 50k samples and the true weights;
- SW2 to 50k samples of the imbalanced ring.

    python benchmarks/fdistill_imbalanced.py runs/gmm_fdistill/fdistill [--seeds 0,1,2] [--out table.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from fewstep.config import load_recipe, validate
from fewstep.data.mixtures import make_mixture
from fewstep.eval import sliced_wasserstein2
from fewstep.losses.fdivergence import WEIGHTINGS
from fewstep.run import build_loop

CHECKPOINTS = (100, 200, 600)


def mode_tv(x: torch.Tensor, mixture) -> float:
    """Total variation between the nearest-mode histogram of ``x`` and the mixture's weights."""
    nearest = torch.cdist(x.float(), mixture.means.float()).argmin(1)
    hist = torch.bincount(nearest, minlength=len(mixture.weights)).float() / len(x)
    return float(0.5 * (hist - mixture.weights.float()).abs().sum())


def fake_score_of(run: Path) -> dict[str, torch.Tensor]:
    """The trained fake score of a finished gmm_fdistill stage (its newest checkpoint)."""
    from fewstep.checkpoint import latest_intact, load_checkpoint

    ckpt = latest_intact(run / "checkpoints", report=lambda m: None)
    if ckpt is None:
        raise SystemExit(f"{run} has no checkpoint to take the fake score from")
    return load_checkpoint(ckpt)[0]["module.fake_score"]


def run_one(generator: str, fake: dict, divergence: str, seed: int, num: int, cycle: int,
            gan_weight: float) -> dict[int, dict[str, float]]:
    target = make_mixture("imbalanced_ring")
    reference = target.sample(num, torch.Generator().manual_seed(10_000 + seed))
    noise = torch.randn(num, 2, generator=torch.Generator().manual_seed(20_000 + seed))
    raw = {k: v for k, v in load_recipe("gmm_fdistill").raw.items() if k != "stages"}
    raw.update(teacher={"kind": "mixture", "mixture": {"name": "imbalanced_ring"}},
               student={"kind": "pretrained", "path": generator},
               data={"name": "mixture", "mixture": "imbalanced_ring", "size": 100_000, "seed": seed})
    raw["loss"] = {**raw["loss"], "divergence": divergence, "gan_weight": gan_weight}
    # no EMA: the study follows the generator itself as mass moves between modes
    raw["train"] = {**raw["train"], "output_dir": tempfile.mkdtemp(), "seed": seed, "max_steps": CHECKPOINTS[-1] * cycle,
                    "ema_decay": None,
                    "eval_every": 100 * cycle, "checkpoint_every": 10**9, "progress": False, "log_every": 10**9}
    results: dict[int, dict[str, float]] = {}

    def evaluate(den, step):
        updates = step // cycle
        if updates in CHECKPOINTS:
            with torch.no_grad():
                x = den(noise, 999.0)
            results[updates] = {"tv": mode_tv(x, target), "sw2": sliced_wasserstein2(x, reference)}
        return {}

    loop = build_loop(validate(raw), log=lambda m: None, evaluate=evaluate)
    loop.loss.fake_score.net.load_state_dict(fake)  # the fake score of the equal-weight run: it knows the generator
    loop.run()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a finished gmm_fdistill stage directory (runs/gmm_fdistill/fdistill): its final/ "
                                "generator and its checkpoint's fake score, both trained on the equal-weight ring")
    ap.add_argument("--gan-weight", type=float, default=0.001, help="the GAN term of every divergence (default 0.001)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--divergences", default=",".join(WEIGHTINGS))
    ap.add_argument("--num", type=int, default=50_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    raw = load_recipe("gmm_fdistill").raw["loss"]
    cycle = raw.get("fake_updates", 5) + 1
    seeds = [int(s) for s in args.seeds.split(",")]
    fake = fake_score_of(Path(args.run))
    table = {}
    for div in args.divergences.split(","):
        runs = [run_one(str(Path(args.run) / "final"), fake, div, s, args.num, cycle, args.gan_weight) for s in seeds]
        table[div] = {u: {m: [r[u][m] for r in runs] for m in ("tv", "sw2")} for u in CHECKPOINTS}
        cells = "  ".join(f"{u}: TV {statistics.mean(table[div][u]['tv']):.3f} SW2 {statistics.mean(table[div][u]['sw2']):.3f}"
                          for u in CHECKPOINTS)
        print(f"{div:<18} {cells}   (mean of {len(seeds)} seeds)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
