"""Digits: the sCM (and rCM) students beside the demo's LCM student, all built as `fewstep demo` builds its students.

    python benchmarks/digits_scm.py [--out runs/digits_scm_bench] [--updates 300] [--num 1000]
                                    [--methods consistency=digits_cd,scm=digits_scm,rcm=digits_rcm]

The shipped digits teacher, the demo's budget (``--updates`` student updates at batch 32, a fixed EMA 0.99) for the
digits_cd and digits_scm recipes, then `fewstep bench`'s digits FD (and KID, latency) at 1 and 2 steps, in one
report (OUT/report/report.md). Training time per student is printed (CPU seconds in this process).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from fewstep.commands.bench import bench_arguments, entries, measure_into, refuse_existing
from fewstep.commands.demo import FULL, final_dir, student_recipe, teacher_dir
from fewstep.io import atomic_dir
from fewstep.run import run_recipe

METHODS = "consistency=digits_cd,scm=digits_scm,rcm=digits_rcm"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/digits_scm_bench")
    ap.add_argument("--updates", type=int, default=FULL["updates"])
    ap.add_argument("--num", type=int, default=FULL["num"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=METHODS, help="NAME=RECIPE pairs, comma-separated (the students to train)")
    args = ap.parse_args()
    methods = [pair.split("=", 1) for pair in args.methods.split(",")]
    if any(len(m) != 2 for m in methods):
        ap.error(f"--methods takes NAME=RECIPE pairs, comma-separated; got {args.methods!r}")
    out = Path(args.out)
    refuse_existing(out / "report")
    settings = {**FULL, "updates": args.updates, "num": args.num, "seed": args.seed}
    teacher = teacher_dir(out)
    students = []
    for name, recipe_name in methods:
        recipe = student_recipe(name, recipe_name, [], False, teacher, out, settings)
        start = time.process_time()
        result = run_recipe(recipe)
        print(f"{name}: {result.status} after {settings['updates']} updates, {time.process_time() - start:.1f} CPU s")
        students.append(f"{name}={final_dir(recipe, out, name)}")
    bench = bench_arguments(teacher=str(teacher), teacher_steps="1,2", student=students, student_steps="1,2",
                            num=settings["num"], seed=0, reference="digits", repeats=3, warmup=1, throughput_batch=64)
    with atomic_dir(out / "report") as tmp:
        measure_into(bench, entries(bench), tmp)
    print((out / "report" / "report.md").read_text())


if __name__ == "__main__":
    main()
