"""`fewstep distill RECIPE [key=value ...] [--dry-run]`: run a recipe (also trains teachers)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import load_recipe
from ..errors import FewstepError

EXIT = {"finished": 0, "interrupted": 130, "time_limit": 75}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="run a recipe: train a teacher or distill a student")
    p.add_argument("recipe", help="a recipe name (see `fewstep ls`) or a path to a .yaml file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe, parameter counts and a memory estimate")
    p.add_argument("--num-processes", type=int, default=8, metavar="N",
                   help="with --dry-run: the per-process estimate under ddp and fsdp for N processes (default 8)")
    p.set_defaults(run=run)


def _count(module) -> tuple[int, int]:
    params = list(module.parameters())
    train = sum(p.numel() for p in params if p.requires_grad)
    return train, sum(p.numel() for p in params) - train


#: the GPU memory the dry run's "fits" marks rows against (an 80 GB A100 / H100)
ONE_GPU_GB = 80


def dry_run(recipe, processes: int = 8) -> int:
    """The resolved recipe, then per stage (a recipe without stages is one) each network's parameters and
    memory estimates for it and its full / LoRA counterparts. A stage that reads an earlier stage's model
    is estimated once that stage has run."""
    from ..run import stage_recipes

    print(recipe.to_yaml().rstrip())
    if not recipe.stages:
        print("---")
        _batch_and_prompts(recipe, "distill", processes)
        _estimate(recipe, {}, processes)
        return 0
    done: dict[str, Path] = {}
    for name, kind, sub in stage_recipes(recipe):
        out = Path(sub.train.output_dir)
        print(f"--- stage {name} ({kind})")
        _batch_and_prompts(sub, kind, processes)
        if kind == "pairs":
            print(f"  teacher pairs to {out / 'pairs'}")
        else:
            try:
                _estimate(sub, done, processes)
            except FewstepError as e:
                print(f"  not estimated yet: {e}")
        if (out / "DONE").exists():
            done[name] = out
    return 0


def _batch_and_prompts(recipe, kind: str, processes: int) -> None:
    """The batch per process and in all (on the recipe's launch and on ``processes``), and a prompt set's size
    against what the run draws (fewstep.build.data.check_prompt_count), one line each."""
    from ..build.data import RUN_DRAWS, prompts_first, run_draws
    from ..settings import divisors

    tr = recipe.train
    if kind == "pairs":
        print(f"  pairs batch: {recipe.pairs.batch_size} per process (pairs.batch_size)")
    else:
        planned, b = tr.launch_processes, tr.batch_size
        here = (f"{b // processes} per process on --num-processes {processes}" if b % processes == 0 else
                f"does not split over --num-processes {processes} (valid: {', '.join(map(str, divisors(b)))})")
        print(f"  batch: {b} a micro-batch, all processes together (train.batch_size) = {b // planned} per process x "
              f"{planned} process{'es' if planned > 1 else ''}, the recipe's launch (train.launch_processes); {here}"
              f"{f'; x {tr.grad_accum} micro-batches a step' if tr.grad_accum > 1 else ''}")
    draws, what = (recipe.pairs.num, "pairs.num") if kind == "pairs" else (run_draws(tr), RUN_DRAWS)
    try:
        dataset = prompts_first(recipe, None, draws, what)  # what the run checks before it loads a model
    except FewstepError as e:
        print(f"  prompts: refused: {e}")
        return
    if dataset is not None:
        print(f"  prompts: {len(set(dataset.prompts)):,} distinct; the run draws {draws:,} ({what})")


def _estimate(recipe, stage_outputs: dict, processes: int) -> None:
    from ..build import build
    from ..lora import WIDE_TARGETS
    from ..memory import (OPTIMIZER_STATES, estimate, largest_unit_bytes, lora_parameter_count, own_bytes,
                          per_process_bytes)

    b = build(recipe, stage_outputs=stage_outputs, weights=False)  # a pipeline from its configs, on the meta device
    student = b.student.denoiser.net
    teacher = getattr(b.teacher.denoiser, "net", None)
    extra = b.loss.modules_to_train()
    for name, module in [("student", student), ("teacher", teacher), *extra.items()]:
        if module is not None:
            trainable, frozen = _count(module)
            print(f"{name:>12}: {trainable:,} trainable, {frozen:,} frozen parameters")
    opt = recipe.optimizer["name"]
    per_trained = 4 * (1 + OPTIMIZER_STATES.get(opt, 2))  # float32 gradient + optimizer state
    ema = recipe.train.ema_decay is not None
    s_train, s_frozen = _count(student)
    here = estimate([student, teacher, *extra.values()], optimizer=opt, ema_params=s_train if ema else 0)
    rows = [("this run", here.trainable, here.bytes)]
    student_delta = None  # (trainable, bytes) a LoRA student instead of a full one changes
    if recipe.lora is not None:  # the same run training the whole student: its base weights (already counted once)
        delta = (s_frozen - s_train) * (per_trained + (4 if ema else 0)) - s_train * 4  # adapters' own weights go
        # a base stored in lora.base_dtype trains in float32 as a full student
        delta += sum(p.numel() * (4 - p.element_size()) for p in student.parameters() if not p.requires_grad)
        rows.append(("full student instead of LoRA", here.trainable - s_train + s_frozen, here.bytes + delta))
    else:
        rank = 64
        n = lora_parameter_count(student, rank, WIDE_TARGETS)
        student_delta = (n - s_train, (n - s_train) * (per_trained + (4 if ema else 0)) + n * 4)
        rows.append((f"LoRA rank {rank} student instead of full", here.trainable + student_delta[0],
                     here.bytes + student_delta[1]))
    for name, (rank, targets, how) in b.loss.lora_alternatives().items():  # e.g. f-distill's full fake-score copy
        if teacher is None:
            continue
        copy_train = _count(extra[name])[0]
        n = lora_parameter_count(teacher, rank, targets)
        saved = sum(p.numel() * p.element_size() for p in extra[name].parameters()) + copy_train * per_trained
        alt = (n - copy_train, n * (4 + per_trained) - saved)
        label = name.replace("_", " ")
        rows.append((f"{label} as LoRA rank {rank} on the teacher ({how})", here.trainable + alt[0], here.bytes + alt[1]))
        if student_delta is not None:
            rows.append((f"LoRA rank 64 student and {label} as LoRA rank {rank}", here.trainable + alt[0] + student_delta[0],
                         here.bytes + alt[1] + student_delta[1]))
    print(f"memory estimate (weights, gradients, {opt} state{', EMA' if ema else ''}; activations excluded; "
          f"'fits': under {ONE_GPU_GB} GB, one GPU's memory, before activations):")
    for label, trainable, nbytes in rows:
        fits = "fits" if nbytes < ONE_GPU_GB * 1e9 else ""
        print(f"  {label:<52} {trainable:>15,} trainable  {nbytes / 2**30:8.3f} GiB  {fits}")
    teacher_only = own_bytes(teacher, [student, *extra.values()])  # kept whole under fsdp_teacher: replicate
    unit = largest_unit_bytes([student, teacher, *extra.values()])
    current = (recipe.train.parallel, recipe.train.fsdp_teacher)
    print(f"per process on {processes} processes (--num-processes; this run: train.parallel={current[0]}"
          f"{', train.fsdp_teacher=' + current[1] if current[0] == 'fsdp' else ''}):")
    for label, parallel, placement in (("ddp: every network on every process", "ddp", None),
                                       ("fsdp, teacher replicated", "fsdp", "replicate"),
                                       ("fsdp, teacher sharded", "fsdp", "shard")):
        gib = per_process_bytes(here.bytes, teacher_only if placement == "replicate" else 0.0, unit,
                                processes=processes, parallel=parallel) / 2**30
        print(f"  {label:<44} {gib:8.3f} GiB")


def run(args: argparse.Namespace) -> int:
    from ..run import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        if args.num_processes < 1:
            raise FewstepError(f"--num-processes {args.num_processes}: the number of processes must be at least 1")
        return dry_run(recipe, args.num_processes)
    result = run_recipe(recipe)
    where = f"; final model in {result.final_dir}" if result.final_dir else ""
    messages = {"finished": f"finished at step {result.step}{where}",
                "interrupted": f"interrupted at step {result.step}; checkpoint {result.checkpoint}; run the same command to resume",
                "time_limit": f"stopped at train.max_wall_time, step {result.step}; run the same command to resume"}
    print(f"fewstep: {messages[result.status]}")
    return EXIT[result.status]
