"""The one distillation loop. It runs any loss object and never asks which one.

Per optimizer step: ``phase = loss.phase_for(step)``; for each micro-batch,
``out = loss(phase, batch, student, teacher)`` and ``backward(out.loss / grad_accum)``; clip the
phase's gradients; step the phase's optimizer and LR schedule; ``loss.on_step_end``; update the
student's EMA. Everything else (devices, precision, checkpoints, logs, sample grids, signals,
time limits, export) lives here once, on accelerate.
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import (flatten_state, latest_intact, load_checkpoint, rng_state, save_checkpoint, set_rng_state,
                         unflatten_state)
from .data.plan import BatchPlan, BatchSource, is_stream
from .denoisers import Denoiser
from .ema import EMA
from .errors import FewstepError, lookup
from .losses.base import DistillationLoss


@dataclass
class LoopSettings:
    """Plain values the loop runs with (builders fill them from a recipe's ``train`` section)."""

    output_dir: Path
    max_steps: int
    batch_size: int
    seed: int = 0
    grad_accum: int = 1
    mixed_precision: str = "no"
    clip_grad_norm: float | None = 1.0
    ema_decay: float | None = None
    ema_warmup: bool = True  # diffusers EMAModel's warm-up: decay_t = min(ema_decay, (1 + t) / (10 + t)) (fewstep/ema.py)
    export_ema: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_every: int = 0
    eval_every: int = 0
    max_wall_time: float = 0.0
    nonfinite: str = "stop"
    progress: bool = True
    num_workers: int = 0
    resume: str = "auto"
    trackers: list[str] = field(default_factory=list)
    best_metric: str | None = None  # keep the model with the lowest value of this evaluation metric in best/


@dataclass
class PhaseOptimizer:
    """A phase's optimizer (torch.optim class name + keyword arguments) and LR schedule; ``groups``: for a
    module the phase trains, keyword arguments of its own parameter group (its lr, betas, ...)."""

    name: str = "AdamW"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-4})
    scheduler: str = "constant"
    warmup_steps: int = 0
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class LoopResult:
    step: int
    status: str  # finished | interrupted | time_limit
    checkpoint: Path | None
    final_dir: Path | None


def optimizer_classes() -> dict[str, type]:
    return {n: c for n, c in vars(torch.optim).items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
            and c is not torch.optim.Optimizer}


def scheduler_names() -> tuple[str, ...]:
    from diffusers.optimization import SchedulerType

    return tuple(s.value for s in SchedulerType)


def trainable(module: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def freeze_teacher(teacher: nn.Module, loss: nn.Module) -> nn.Module:
    """Freeze the teacher, except for what the loss trains on top of it (a LoRA fake score's adapters)."""
    on_top = [p for m in loss.modules_to_train().values() for p in m.parameters() if p.requires_grad]
    teacher.requires_grad_(False)
    for p in on_top:
        p.requires_grad_(True)
    return teacher


def trained_state(module: nn.Module) -> dict[str, Tensor]:
    """What a checkpoint keeps of a module: its trainable parameters and its buffers (frozen base
    weights under LoRA adapters come from the model, not the checkpoint)."""
    return {**trainable(module), **dict(module.named_buffers())}


SHARED_KEYS = ("loss", "lr", "grad_norm")


class _Stop:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the end of the step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Stop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Loop:
    """Owns the accelerator, optimizers, EMA and checkpoints of one run. Use ``run()``."""

    def __init__(
        self,
        *,
        student: Denoiser,
        teacher: Denoiser | None,
        loss: DistillationLoss,
        dataset,
        settings: LoopSettings,
        optimizers: dict[str, PhaseOptimizer],
        prepare: Callable[[dict], dict] | None = None,
        sample_fn: Callable[[Denoiser], Tensor] | None = None,
        save_samples: Callable[[Tensor, Path], None] | None = None,
        evaluate: Callable[[Denoiser, int], dict[str, float]] | None = None,
        export: Callable[[Denoiser, Path], None] | None = None,
        fingerprint: dict[str, Any] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        s = settings
        self.s, self.loss, self.teacher, self.log = s, loss, teacher, log
        self.prepare, self.sample_fn, self.save_samples = prepare, sample_fn, save_samples
        self.evaluate, self.export, self.fingerprint = evaluate, export, fingerprint or {}
        trackers = list(s.trackers) or None
        # accelerate keeps one state per process; a new run (a test, the next stage) may ask for another
        # precision. The process group (PartialState) stays.
        AcceleratorState._reset_state(reset_partial_state=False)
        try:
            self.acc = Accelerator(mixed_precision=s.mixed_precision, cpu=not torch.cuda.is_available(),
                                   log_with=trackers, project_dir=str(s.output_dir))
        except (ValueError, ImportError) as e:
            raise FewstepError(f"accelerate cannot start: {str(e).splitlines()[0]}") from None
        kind = self.acc.distributed_type.value
        if kind != "NO" and not kind.startswith("MULTI_"):
            raise FewstepError(f"accelerate's distributed_type {kind} is not supported (checkpoints and the EMA read whole, "
                               "unsharded parameters); use DistributedDataParallel: distributed_type MULTI_GPU "
                               "(recipes/accelerate/)")
        device = self.acc.device
        self.student = student.to(device)
        if teacher is not None:
            freeze_teacher(teacher, loss).eval().to(device)
        self.loss.to(device)
        self.modules: dict[str, nn.Module] = {"student": student.net, **loss.modules_to_train()}
        for name in self.modules:
            self.modules[name].train()
        world = self.acc.num_processes
        if s.batch_size % world:
            raise FewstepError(f"train.batch_size {s.batch_size} does not split evenly across {world} processes; "
                               f"use a multiple of {world} (it is the batch of all processes together)")
        # accelerate wraps each trained network (DistributedDataParallel when several processes run); the
        # student and the loss call the wrappers, whose backward averages gradients across processes
        self.wrapped = {n: self.acc.prepare_model(m) for n, m in self.modules.items()}
        for w in self.wrapped.values():  # drop the autocast prepare puts on each forward: the loss runs under the
            self.acc.unwrap_model(w, keep_fp32_wrapper=False)  # loop's autocast, and a float16 teacher opts out of it
        self._install(self.wrapped)
        self.phase_steps = {p: 0 for p in loss.phases}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.phase_params: dict[str, list[Tensor]] = {}
        totals = {p: 0 for p in loss.phases}
        for step in range(s.max_steps):
            totals[loss.phase_for(step)] += 1
        for phase in loss.phases:
            names = loss.phase_modules(phase)
            for n in names:
                lookup(self.modules, n, f"module of phase {phase!r}")
            per_module = {n: list(trainable(self.modules[n]).values()) for n in names}
            params = [p for ps in per_module.values() for p in ps]
            if not params:
                raise FewstepError(f"phase {phase!r} has no trainable parameters (modules {', '.join(names)})")
            spec = optimizers.get(phase) or optimizers.get("default") or PhaseOptimizer()
            cls = lookup(optimizer_classes(), spec.name, "optimizer")
            own = [n for n in names if n in spec.groups]
            rest = [p for n in names if n not in spec.groups for p in per_module[n]]
            opt = cls([*([{"params": rest}] if rest else []),
                       *({"params": per_module[n], **spec.groups[n]} for n in own)], **spec.kwargs)
            from diffusers.optimization import get_scheduler

            if spec.scheduler not in scheduler_names():
                raise FewstepError(f"unknown lr_scheduler {spec.scheduler!r}; valid: {', '.join(scheduler_names())}")
            self.schedulers[phase] = get_scheduler(spec.scheduler, opt, num_warmup_steps=spec.warmup_steps,
                                                   num_training_steps=max(1, totals[phase]))
            self.optimizers[phase] = self.acc.prepare_optimizer(opt)
            self.phase_params[phase] = params
        self.ema: EMA | None = None
        student_trainable = trainable(self.modules["student"])
        self.ema_names = list(student_trainable)
        self.student_params = list(student_trainable.values())  # cached: walking modules each step is slow
        if s.ema_decay is not None:
            self.ema = EMA(self.student_params, s.ema_decay, warmup=s.ema_warmup)
        self.plan = BatchPlan(None if is_stream(dataset) else len(dataset), s.batch_size // world, s.grad_accum,
                              world, s.seed)
        self.dataset = dataset
        self.best: float | None = None
        self.step = 0
        self.ckpt_root = Path(s.output_dir) / "checkpoints"
        self.log_path = Path(s.output_dir) / "log.jsonl"

    # ------------------------------------------------------------------ accelerate's wrappers
    def _install(self, modules: dict[str, nn.Module]) -> None:
        for name, m in modules.items():
            if name == "student":
                self.student.net = m
            else:
                self.loss.swap_module(name, m)

    @contextlib.contextmanager
    def bare(self):
        """The bare networks in place of accelerate's wrappers (sampling, evaluation and export run on the
        main process alone, where a wrapper's forward would wait for the other processes)."""
        if all(w is self.modules[n] for n, w in self.wrapped.items()):
            yield
            return
        self._install(self.modules)
        try:
            yield
        finally:
            self._install(self.wrapped)

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    @contextlib.contextmanager
    def ema_weights(self):
        """Temporarily load the EMA weights into the student (no-op without EMA)."""
        with (self.ema.swap_in(self.student_params) if self.ema is not None else contextlib.nullcontext()):
            yield

    # ------------------------------------------------------------------ checkpoints
    def _state_groups(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        groups: dict[str, dict[str, Tensor]] = {}
        for name, m in self.modules.items():
            groups["student" if name == "student" else f"module.{name}"] = trained_state(self.acc.unwrap_model(m))
        if self.ema is not None:
            groups["ema"] = dict(zip(self.ema_names, self.ema.averages))
        extra = self.loss.extra_state()
        if extra:
            groups["loss_state"] = extra
        skeletons = {}
        for phase in self.loss.phases:
            skel, tensors = flatten_state(self.optimizers[phase].state_dict(), f"optim.{phase}")
            groups[f"optim.{phase}"] = tensors
            skeletons[f"optim.{phase}"] = skel
            skeletons[f"sched.{phase}"], t2 = flatten_state(self.schedulers[phase].state_dict(), f"sched.{phase}")
            if t2:
                groups[f"sched.{phase}"] = t2
        skel, tensors = flatten_state(rng_state(), "rng")
        groups["rng"], skeletons["rng"] = tensors, skel
        state = {"step": self.step, "phase_steps": self.phase_steps, "skeletons": skeletons, "fingerprint": self.fingerprint,
                 "best": self.best, "ema_updates": self.ema.updates if self.ema is not None else 0}
        return groups, state

    def save(self) -> Path | None:
        path = None
        if self.acc.is_main_process:
            groups, state = self._state_groups()
            path = save_checkpoint(self.ckpt_root, self.step, groups, state, keep=self.s.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def _find_resume(self) -> Path | None:
        r = self.s.resume
        if r == "none":
            return None
        if r == "auto":
            return latest_intact(self.ckpt_root, report=self.log)
        path = Path(r)
        if not path.is_dir():
            raise FewstepError(f"train.resume={r}: no such checkpoint directory (use auto, none, or a checkpoints/step-N path)")
        return path

    def restore(self, path: Path) -> None:
        groups, state = load_checkpoint(path)
        for name, m in self.modules.items():
            group = "student" if name == "student" else f"module.{name}"
            net = self.acc.unwrap_model(m)
            if set(groups.get(group, {})) != set(trained_state(net)):
                raise FewstepError(f"checkpoint {path} does not fit this {name} (different trainable parameters)")
            net.load_state_dict(groups[group], strict=False)
        if self.ema is not None:
            if "ema" not in groups:
                raise FewstepError(f"checkpoint {path} has no EMA weights but train.ema_decay is set")
            self.ema.averages = [groups["ema"][n].float().to(self.acc.device) for n in self.ema_names]
        self.loss.load_extra_state(groups.get("loss_state", {}))
        sk = state["skeletons"]
        for phase in self.loss.phases:
            self.optimizers[phase].load_state_dict(unflatten_state(sk[f"optim.{phase}"], groups[f"optim.{phase}"]))
            self.schedulers[phase].load_state_dict(unflatten_state(sk[f"sched.{phase}"], groups.get(f"sched.{phase}", {})))
        set_rng_state(unflatten_state(sk["rng"], groups["rng"]))
        self.step = int(state["step"])
        self.phase_steps = dict(state["phase_steps"])
        self.best = state.get("best")
        if self.ema is not None:  # checkpoints written before the warm-up existed: the student's updates so far
            self.ema.updates = int(state.get("ema_updates", sum(n for p, n in self.phase_steps.items()
                                                                if "student" in self.loss.phase_modules(p))))

    # ------------------------------------------------------------------ one step
    def _no_sync(self, phase: str, last: bool):
        """Gradients are averaged across processes once per optimizer step (the last micro-batch), and only
        for the networks the phase trains (the others may get gradients, which are thrown away)."""
        stack = contextlib.ExitStack()
        if self.acc.num_processes > 1:
            trained = self.loss.phase_modules(phase)
            for n, m in self.wrapped.items():
                if not last or n not in trained:
                    stack.enter_context(self.acc.no_sync(m))
        return stack

    def _everywhere(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process (so all of them skip or stop together)."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() == 0)

    def train_step(self, source: BatchSource) -> dict[str, Any]:
        phase = self.loss.phase_for(self.step)
        logs: dict[str, Any] = {}
        total = torch.zeros((), device=self.acc.device)
        finite = True
        for micro in range(self.s.grad_accum):
            batch = source.get(self.step, micro)
            batch = {k: (v.to(self.acc.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            if self.prepare is not None:
                batch = self.prepare(batch)
            with self._no_sync(phase, micro == self.s.grad_accum - 1), self.acc.autocast():
                out = self.loss(phase, batch, self.student, self.teacher)
            loss = out.loss / self.s.grad_accum
            finite = finite and bool(torch.isfinite(loss))
            self.acc.backward(loss)
            total = total + loss.detach()
            for k, v in out.logs.items():
                logs[k] = logs.get(k, 0.0) + (v.detach().float() if isinstance(v, Tensor) else float(v)) / self.s.grad_accum
        params = self.phase_params[phase]
        if self.s.clip_grad_norm is not None:
            norm = self.acc.clip_grad_norm_(params, self.s.clip_grad_norm)
            logs["grad_norm"] = norm.detach() if isinstance(norm, Tensor) else float(norm)
            finite = finite and bool(torch.isfinite(torch.as_tensor(norm)))
        finite = self._everywhere(finite)
        if not finite:
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            if self.s.nonfinite == "stop":
                raise FewstepError(f"non-finite loss or gradient at step {self.step} (phase {phase}); the run stopped and "
                                   f"the newest checkpoint is the last good one (train.nonfinite=skip skips such steps)")
            logs["skipped_nonfinite"] = 1.0
        else:
            self.optimizers[phase].step()
            self.schedulers[phase].step()
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            self.loss.on_step_end(phase, self.student)
            if self.ema is not None and "student" in self.loss.phase_modules(phase):
                self.ema.update(self.student_params)
        self.phase_steps[phase] += 1
        logs["loss"] = logs.get("loss", total)
        logs["phase"] = phase
        logs["lr"] = self.schedulers[phase].get_last_lr()[0]
        self.step += 1
        return logs

    # ------------------------------------------------------------------ run
    def _mean_over_processes(self, values: dict[str, Any]) -> dict[str, float]:
        """Logged values averaged over the processes (each saw its own part of the batch)."""
        if self.acc.num_processes == 1 or not values:
            return {k: float(v) for k, v in values.items()}
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.acc.device)
        t = self.acc.reduce(t, reduction="mean")
        return dict(zip(values, t.tolist()))

    def _write_log(self, row: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.s.trackers:
                self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def _samples(self) -> None:
        if self.sample_fn is None or self.save_samples is None or not self.acc.is_main_process:
            return
        with self.bare(), self.ema_weights():
            self.student.eval()
            samples = self.sample_fn(self.student)
            self.student.train()
        self.save_samples(samples, Path(self.s.output_dir) / "samples" / f"step-{self.step:08d}.png")

    def _evaluate(self) -> None:
        if self.evaluate is None or not self.acc.is_main_process:
            return
        improved = False
        with self.bare(), self.ema_weights():
            self.student.eval()
            metrics = self.evaluate(self.student, self.step)
            self.student.train()
            key = self.s.best_metric
            improved = key is not None and key in metrics and (self.best is None or metrics[key] < self.best)
            if improved and self.export is not None:
                self.best = metrics[key]
                self._export_to(Path(self.s.output_dir) / "best", ema=False)  # EMA weights are already loaded
        self._write_log({"step": self.step, "eval": True, **metrics, **({"best": True} if improved else {})})

    def run(self) -> LoopResult:
        s = self.s
        Path(s.output_dir).mkdir(parents=True, exist_ok=True)
        resume = self._find_resume()
        if resume is not None:
            self.restore(resume)
            self.log(f"fewstep: resumed from {resume} at step {self.step}")
        if self.acc.num_processes > 1 and self.acc.is_main_process:
            self.log(f"fewstep: {self.acc.num_processes} processes ({self.acc.distributed_type.value}), "
                     f"{self.plan.b} samples each per micro-batch")
        if s.trackers and self.acc.is_main_process:
            self.acc.init_trackers(Path(s.output_dir).name)
        source = BatchSource(self.dataset, self.plan, rank=self.acc.process_index, start_step=self.step,
                             num_workers=s.num_workers)
        start_time, last_ckpt = time.monotonic(), None
        status = "finished"
        bar = tqdm(total=s.max_steps, initial=self.step, desc="distill", disable=not (s.progress and self.acc.is_main_process),
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
        acc_logs: dict[str, float] = {}
        acc_counts: dict[str, int] = {}
        count, window_start = 0, time.monotonic()
        with _Stop() as stop:
            while self.step < s.max_steps:
                logs = self.train_step(source)
                count += 1
                for k, v in logs.items():
                    if k == "phase":
                        continue
                    # multi-phase losses: a phase's own value is averaged over the steps that logged it,
                    # and the shared keys (loss, lr, grad_norm) also per phase, as phase/key
                    for key in (k, f"{logs['phase']}/{k}") if len(self.loss.phases) > 1 and k in SHARED_KEYS else (k,):
                        acc_logs[key] = acc_logs.get(key, 0.0) + v
                        acc_counts[key] = acc_counts.get(key, 0) + 1
                bar.update(1)
                if self.step % s.log_every == 0 or self.step == s.max_steps:
                    now = time.monotonic()
                    row = {"step": self.step, "phase": logs["phase"], "it_s": count / max(now - window_start, 1e-9),
                           **self._mean_over_processes({k: v / acc_counts[k] for k, v in acc_logs.items()})}
                    bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
                    self._write_log(row)
                    acc_logs, acc_counts, count, window_start = {}, {}, 0, now
                if s.sample_every and self.step % s.sample_every == 0:
                    self._samples()
                if s.eval_every and self.step % s.eval_every == 0:
                    self._evaluate()
                if self.step % s.checkpoint_every == 0 and self.step < s.max_steps:
                    last_ckpt = self.save()
                if stop.signal is not None:
                    status = "interrupted"
                    break
                if s.max_wall_time and time.monotonic() - start_time >= s.max_wall_time:
                    status = "time_limit"
                    break
        bar.close()
        if last_ckpt is None or int(last_ckpt.name.split("-")[1]) != self.step:
            last_ckpt = self.save()
        final = None
        if status == "finished":
            if s.sample_every:
                self._samples()
            final = self._export()
        if s.trackers:
            self.acc.end_training()
        return LoopResult(self.step, status, last_ckpt, final)

    def _export_to(self, target: Path, ema: bool) -> None:
        """Export the student atomically to ``target`` (written beside, then renamed)."""
        import shutil

        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with self.bare(), (self.ema_weights() if ema else contextlib.nullcontext()):
            self.export(self.student, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    def _export(self) -> Path | None:
        if self.export is None:
            return None
        final = Path(self.s.output_dir) / "final"
        if self.acc.is_main_process:
            self._export_to(final, ema=self.s.export_ema)
        self.acc.wait_for_everyone()
        return final


