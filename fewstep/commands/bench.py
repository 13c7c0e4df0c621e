"""`fewstep bench`: a teacher at several step counts and students at theirs, on the same classes/prompts and
seeds: latency (batch 1), throughput, peak memory and quality -> report.json, report.md, pareto.png."""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import FewstepError
from ..io import atomic_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency versus quality for a teacher and students")
    p.add_argument("--teacher", required=True,
                   help="the teacher: a run's final/ directory, or a plain diffusers pipeline (directory or hub id), "
                        "sampled with fewstep's DDIM/Euler at the pipeline's default steps and guidance_scale")
    p.add_argument("--teacher-steps", default="1,2,4,8,25")
    p.add_argument("--student", action="append", default=[], help="NAME=DIR or NAME=DIR@1,2,4 (repeatable)")
    p.add_argument("--student-steps", default="1,2,4")
    p.add_argument("--num", type=int, default=1000, help="samples per entry for the quality metrics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default="digits")
    p.add_argument("--features", default=None, help="digits, shapes, inception or dinov2")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--repeats", type=int, default=20, help="timed batch-1 runs per entry")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--throughput-batch", type=int, default=64)
    p.add_argument("--deploy-batches", default="1,8",
                   help="batch sizes of the deployed rows: the exported diffusers pipeline called plainly beside "
                        "fewstep's sampler, for pipeline students ('' to skip)")
    p.add_argument("--out", required=True, help="a new directory for report.json, report.md and pareto.png")
    p.set_defaults(run=run)


def bench_arguments(**values) -> argparse.Namespace:
    """`fewstep bench`'s arguments at their defaults with ``values`` in place of some, for code that runs it in-process
    (the demo, benchmarks/digits_scm.py), so an option added to the command reaches them; an unknown name is refused."""
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--teacher", "", "--out", ""])
    unknown = sorted(set(values) - set(vars(args)))
    if unknown:
        raise ValueError(f"unknown bench arguments {unknown}; valid: {sorted(k for k in vars(args) if k != 'run')}")
    vars(args).update(values)
    return args


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise FewstepError(f"step lists are comma-separated integers, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise FewstepError(f"steps must be at least 1, got {text!r}")
    return steps


def entries(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    out = [("teacher", args.teacher, k) for k in _steps(args.teacher_steps)]
    for spec in args.student:
        if "=" not in spec:
            raise FewstepError(f"--student must look like NAME=DIR or NAME=DIR@1,2,4, got {spec!r}")
        name, rest = spec.split("=", 1)
        directory, _, steps = rest.partition("@")
        out += [(name, directory, k) for k in _steps(steps or args.student_steps)]
    return out


def timed_run(gen, steps: int, batch: int, seed: int):
    """A closure that generates one batch, timing text encoding, denoiser steps and VAE decode separately."""
    from ..sampling import sampler_grid, sampler_solver
    from ..solvers import sample

    s = gen.meta["sampler"]
    x = gen.noise(batch, seed)
    solver = sampler_solver(s)
    grid = sampler_grid(gen.denoiser.schedule, s, steps)

    @torch.no_grad()
    def run(timer) -> None:
        with timer.part("text_encoder"):
            cond = gen.conditions(batch)
        with timer.part("denoiser"):
            out = sample(gen.denoiser, solver, x, grid, cond, guidance=s.get("guidance") if cond is not None else None)
        with timer.part("vae_decode"):
            if gen.pipeline is not None:
                gen.pipeline.decode_latents(out)

    return run


def deployed_rows(gen, name: str, steps: int, batches: list[int], args: argparse.Namespace,
                  batch1_s: float) -> list[dict]:
    """What users deploy: the exported diffusers pipeline called plainly (its model card's call, the empty prompt
    as in fewstep's rows), timed beside fewstep's own sampler at each batch size; a row with ``skipped`` where no pipeline
    call expresses the sampler. ``batch1_s``: fewstep's batch-1 latency, already measured for the row."""
    from ..eval.latency import measure
    from ..export import pipeline_call

    kwargs, why = pipeline_call(gen.meta, steps, gen.pipeline.family, gen.denoiser.schedule)
    if kwargs is None:
        return [{"model": name, "steps": steps, "skipped": why}]
    pipe = gen.pipeline.pipe
    pipe.set_progress_bar_config(disable=True)
    prompt = ""  # the prompt fewstep's rows sample with (fewstep.generate.cycling_conditions)
    out = []
    for b in batches:
        def plain(timer, b=b) -> None:
            pipe([prompt] * b, generator=torch.Generator(pipe.device).manual_seed(args.seed), **kwargs)

        ours = batch1_s if b == 1 else \
            measure(timed_run(gen, steps, b, args.seed), warmup=args.warmup, repeats=args.repeats)["median_s"]
        theirs = measure(plain, warmup=args.warmup, repeats=args.repeats)
        out.append({"model": name, "steps": steps, "batch": b, "call": dict(kwargs), "scheduler": gen.meta.get("scheduler"),
                    "fewstep_median_s": ours, "pipeline_median_s": theirs["median_s"],
                    "pipeline_p90_s": theirs["p90_s"]})
    return out


def write_report(rows: list[dict], out: Path, meta: dict, deployed: list[dict] | None = None) -> None:
    """report.json, report.md and pareto.png into ``out`` (a directory being built by ``atomic_dir``)."""
    deployed = deployed or []
    (out / "report.json").write_text(json.dumps({"meta": meta, "rows": rows, "deployed": deployed}, indent=2))
    lines = ["# fewstep bench", "", f"{meta['hardware']}; N = {meta['num']} samples per row; features: {meta['features']}; "
             f"latency at batch 1 over {meta['repeats']} runs after {meta['warmup']} warm-up runs.", "",
             "| model | steps | FD | KID | latency median ms | p90 ms | denoiser ms | text ms | VAE ms | throughput img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['fd']:.2f} | {r.get('kid_mean', float('nan')):.4g} | "
                     f"{r['median_s'] * 1e3:.2f} | {r['p90_s'] * 1e3:.2f} | {r['denoiser_s'] * 1e3:.2f} | "
                     f"{r['text_encoder_s'] * 1e3:.2f} | {r['vae_decode_s'] * 1e3:.2f} | {r['throughput_img_s']:.1f} |")
    if deployed:
        lines += ["", "## Deployed: the exported diffusers pipeline, called plainly", "",
                  "| model | steps | batch | call | fewstep sampler median ms | pipeline median ms | pipeline p90 ms | "
                  "pipeline / fewstep |", "|---|---|---|---|---|---|---|---|"]
        for d in deployed:
            if "skipped" in d:
                lines.append(f"| {d['model']} | {d['steps']} | | not timed: {d['skipped']} | | | | |")
                continue
            call = ", ".join(f"{k}={v}" for k, v in d["call"].items())
            lines.append(f"| {d['model']} | {d['steps']} | {d['batch']} | `{call}` | {d['fewstep_median_s'] * 1e3:.2f} | "
                         f"{d['pipeline_median_s'] * 1e3:.2f} | {d['pipeline_p90_s'] * 1e3:.2f} | "
                         f"{d['pipeline_median_s'] / d['fewstep_median_s']:.2f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    pareto_plot(rows, out / "pareto.png")


def pareto_plot(rows: list[dict], path: Path) -> None:
    """Fréchet distance against batch-1 latency, one line per model, points labelled by steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [(r["median_s"] * 1e3, r["fd"], r["steps"]) for r in rows if r["model"] == name]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        for lat, fd, k in pts:
            ax.annotate(str(k), (lat, fd), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latency at batch 1 (ms, log scale)")
    ax.set_ylabel("Fréchet distance")
    ax.set_title("latency versus quality (labels: steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def refuse_existing(out: Path) -> None:
    """A complete report is never overwritten (an empty directory is fine)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FewstepError(f"{out} already holds a report; choose a new --out (nothing is overwritten)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    refuse_existing(out)
    todo = entries(args)  # bad input is refused before anything is written
    with atomic_dir(out) as tmp:
        measure_into(args, todo, tmp)
    print((out / "report.md").read_text())
    return 0


def measure_into(args: argparse.Namespace, todo: list[tuple[str, str, int]], out: Path) -> None:
    """Generate, evaluate and time every entry; write the report into ``out`` (an ``atomic_dir`` in progress)."""
    import platform

    from ..eval.evaluate import default_features, evaluate, make_extractor, reference_from
    from ..generate import Generator, default_device

    features = args.features or default_features(args.reference)
    extract, protocol = make_extractor(features, inception_weights=args.inception_weights)
    reference = reference_from(args.reference, extract)
    from ..eval.latency import measure

    generators: dict[str, Generator] = {}
    rows: list[dict] = []
    deployed: list[dict] = []
    batches = _steps(args.deploy_batches) if args.deploy_batches else []
    for name, directory, steps in tqdm(todo, desc="bench"):
        gen = generators.setdefault(directory, Generator.load(directory))
        samples = gen(args.num, seed=args.seed, steps=steps)
        quality = evaluate(samples, extract, reference, with_pr=False, seed=args.seed)
        latency = measure(timed_run(gen, steps, 1, args.seed), warmup=args.warmup, repeats=args.repeats)
        run_b = timed_run(gen, steps, args.throughput_batch, args.seed)
        from ..eval.latency import PartTimer

        run_b(PartTimer())  # warm-up
        start = time.perf_counter()
        run_b(PartTimer())
        throughput = args.throughput_batch / (time.perf_counter() - start)
        memory = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if torch.cuda.is_available():
            memory["max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        rows.append({"model": name, "dir": directory, "steps": steps, **quality, **latency, "throughput_img_s": throughput,
                     **memory})
        if gen.pipeline is not None:
            deployed += deployed_rows(gen, name, steps, batches, args, latency["median_s"])
    device = default_device()  # where Generator.load put every model: the label names it, not merely a GPU present
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)") + \
        f", torch {torch.__version__}"
    meta = {"num": args.num, "seed": args.seed, "features": protocol, "reference": reference[3], "hardware": hardware,
            "repeats": args.repeats, "warmup": args.warmup, "throughput_batch": args.throughput_batch,
            "peak_memory": "process peak RSS, cumulative over the run; on CUDA also max_allocated per row",
            "deployed": "the exported pipeline called as its model card says (pipe(prompts, num_inference_steps=k or "
                        "timesteps, guidance_scale), PIL output) beside fewstep's sampler (latents decoded), same batch"}
    write_report(rows, out, meta, deployed)
