"""Per-process peak memory during training steps: DDP against FSDP2 (train.parallel), 2 processes.

Each configuration is one `torchrun --nproc_per_node 2` launch of this script (gloo on CPU). Every process
builds the run (fewstep.run.build_loop: the networks, then DDP's wrapper or FSDP2's shards), resets the kernel's
peak-RSS mark (/proc/self/clear_refs, value 5), trains --steps optimizer steps and reports its peak resident
memory over those steps (VmHWM), next to its resident memory after the imports. glibc's mmap threshold is fixed
at 64 KiB (as in benchmarks/memory.py) so freed blocks go back and the peak follows live memory.

The run: f-distill (reverse KL, DMD's case) with a full fake-score copy on an SD-shaped pipeline built from configs
with wide UNet blocks (--channels) and small latents, so that weights, gradients, AdamW state and the EMA dominate
over activations; float32 throughout. Rows: ddp; fsdp with the teacher replicated (the default); fsdp with the
teacher sharded. Ratios are to the ddp row of the same invocation, each process against the same process.

    python benchmarks/fsdp_memory.py [--channels 256,512] [--latent 16] [--steps 2]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
MODES = {"ddp": ("ddp", "replicate"), "fsdp, teacher replicated": ("fsdp", "replicate"),
         "fsdp, teacher sharded": ("fsdp", "shard")}


def recipe(base: str, out: str, parallel: str, teacher: str, steps: int) -> dict:
    return {"name": "fsdp-memory", "teacher": {"kind": "pipeline", "path": base},
            "student": {"kind": "pipeline", "init": "teacher"}, "optimizer": {"name": "AdamW", "lr": 1e-5},
            "loss": {"name": "fdistill", "divergence": "reverse_kl", "fake_updates": 1, "fake_init": "teacher"},
            "data": {"name": "prompts"}, "sample": {"solver": "renoise", "steps": 1},
            "train": {"output_dir": out, "max_steps": steps, "batch_size": 2, "progress": False, "sample_every": 0,
                      "checkpoint_every": 10**9, "log_every": 10**9, "ema_decay": 0.999, "mixed_precision": "no",
                      "teacher_dtype": "float32", "parallel": parallel, "fsdp_teacher": teacher}}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(spec: str) -> None:
    """One process of a launch: build, reset the peak mark, train, print JSON (MiB)."""
    import torch

    torch.set_num_threads(1)
    from diffusers import StableDiffusionPipeline  # noqa: F401  (imports before the baseline)
    from transformers import CLIPTextModel  # noqa: F401

    from fewstep.config import validate
    from fewstep.memory import estimate, largest_unit_bytes, own_bytes, per_process_bytes
    from fewstep.run import build_loop

    raw = json.loads(spec)
    base = _status_kib("VmRSS") / 1024
    loop = build_loop(validate(raw), log=lambda m: None)
    nets = [loop.teacher.net, *loop.networks.bare.values()]
    est = estimate(nets, ema_params=sum(p.numel() for p in loop.student_params))  # global sizes (DTensor.numel)
    teacher_only = own_bytes(loop.teacher.net, list(loop.networks.bare.values()))
    train = raw["train"]
    share = per_process_bytes(est.bytes, teacher_only if train["fsdp_teacher"] == "replicate" else 0.0,
                              largest_unit_bytes(nets), processes=loop.acc.num_processes, parallel=train["parallel"])
    source = loop._start()  # what run() does before its steps (no resume here: a fresh directory)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS") / 1024
    for _ in range(train["max_steps"]):
        loop.train_step(source)
    peak = _status_kib("VmHWM") / 1024
    print("RESULT " + json.dumps({"rank": loop.acc.process_index, "processes": loop.acc.num_processes, "imports": base,
                                  "before_steps": before, "peak": peak, "estimate": share / 2**20}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, nproc: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, "--child", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV)
    if res.returncode != 0:
        raise SystemExit(f"{spec['train']['parallel']} failed:\n{(res.stdout + res.stderr)[-3000:]}")
    rows = [json.loads(line.split("RESULT ", 1)[1]) for line in res.stdout.splitlines() if "RESULT " in line]
    if len(rows) != nproc or any(r["processes"] != nproc for r in rows):
        raise SystemExit(f"expected {nproc} processes, got {rows}")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--channels", default="256,512", help="the SD-shaped UNet's two block widths (tests use 32,64)")
    ap.add_argument("--latent", type=int, default=16, help="latent side")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    from fewstep.testing.tiny import save_tiny_pipeline

    root = Path(tempfile.mkdtemp())
    channels = tuple(int(c) for c in args.channels.split(","))
    base = save_tiny_pipeline("sd", root / "sd", channels=channels, sample_size=args.latent)
    print(f"f-distill (full fake-score copy, EMA), SD-shaped pipeline with UNet blocks {channels}, {args.latent}x"
          f"{args.latent} latents, batch 2 in all, {args.steps} steps, float32, CPU gloo, {args.processes} processes; "
          "MiB; 'above imports' is the peak during the steps less the process's RSS after its imports")
    print("| mode | process | RSS after imports | peak during steps | above imports | dry-run estimate | "
          "ratio to ddp (above imports) | ratio to ddp (peak) |\n|---|---|---|---|---|---|---|---|")
    ddp = None
    for i, (label, (parallel, teacher)) in enumerate(MODES.items()):
        rows = launch(recipe(str(base), str(root / f"run{i}"), parallel, teacher, args.steps), args.processes)
        ddp = ddp or rows
        for r, d in zip(rows, ddp):
            above, d_above = r["peak"] - r["imports"], d["peak"] - d["imports"]
            print(f"| {label} | {r['rank']} | {r['imports']:.0f} | {r['peak']:.0f} | {above:.0f} | {r['estimate']:.0f} | "
                  f"{above / d_above:.2f} | {r['peak'] / d['peak']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
