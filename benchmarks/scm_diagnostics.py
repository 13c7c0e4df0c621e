"""Where an sCM ring student is inconsistent, and how its loss weights each time (docs/consistency.md).

    python benchmarks/scm_diagnostics.py runs/gmm_scm/scm [more stage dirs] [--num 20000]

For each stage directory (its final/ and newest checkpoint):
- consistency error: SW2 between f(x_t, t) = the student's x0 prediction for x_t drawn from the true marginal at VP
  timestep t and fresh ring samples (a perfect consistency function gives the data at every t; t = 999 is what the
  one-step sampler uses);
- tangent: the median per-sample rms of the loss's g = cos t df/dt (r = 1, before normalization) at TrigFlow times,
  with the analytic teacher's velocity (fewstep.losses.scm, as in training);
- weight: log prior(t) - logvar(t), the log of the per-sample weight the trained adaptive weight network gives.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from fewstep.data.mixtures import make_mixture
from fewstep.denoisers import MixtureDenoiser
from fewstep.denoisers.trigflow import TrigFlowView, trig_coefficients
from fewstep.eval import sliced_wasserstein2
from fewstep.export import load_final
from fewstep.losses.scm import AdaptiveWeight, jvp, scm_tangent
from fewstep.schedules import expand_as

VP_TIMES = (50, 150, 300, 450, 600, 750, 850, 950, 999)
TRIG_TIMES = (0.2, 0.5, 0.8, 1.0, 1.2, 1.35, 1.45, 1.5, 1.53)


def consistency_error(den, mixture, num: int) -> list[float]:
    reference = mixture.sample(num, torch.Generator().manual_seed(11))
    x0 = mixture.sample(num, torch.Generator().manual_seed(12)).double()
    eps = torch.randn(num, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    out = []
    for t in VP_TIMES:
        alpha, sigma = den.schedule.alpha_sigma(torch.tensor(float(t)))
        with torch.no_grad():
            x0_hat = den((alpha * x0 + sigma * eps).float(), torch.full((num,), float(t), dtype=torch.float64))
        out.append(float(sliced_wasserstein2(x0_hat, reference)))
    return out


def tangents(den, mixture, sigma_data: float, num: int) -> list[float]:
    teacher = MixtureDenoiser(mixture, den.schedule)
    x0 = mixture.sample(num, torch.Generator().manual_seed(12)).float()
    z = sigma_data * torch.randn(num, 2, generator=torch.Generator().manual_seed(3))
    view = TrigFlowView(den, sigma_data)
    out = []
    for time in TRIG_TIMES:
        t = torch.full((num,), time, dtype=torch.float64)
        cos, sin = trig_coefficients(t, x0)
        x_t = cos * x0 + sin * z
        with torch.no_grad():
            dxt_dt = TrigFlowView(teacher, sigma_data).velocity(x_t, t, None)
        scale = (torch.cos(t) * torch.sin(t)).float()
        F_minus, F_jvp = jvp(lambda x, s: view.F(x, s, None), (x_t, t), (expand_as(scale, x_t) * dxt_dt, scale.double()))
        g = scm_tangent(F_minus, F_jvp, x_t, dxt_dt, t, sigma_data, 1.0)
        out.append(float(g.square().mean(1).sqrt().median()))
    return out


def log_weights(stage: Path, sigma_data: float) -> list[float] | None:
    checkpoints = sorted((stage / "checkpoints").glob("step-*"))
    if not checkpoints or not (checkpoints[-1] / "module.weighting.safetensors").is_file():
        return None
    state = load_file(str(checkpoints[-1] / "module.weighting.safetensors"))
    weighting = AdaptiveWeight(state["linear.weight"].shape[1], sigma_data)
    weighting.load_state_dict(state)  # its Fourier features are saved with it
    t = torch.tensor(TRIG_TIMES, dtype=torch.float64)
    with torch.no_grad():
        logvar = weighting(t).double()
    return (-torch.log(sigma_data * torch.tan(t)) - logvar).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stages", nargs="+", help="sCM stage directories (holding final/ and checkpoints/)")
    ap.add_argument("--num", type=int, default=20_000)
    args = ap.parse_args()
    mixture = make_mixture("ring")
    for stage in map(Path, args.stages):
        den, meta, _ = load_final(stage / "final")
        sigma_data = float(meta["sampler"].get("sigma_data") or 0.5)
        print(f"{stage}")
        err = consistency_error(den, mixture, args.num)
        print("  consistency error SW2   " + "  ".join(f"t={t}: {e:.3f}" for t, e in zip(VP_TIMES, err)))
        tan = tangents(den, mixture, sigma_data, min(args.num, 4096))
        print("  tangent rms (median)    " + "  ".join(f"t={t}: {g:.3f}" for t, g in zip(TRIG_TIMES, tan)))
        w = log_weights(stage, sigma_data)
        print("  log weight              " + ("no checkpoint" if w is None else
                                                "  ".join(f"t={t}: {x:.2f}" for t, x in zip(TRIG_TIMES, w))))


if __name__ == "__main__":
    main()
