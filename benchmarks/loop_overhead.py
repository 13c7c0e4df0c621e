"""Loop overhead: fewstep's training step vs a bare hand-written PyTorch step doing the same work.

Both train the same tiny class-conditional UNet2DModel (8x8 digits, batch 16) with DiffusionLoss
math: noise, timesteps, forward, MSE, backward, gradient clipping, AdamW, EMA. Steps alternate
(loop, bare, loop, bare, ...) in one process so machine noise hits both; the table reports medians
and their ratio. Target: ratio <= 1.05.

    python benchmarks/loop_overhead.py [--steps 200] [--batch 16]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from fewstep.config import validate
from fewstep.data.plan import BatchSource
from fewstep.eval.latency import interleaved
from fewstep.run import build_loop

UNET = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
        "norm_num_groups": 8, "num_class_embeds": 11}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(2)
    out = Path(tempfile.mkdtemp()) / "run"
    recipe = validate({
        "name": "overhead", "schedule": {"name": "vp"}, "student": {"kind": "unet2d", "config": UNET},
        "loss": {"name": "diffusion"}, "data": {"name": "digits"}, "optimizer": {"name": "AdamW", "lr": 1e-4},
        "train": {"output_dir": str(out), "max_steps": args.steps + 10, "batch_size": args.batch, "ema_decay": 0.999,
                  "clip_grad_norm": 1.0, "progress": False, "log_every": 10**9},
    })
    loop = build_loop(recipe, log=lambda m: None)
    source = BatchSource(loop.dataset, loop.plan)

    # The bare step: its own copy of the same UNet, optimizer and EMA; plain torch calls only.
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**UNET).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    ema = [p.detach().clone() for p in unet.parameters()]
    ab = loop.student.schedule.alphas_cumprod.float()
    images, labels = loop.dataset.tensors["x0"], loop.dataset.tensors["class_labels"]
    g = torch.Generator().manual_seed(0)

    def bare_step() -> None:
        idx = torch.randint(0, len(images), (args.batch,), generator=g)
        x0, y = images[idx], labels[idx]
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        a = ab[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        pred = unet(a * x0 + s * eps, t.float(), class_labels=y).sample
        loss = ((pred.float() - eps) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - 0.999)

    t_loop, t_bare = interleaved(lambda: loop.train_step(source), bare_step, steps=args.steps, warmup=10)
    m_loop, m_bare = statistics.median(t_loop), statistics.median(t_bare)
    print(f"tiny UNet2DModel ({sum(p.numel() for p in unet.parameters()):,} params), batch {args.batch}, "
          f"{args.steps} interleaved steps, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':<22}{'median ms':>10}{'p90 ms':>10}")
    p90 = lambda v: sorted(v)[int(0.9 * len(v))] * 1e3  # noqa: E731
    print(f"{'fewstep loop step':<22}{m_loop * 1e3:>10.2f}{p90(t_loop):>10.2f}")
    print(f"{'bare PyTorch step':<22}{m_bare * 1e3:>10.2f}{p90(t_bare):>10.2f}")
    print(f"ratio loop / bare: {m_loop / m_bare:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
