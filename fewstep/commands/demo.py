"""`fewstep demo`: the embedded default job, offline on a CPU in minutes.

The class-conditional digits teacher shipped in fewstep/assets/digits_teacher (recipes/digits_teacher.yaml
makes it; the demo trains it first only if the file is absent) is distilled to one step three ways at
the same number of student updates: reflow (InstaFlow's one-step distillation of the teacher's pairs),
consistency distillation and f-distill (Jensen-Shannon). Then `fewstep bench` measures the teacher at 1, 2, 4, 8 and 25 steps and
the students at 1, 2 and 4 (digits Fréchet distance, KID, latency): report.md, report.json, pareto.png,
plus sample grids. The teacher samples with classifier-free guidance 2; the students learned it.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from ..errors import FewstepError

ASSET_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "digits_teacher"
#: reflow in the demo: InstaFlow's one-step distillation of the teacher's (1-rectified) pairs: pairs, then
#: one Euler step of the student (the teacher's UNet read as a velocity) regressed onto the pair endpoints
REFLOW_STAGES = [{"name": "pairs", "kind": "pairs"},
                 {"name": "distill", "loss": {"name": "flow_distill", "steps": 1, "distance": "l2"},
                  "data": {"name": "pairs", "path": "stage:pairs"}, "sample": {"solver": "euler", "steps": 1}}]
#: (name, recipe, its stages in the demo, reads the reflow student's teacher pairs (f-distill: real data and
#: regression targets)); each trains ``updates`` student updates (the loss says how many loop steps that is)
METHODS = (
    ("reflow", "digits_reflow", REFLOW_STAGES, False),
    ("consistency", "digits_cd", [], False),
    ("fdistill_js", "digits_fdistill", [], True),
)
FULL = {"updates": 300, "num": 1000, "pairs": 4000, "repeats": 10, "batch": 32}
QUICK = {"updates": 20, "num": 200, "pairs": 200, "repeats": 3, "batch": 32}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded default: distill the shipped digits teacher three ways and benchmark")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo; a rerun resumes it)")
    p.add_argument("--updates", type=int, default=None, help=f"student updates per method (default {FULL['updates']})")
    p.add_argument("--num", type=int, default=None, help=f"samples per evaluation (default {FULL['num']})")
    p.add_argument("--seed", type=int, default=0,
                   help="training seed of every student (and of the reflow pairs); evaluation noise stays seed 0")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['updates']} updates, {QUICK['num']} samples: checks the whole path in about a minute")
    p.set_defaults(run=run)


def teacher_dir(out: Path, log=print) -> Path:
    """The shipped teacher, or (if the asset is absent) the digits_teacher recipe run into OUT/teacher."""
    if (ASSET_TEACHER / "fewstep.json").is_file():
        return ASSET_TEACHER
    from ..config import load_recipe
    from ..run import run_recipe

    log(f"fewstep: {ASSET_TEACHER} is absent; training the digits teacher first (recipes/digits_teacher.yaml)")
    recipe = load_recipe("digits_teacher", [f"train.output_dir={out / 'teacher'}"])
    result = run_recipe(recipe, log=log)
    if result.status != "finished":
        raise FewstepError(f"the digits teacher did not finish ({result.status}); run `fewstep demo` again to resume")
    return out / "teacher" / "final"


def student_recipe(name: str, recipe: str, stages: list[dict], shared_pairs: bool,
                   teacher: Path, out: Path, settings: dict[str, Any]):
    """The shipped recipe with the shipped teacher, ``updates`` student updates and demo-sized pairs."""
    from ..config import load_recipe, validate
    from ..losses import loss_class
    from ..run import pairs_dir

    raw = copy.deepcopy(load_recipe(recipe).raw)
    raw["teacher"] = {"kind": "pretrained", "path": str(teacher)}
    raw.pop("stages", None)
    if stages:
        raw["stages"] = copy.deepcopy(stages)
    loss = dict((stages[-1].get("loss") if stages else None) or raw["loss"])  # the loss that trains the student
    steps = loss_class(loss.pop("name")).loop_steps(settings["updates"], **loss)
    if "pairs" in raw:
        raw["pairs"] = {**raw["pairs"], "num": settings["pairs"], "shard_size": settings["pairs"], "seed": settings["seed"]}
    if shared_pairs:
        raw["data"] = {"name": "pairs", "path": str(pairs_dir(out / "reflow" / "pairs"))}
    # every student: the same batch and updates; a fixed EMA 0.99 from the first update (0.99^300 = 4.9 % of the
    # initial weights are left; 0.999 would leave 74 %). Not the loop's default warm-up: over 300 updates it never
    # reaches 0.99 (1 - decay = 9 / (t + 10) ends at 0.029) and averages fewer updates; measured on seed 0, the
    # warm-up gave one-step FD reflow 66.59, consistency 94.32, f-distill 103.24 against 58.81, 93.07, 101.25
    raw["train"] = {**raw["train"], "output_dir": str(out / name), "max_steps": steps,
                    "batch_size": settings["batch"], "ema_decay": 0.99, "ema_warmup": False, "seed": settings["seed"],
                    "checkpoint_every": max(1, steps // 4), "sample_every": 0, "eval_every": 0}
    raw.pop("evaluation", None)
    return validate(raw)


def final_dir(recipe, out: Path, name: str) -> Path:
    return out / name / (recipe.stages[-1]["name"] if recipe.stages else "") / "final"


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_dir
    from ..run import run_recipe
    from .bench import bench_arguments, entries, measure_into, refuse_existing
    from .distill import EXIT

    settings = dict(QUICK if args.quick else FULL)
    if args.updates is not None:
        settings["updates"] = args.updates
    if args.num is not None:
        settings["num"] = args.num
    settings["seed"] = args.seed
    if settings["updates"] < 1 or settings["num"] < 2:
        raise FewstepError("--updates must be >= 1 and --num >= 2")
    out = Path(args.out)
    report = out / "report"
    refuse_existing(report)
    teacher = teacher_dir(out)
    recipes = {m[0]: student_recipe(*m, teacher, out, settings) for m in METHODS}
    print(f"fewstep demo: the digits teacher ({teacher}) distilled to one step three ways, "
          f"{settings['updates']} student updates each; evaluation on {settings['num']} samples")
    for name, recipe in recipes.items():
        print(f"fewstep demo: {name}")
        result = run_recipe(recipe)
        if result.status != "finished":
            print(f"fewstep demo: {name} stopped ({result.status}); run the same command to resume")
            return EXIT[result.status]
    students = [f"{name}={final_dir(recipe, out, name)}" for name, recipe in recipes.items()]
    bench = bench_arguments(teacher=str(teacher), teacher_steps="1,2,4,8,25", student=students, student_steps="1,2,4",
                            num=settings["num"], seed=0, reference="digits", repeats=settings["repeats"], warmup=2,
                            throughput_batch=64)
    # the report appears complete (table, plot, grids) or not at all: built beside, renamed at the end
    with atomic_dir(report) as tmp:
        measure_into(bench, entries(bench), tmp)
        save_grids(teacher, {n: final_dir(r, out, n) for n, r in recipes.items()}, tmp)
        lines = verdict(tmp)
    print((report / "report.md").read_text())
    print("\n".join(lines))
    print(f"fewstep demo: report, Pareto plot and sample grids in {report}")
    return 0


def save_grids(teacher: Path, students: dict[str, Path], out: Path) -> None:
    """40 samples (classes 0-9 cycling, same noise) per model: the teacher at 1 and 25 steps, students at 1."""
    from ..generate import Generator
    from ..viz import save_samples

    t = Generator.load(str(teacher))
    save_samples(t(40, seed=0, steps=1), out / "teacher_1step.png")
    save_samples(t(40, seed=0, steps=25), out / "teacher_25steps.png")
    for name, directory in students.items():
        save_samples(Generator.load(str(directory))(40, seed=0, steps=1), out / f"{name}_1step.png")
    print(f"sample grids: {', '.join(sorted(p.name for p in out.glob('*.png') if p.name != 'pareto.png'))}")


def compared(fd: float, reference: float) -> str:
    """How a Frechet distance stands to another, in the direction it goes: "6.9x lower than", "10.2x higher than"
    (lower is better), or "the same as"."""
    if fd == reference:
        return "the same as"
    if fd < reference:
        return f"{reference / fd:.1f}x lower than" if fd > 0 else "lower than"
    return f"{fd / reference:.1f}x higher than" if reference > 0 else "higher than"


def verdict(report: Path) -> list[str]:
    """One line per claim of the demo, from report.json."""
    import json

    rows = json.loads((report / "report.json").read_text())["rows"]
    fd = {(r["model"], r["steps"]): r["fd"] for r in rows}
    t1, t25 = fd[("teacher", 1)], fd[("teacher", 25)]
    ones = {m: v for (m, k), v in fd.items() if k == 1 and m != "teacher"}
    lines = [f"{m}: one-step FD {v:.2f} = {compared(v, t1)} the teacher's one step ({t1:.2f})" for m, v in ones.items()]
    best = min(ones, key=ones.get)
    lines.append(f"best one-step student: {best}, FD {ones[best]:.2f} = {ones[best] / t25:.2f}x the teacher's 25 steps "
                 f"({t25:.2f})")
    return lines
