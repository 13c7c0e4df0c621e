"""Consistency-distillation step time: fewstep's loop step vs a bare hand-written step, same math, same process.

Both distill the tiny SD-1.5-shaped UNet (fewstep.testing.tiny) on cached latents and text embeddings
(so neither runs the VAE or text encoder): per step, the skipping-step grid, noise and w per sample,
one batched CFG teacher forward [uncond; cond], a DDIM step, the EMA target's f(x_s, s) without
grad, the student's f(x_t, t), L2, backward, clipping, AdamW and the target EMA update. Steps
alternate (fewstep, bare, ...) so machine noise hits both; medians and their ratio (target <= 1.05).
The parts table times the pieces of fewstep's step alone.

Two more rows, each interleaved with the bare step again, as ratios to it: fewstep online (the images dataset, so
every step runs the VAE encoder and the text encoder, as without the cache) and fewstep on the cache with
train.compile (regional torch.compile, fewstep/compiling.py; its first steps compile, outside the timing, and the
compile time is printed). --no-compile skips the compiled row (a first CPU compile takes a minute or more).

    python benchmarks/cd_step.py [--steps 60] [--batch 8] [--no-compile]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fewstep.config import validate
from fewstep.consistency import consistency_function
from fewstep.data.plan import ArrayDataset, BatchPlan, BatchSource
from fewstep.eval.latency import interleaved
from fewstep.run import build_loop
from fewstep.testing.tiny import save_captioned_digits, save_tiny_pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true", help="skip the train.compile row")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    sd = save_tiny_pipeline("sd", tmp / "sd")
    images = save_captioned_digits(tmp / "images", num=64)
    raw = {
        "name": "cd_step", "teacher": {"kind": "pipeline", "path": str(sd)}, "student": {"kind": "pipeline", "init": "teacher"},
        "loss": {"name": "consistency", "guidance_min": 4.0, "guidance_max": 16.0, "target": "ema", "distance": "l2"},
        "data": {"name": "images", "root": str(images), "resolution": 32},
        "optimizer": {"name": "AdamW", "lr": 1e-5}, "sample": {"solver": "consistency", "spacing": "lcm", "steps": 1},
        "train": {"output_dir": str(tmp / "run"), "max_steps": 10**6, "batch_size": args.batch, "clip_grad_norm": 1.0,
                  "progress": False, "log_every": 10**9},
    }
    loop = build_loop(validate(raw), log=lambda m: None)
    lp = loop.student.net  # the student's UNet
    pipe = loop.loss.target  # EMA target denoiser (fewstep's)
    teacher = loop.teacher
    # the cache: latents and text embeddings computed once, as data.name=cache does
    with torch.no_grad():
        from fewstep.pipelines import load_pipeline

        p = load_pipeline(str(sd))
        batch = [loop.dataset[i] for i in range(64)]
        latents = p.encode_images(torch.stack([b["x0"] for b in batch]))
        emb = p.encode_prompts([b["prompt"] for b in batch])["encoder_hidden_states"]
        null = p.null_cond()["encoder_hidden_states"]
    data = ArrayDataset({"x0": latents, "encoder_hidden_states": emb})
    source = BatchSource(data, BatchPlan(len(data), args.batch, seed=0))

    # the bare step: its own copies of the same three UNets, plain diffusers/torch calls only
    s_unet, t_unet, tgt_unet = copy.deepcopy(lp), copy.deepcopy(teacher.net), copy.deepcopy(pipe.net)
    opt = torch.optim.AdamW(s_unet.parameters(), lr=1e-5)
    ab = loop.student.schedule.alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)

    def f(unet, x, t, c):
        a, s = ab[t.long()].sqrt().view(-1, 1, 1, 1), (1 - ab[t.long()]).sqrt().view(-1, 1, 1, 1)
        x0 = (x - s * unet(x, t.float(), encoder_hidden_states=c).sample) / a
        sc = (t.float() * 10).view(-1, 1, 1, 1)
        return 0.25 / (sc**2 + 0.25) * x + sc / (sc**2 + 0.25).sqrt() * x0

    def bare_step() -> None:
        idx = torch.randint(0, len(data), (args.batch,), generator=g)
        x0, c = latents[idx], emb[idx]
        eps = torch.randn(x0.shape, generator=g)
        t = (torch.randint(0, 50, (args.batch,), generator=g) + 1) * 20 - 1
        s = (t - 20).clamp_min(0)
        w = 4 + 12 * torch.rand(args.batch, generator=g)
        a, sg = ab[t].sqrt().view(-1, 1, 1, 1), (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
        x_t = a * x0 + sg * eps
        f_theta = f(s_unet, x_t, t, c)
        with torch.no_grad():
            both = t_unet(torch.cat([x_t, x_t]), torch.cat([t, t]).float(),
                          encoder_hidden_states=torch.cat([null.expand_as(c), c])).sample
            e_u, e_c = both.chunk(2)
            e = e_u + w.view(-1, 1, 1, 1) * (e_c - e_u)
            x0_hat = (x_t - sg * e) / a
            a2, s2 = ab[s].sqrt().view(-1, 1, 1, 1), (1 - ab[s]).sqrt().view(-1, 1, 1, 1)
            x_s = a2 * x0_hat + s2 * e
            target = f(tgt_unet, x_s, s, c)
        loss = ((f_theta - target) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s_unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(tgt_unet.parameters()), [q.detach() for q in s_unet.parameters()], 0.05)

    t_loop, t_bare = interleaved(lambda: loop.train_step(source), bare_step, steps=args.steps)
    # online: the loop's own images dataset, VAE and text encoder per step
    online = build_loop(validate({**raw, "train": {**raw["train"], "output_dir": str(tmp / "online")}}), log=lambda m: None)
    online_source = BatchSource(online.dataset, BatchPlan(len(online.dataset), args.batch, seed=0))
    rows = {"fewstep online (VAE + text encoder per step)": interleaved(lambda: online.train_step(online_source),
                                                                         bare_step, steps=args.steps)}
    compile_s = None
    if not args.no_compile:
        compiled = build_loop(validate({**raw, "train": {**raw["train"], "output_dir": str(tmp / "compiled"),
                                                         "compile": True}}), log=lambda m: None)
        start = time.perf_counter()
        for _ in range(3):  # the first steps compile the regions (grad and no-grad variants)
            compiled.train_step(source)
        compile_s = time.perf_counter() - start
        rows["fewstep cached + train.compile"] = interleaved(lambda: compiled.train_step(source), bare_step,
                                                              steps=args.steps)

    # parts of fewstep's step, timed alone
    b = {**source.get(0, 0)}
    x0, cond = b["x0"], {"encoder_hidden_states": b["encoder_hidden_states"]}
    t = torch.full((args.batch,), 499.0, dtype=torch.float64)
    s = t - 20
    x_t = loop.student.schedule.add_noise(x0, torch.randn_like(x0), t)
    w = torch.full((args.batch,), 8.0)
    parts = {"teacher step (CFG, no grad)": [], "target f (no grad)": [], "student f forward": [], "backward": []}
    for _ in range(max(5, args.steps // 4)):
        t0 = time.perf_counter()
        with torch.no_grad():
            x_s, _ = loop.loss.solver.step(teacher, x_t, t, s, cond, guidance=w)
        t1 = time.perf_counter()
        with torch.no_grad():
            consistency_function(pipe, x_s, s, cond)
        t2 = time.perf_counter()
        out = consistency_function(loop.student, x_t, t, cond)
        t3 = time.perf_counter()
        out.square().mean().backward()
        t4 = time.perf_counter()
        loop.student.net.zero_grad(set_to_none=True)
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[k].append(v)
    m_loop, m_bare = statistics.median(t_loop), statistics.median(t_bare)
    n = sum(q.numel() for q in s_unet.parameters())
    print(f"tiny SD UNet ({n:,} params), batch {args.batch}, {args.steps} interleaved steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'':<30}{'median ms':>10}")
    print(f"{'fewstep consistency step':<30}{m_loop * 1e3:>10.2f}")
    print(f"{'bare hand-written step':<30}{m_bare * 1e3:>10.2f}")
    print(f"ratio fewstep / bare: {m_loop / m_bare:.3f} (target <= 1.05)")
    print("more rows, each interleaved with the bare step again (ratio to that bare step):")
    for k, (a, b) in rows.items():
        print(f"  {k:<46}{statistics.median(a) * 1e3:>10.2f} ms  ratio {statistics.median(a) / statistics.median(b):.3f}")
    if compile_s is not None:
        print(f"  train.compile: first 3 steps (compiling) took {compile_s:.1f} s")
    print("not measured here (pay off on GPUs only): fp16 teacher, channels_last, fused AdamW")
    print("parts of fewstep's step (alone):")
    for k, v in parts.items():
        print(f"  {k:<28}{statistics.median(v) * 1e3:>10.2f}")


if __name__ == "__main__":
    main()
