"""Teacher-pair throughput: the baseline path against the speed options, in one run, as ratios.

Teachers: the shipped digits teacher (fewstep/assets/digits_teacher, class-conditional UNet2DModel, guidance 2)
and the tiny SD pipeline (fewstep.testing.tiny, built from configs, prompts from fewstep's 40 built-in ones).
25 DDIM steps. Each configuration makes the same pairs (same seeds) through fewstep's own pairs job
(fewstep.build.pairs_job -> fewstep.pairs.generate_pairs); configurations alternate over --rounds rounds so machine
noise hits all of them, and the table gives pairs per second (mean over rounds) and the ratio to the baseline.

Rows: baseline (float32, text encoder on every batch: train.prompt_table=0); the prompt table (each distinct prompt
encoded once); channels_last (pays off on GPUs only; on a CPU it is measured anyway and marked); float16 teacher
(GPU only: skipped on a CPU); encoder propagation (Faster Diffusion, the paper's key steps 0,1,2,3,5,10,15 of 25).
Quality of propagation: the digits Fréchet distance (fewstep's digits feature network, against sklearn's digits)
of --fd-num teacher samples (the pairs' endpoints) with and without it.

    python benchmarks/pairs_throughput.py [--digits-num 1000] [--sd-num 32] [--rounds 2] [--fd-num 1000]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fewstep.config import validate

PAPER_KEYS_25 = [0, 1, 2, 3, 5, 10, 15]


def digits_recipe(num: int, **pairs) -> dict:
    return {"name": "pairs-bench", "teacher": {"kind": "pretrained", "path": "fewstep/assets/digits_teacher"},
            "student": {"kind": "unet2d", "init": "teacher"}, "data": {"name": "digits", "resolution": 8},
            "pairs": {"num": num, "shard_size": num, "batch_size": 500, "solver": "ddim", "steps": 25, "guidance": 2.0,
                      **pairs}}


def sd_recipe(base: str, num: int, table: int, dtype: str = "float32", **pairs) -> dict:
    return {"name": "pairs-bench", "teacher": {"kind": "pipeline", "path": base},
            "student": {"kind": "pipeline", "init": "teacher"}, "data": {"name": "prompts"},
            "pairs": {"num": num, "shard_size": num, "batch_size": 8, "solver": "ddim", "steps": 25, "guidance": 7.5,
                      **pairs},
            "train": {"prompt_table": table, "teacher_dtype": dtype}}


def timed_pairs(raw: dict, out: Path) -> tuple[float, Path]:
    """Seconds to make the recipe's pairs into ``out`` (the teacher loaded outside the timing)."""
    from fewstep.build import pairs_job
    from fewstep.pairs import generate_pairs

    job = pairs_job(validate(raw))
    start = time.perf_counter()
    with torch.no_grad():
        generate_pairs(directory=out, progress=False, **job)
    return time.perf_counter() - start, out


def digits_fd(directory: Path, extract, reference) -> float:
    from safetensors.torch import load_file

    from fewstep.eval.evaluate import evaluate
    from fewstep.pairs import shard_name

    x0 = load_file(directory / shard_name(0))["x0"]
    return evaluate(x0.clamp(-1, 1), extract, reference, with_pr=False, with_kid=False)["fd"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--digits-num", type=int, default=1000)
    ap.add_argument("--sd-num", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fd-num", type=int, default=1000)
    args = ap.parse_args()
    from fewstep.testing.tiny import save_tiny_pipeline

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp())
    sd = str(save_tiny_pipeline("sd", tmp / "sd"))
    gpu = torch.cuda.is_available()
    configs = {
        "digits": {
            "baseline (float32)": digits_recipe(args.digits_num),
            "channels_last (pays off on GPUs)": digits_recipe(args.digits_num, channels_last=True),
            "encoder propagation (keys 0,1,2,3,5,10,15)": digits_recipe(args.digits_num, encoder_propagation=PAPER_KEYS_25),
        },
        "tiny SD": {
            "baseline (float32, text encoder every batch)": sd_recipe(sd, args.sd_num, 0),
            "prompt table (each prompt encoded once)": sd_recipe(sd, args.sd_num, 10_000),
            "prompt table + channels_last (pays off on GPUs)": sd_recipe(sd, args.sd_num, 10_000, channels_last=True),
            "prompt table + encoder propagation": sd_recipe(sd, args.sd_num, 10_000,
                                                            encoder_propagation=PAPER_KEYS_25),
        },
    }
    if gpu:  # a float16 teacher: only where half-precision kernels are the fast ones
        configs["tiny SD"]["prompt table + float16 teacher"] = sd_recipe(sd, args.sd_num, 10_000, dtype="float16")
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for teacher, rows in configs.items():
            for i, (label, raw) in enumerate(rows.items()):
                seconds, _ = timed_pairs(raw, tmp / f"{teacher}-{i}-{r}")
                times.setdefault((teacher, label), []).append(seconds)
    print(f"teacher pairs, 25 DDIM steps, {'CUDA ' + torch.cuda.get_device_name(0) if gpu else 'CPU'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.rounds} alternating rounds")
    print("| teacher | path | pairs | pairs/s | ratio to baseline |\n|---|---|---|---|---|")
    for teacher, rows in configs.items():
        base = None
        for label, raw in rows.items():
            rate = raw["pairs"]["num"] / statistics.mean(times[(teacher, label)])
            base = base or rate
            print(f"| {teacher} | {label} | {raw['pairs']['num']} | {rate:.1f} | {rate / base:.2f} |")
    if not gpu:
        print("float16 teacher: not measured (no GPU; CPU float16 kernels are slower than float32)")

    from fewstep.eval.evaluate import make_extractor, reference_from

    extract, _ = make_extractor("digits")
    reference = reference_from("digits", extract)
    fds = {}
    for label, keys in (("without", None), ("with", PAPER_KEYS_25)):
        extra = {} if keys is None else {"encoder_propagation": keys}
        _, out = timed_pairs(digits_recipe(args.fd_num, **extra), tmp / f"fd-{label}")
        fds[label] = digits_fd(out, extract, reference)
    print(f"\ndigits FD of {args.fd_num} teacher samples (25 DDIM steps, guidance 2): without propagation "
          f"{fds['without']:.2f}, with {fds['with']:.2f} ({fds['with'] / fds['without']:.2f}x)")


if __name__ == "__main__":
    main()
