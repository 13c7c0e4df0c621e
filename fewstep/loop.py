"""The one distillation loop. It runs any loss object and never asks which one.

``Loop.run`` reads top to bottom: data -> phase -> forward/backward -> step -> EMA -> log -> sample/eval -> checkpoint ->
stop (signal, time limit) -> export. Per optimizer step: ``phase = loss.phase_for(step)``; for each micro-batch,
``out = loss(phase, batch, student, teacher)`` and ``backward(out.loss / grad_accum)``; clip the phase's
gradients; step the phase's optimizer and LR schedule; ``loss.on_step_end``; update the student's EMA.
The pieces live in their own modules: optimizers (fewstep.build.optim, built by the builders),
accelerate's wrappers (fewstep.networks), the checkpointed state (fewstep.checkpoint.TrainState), the
logging window (fewstep.logwindow), the EMA (fewstep.ema).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import TrainState, latest_intact
from .data.plan import BatchPlan, BatchSource, is_stream
from .denoisers import Denoiser
from .ema import EMA
from .errors import FewstepError
from .logwindow import LogWindow
from .losses.base import DistillationLoss
from .networks import TrainedNetworks, trainable
from .settings import LoopSettings, divisors
from .sharded_checkpoint import ShardedTrainState

if TYPE_CHECKING:
    from .sharding import Sharded


@dataclass
class LoopResult:
    step: int
    status: str  # finished | interrupted | time_limit
    checkpoint: Path | None
    final_dir: Path | None


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and exits at the end of the step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
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


def start_accelerator(settings: LoopSettings):
    """accelerate's Accelerator for this run (DDP or one process; sharded engines are refused)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one state per process; a new run (a test, the next stage) may ask for another
    # precision. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    if settings.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise FewstepError("train.mixed_precision fp16 on a CPU: CPUs have no fast float16 kernels (an SD step ran 9x "
                           "slower than float32) and nothing to scale losses for; use no or bf16 here, fp16 on a GPU")
    try:
        acc = Accelerator(mixed_precision=settings.mixed_precision, cpu=not torch.cuda.is_available(),
                          log_with=list(settings.trackers) or None, project_dir=str(settings.output_dir))
    except (ValueError, ImportError) as e:
        raise FewstepError(f"accelerate cannot start: {str(e).splitlines()[0]}") from None
    kind = acc.distributed_type.value
    if kind != "NO" and not kind.startswith("MULTI_"):
        raise FewstepError(f"accelerate's distributed_type {kind} is not supported (fewstep shards with FSDP2 itself, and "
                           "accelerate's would wrap the networks twice); launch with distributed_type MULTI_GPU "
                           "(recipes/accelerate/) and set train.parallel=fsdp to shard")
    if settings.batch_size % acc.num_processes:
        raise FewstepError(f"train.batch_size {settings.batch_size} (all processes together) does not split over "
                           f"{acc.num_processes} processes; valid process counts for it: "
                           f"{', '.join(map(str, divisors(settings.batch_size)))}, or train.batch_size="
                           f"{settings.batch_size // acc.num_processes * acc.num_processes or acc.num_processes} here")
    return acc


class Loop:
    """One run: the accelerator, the trained networks, their optimizers (one per phase, built by the builders),
    the EMA and the checkpointed state. Use ``run()``."""

    def __init__(
        self,
        *,
        student: Denoiser,
        teacher: Denoiser | None,
        loss: DistillationLoss,
        dataset,
        settings: LoopSettings,
        optimizers: dict[str, torch.optim.Optimizer],
        lr_schedulers: dict[str, Any],
        prepare: Callable[[dict], dict] | None = None,
        sample_fn: Callable[[Denoiser], Tensor] | None = None,
        save_samples: Callable[[Tensor, Path], None] | None = None,
        evaluate: Callable[[Denoiser, int], dict[str, float]] | None = None,
        best_metric: str | None = None,
        export: Callable[[Denoiser, Path], None] | None = None,
        fingerprint: dict[str, Any] | None = None,
        frozen: Sequence[torch.nn.Module] = (),
        log: Callable[[str], None] = print,
    ) -> None:
        self.settings, self.loss, self.teacher, self.log = settings, loss, teacher, log
        self.prepare, self.sample_fn, self.save_samples = prepare, sample_fn, save_samples
        self.evaluate, self.best_metric, self.export = evaluate, best_metric, export
        self.acc = start_accelerator(settings)
        self.student = student.to(self.acc.device)
        if teacher is not None:
            teacher.eval().to(self.acc.device)
        loss.to(self.acc.device)
        for net in frozen:  # what prepare, the loss and sampling run untrained (text encoders, VAE) runs there too
            net.eval().to(self.acc.device)
        self.networks = TrainedNetworks(student, loss)
        for net in self.networks.bare.values():
            net.train()
        self.sharded: Sharded | None = None
        self._own_group = False
        if settings.parallel == "fsdp":
            self._shard(optimizers)
        else:
            # DistributedDataParallel when several processes run; the forward autocast prepare adds is dropped: the
            # loss runs under the loop's autocast, and a float16 teacher opts out of it
            self.networks.prepare(self._wrap)
        if settings.compile:
            self._compile()
        self.optimizers = {p: self.acc.prepare_optimizer(o) for p, o in optimizers.items()}
        self.lr_schedulers = lr_schedulers
        self.phase_params = {p: [q for g in o.param_groups for q in g["params"]] for p, o in optimizers.items()}
        student_trainable = trainable(self.networks.bare["student"])
        self.student_params = list(student_trainable.values())  # cached: walking modules each step is slow
        self.ema = EMA(self.student_params, settings.ema_decay, warmup=settings.ema_warmup) \
            if settings.ema_decay is not None else None
        state_kwargs = dict(networks=self.networks.bare, optimizers=self.optimizers, lr_schedulers=lr_schedulers,
                            loss=loss, ema=self.ema, ema_names=list(student_trainable), fingerprint=fingerprint)
        self.state = TrainState(**state_kwargs) if self.sharded is None else \
            ShardedTrainState(main=self.acc.is_main_process, **state_kwargs)
        world = self.acc.num_processes
        self.plan = BatchPlan(None if is_stream(dataset) else len(dataset), settings.batch_size // world,
                              settings.grad_accum, world, settings.seed)
        self.dataset = dataset
        self.out = Path(settings.output_dir)

    def _shard(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """train.parallel=fsdp: FSDP2 shards every trained network per block, the loss's copies of the student and,
        with train.fsdp_teacher=shard, the teacher; the optimizers are re-pointed at the sharded parameters."""
        from . import sharding

        self._own_group = sharding.process_group(self.acc.device)
        self.sharded = sharding.Sharded(sharding.device_mesh(self.acc.device),
                                        sharding.mixed_precision_policy(self.settings.mixed_precision))
        bare = self.networks.bare
        before = {id(p): f"{n}.{q}" for n, m in bare.items() for q, p in m.named_parameters()}
        for name, net in bare.items():
            self.sharded.add(net, name if name == "student" else None)
        for path in self.loss.student_copies().values():
            self.sharded.add(self.loss.get_submodule(path))
        if self.teacher is not None and self.settings.fsdp_teacher == "shard":
            self.sharded.add(self.teacher.net)
        for name, net in bare.items():  # what a user (and the tests) check: each process holds about 1/N
            params = list(net.parameters())
            self.log(f"fewstep: fsdp process {self.acc.process_index} holds {sum(p.to_local().numel() for p in params)} "
                     f"of {sum(p.numel() for p in params)} {name} parameters")
        sharding.repoint_optimizers(optimizers, before, {f"{n}.{q}": p for n, m in bare.items()
                                                         for q, p in m.named_parameters()})

    def _compile(self) -> None:
        """train.compile: every network the loss calls (trained ones, the loss's student copies, the teacher)
        compiled per block, in place (fewstep.compiling)."""
        from .compiling import compile_regions

        nets = [*self.networks.bare.values(), *(self.loss.get_submodule(p) for p in self.loss.student_copies().values())]
        if self.teacher is not None and isinstance(getattr(self.teacher, "net", None), torch.nn.Module):
            nets.append(self.teacher.net)
        seen: set[int] = set()
        regions = 0
        for net in nets:
            if id(net) not in seen:
                seen.add(id(net))
                regions += compile_regions(net)
        self.log(f"fewstep: train.compile: {regions} regions of {len(seen)} networks compiled (the first steps "
                 "compile them)")

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        wrapped = self.acc.prepare_model(module)
        self.acc.unwrap_model(wrapped, keep_fp32_wrapper=False)  # removes the autocast forward, keeps a DDP wrapper
        return wrapped

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def phase_steps(self) -> dict[str, int]:
        return self.state.phase_steps

    @contextlib.contextmanager
    def ema_weights(self):
        """The student holds its EMA weights within the block (no-op without EMA)."""
        with torch.no_grad(), (self.ema.swap_in(self.student_params) if self.ema is not None else contextlib.nullcontext()):
            yield

    @contextlib.contextmanager
    def whole_student(self, ema: bool):
        """Every process enters; within the block the main process's student is whole and bare (EMA weights if
        ``ema``) for sampling, evaluation and export: the bare network in place of DDP's wrapper, or under fsdp a
        twin holding the gathered weights (a collective). Under DDP the other processes swap nothing in; under fsdp
        each swaps its EMA shard in, as the gathered weights are made of every process's shard."""
        here = self.sharded is not None or self.acc.is_main_process
        with self.ema_weights() if ema and here else contextlib.nullcontext():
            if self.sharded is None:
                with self.networks.unwrapped():
                    yield
                return
            with self.sharded.whole("student", self.networks.bare["student"], self.acc.device,
                                    self.acc.is_main_process) as twin:
                with self.networks.standing_in({"student": twin} if twin is not None else {}):
                    yield

    # ------------------------------------------------------------------ one step
    def _no_sync(self, phase: str, last: bool):
        """Gradients are averaged across processes once per optimizer step (the last micro-batch), and only
        for the networks the phase trains (the others may get gradients, which are thrown away)."""
        stack = contextlib.ExitStack()
        if self.sharded is not None:  # every network reduces on the last micro-batch: FSDP2 keeps unsynced gradients
            for m in self.networks.wrapped.values():  # outside .grad, where zero_grad would not clear them
                m.set_requires_gradient_sync(last)
        elif self.acc.num_processes > 1:
            trained = self.loss.phase_modules(phase)
            for n, m in self.networks.wrapped.items():
                if not last or n not in trained:
                    stack.enter_context(self.acc.no_sync(m))
        return stack

    def _everywhere(self, flag: bool) -> bool:
        """True when ``flag`` holds on every process (so all of them skip or stop together)."""
        if self.acc.num_processes == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() == 0)

    def _accumulate(self, phase: str, source: BatchSource) -> tuple[dict[str, Any], bool]:
        """Forward and backward over the step's micro-batches: (mean logs, whether every loss was finite)."""
        accum = self.settings.grad_accum
        logs: dict[str, Any] = {}
        total = torch.zeros((), device=self.acc.device)
        finite = True
        for micro in range(accum):
            batch = source.get(self.step, micro)
            batch = {k: (v.to(self.acc.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
            if self.prepare is not None:
                batch = self.prepare(batch)
            with self._no_sync(phase, micro == accum - 1), self.acc.autocast():
                out = self.loss(phase, batch, self.student, self.teacher)
            loss = out.loss / accum
            finite = finite and bool(torch.isfinite(loss))
            self.acc.backward(loss)
            total = total + loss.detach()
            for k, v in out.logs.items():
                logs[k] = logs.get(k, 0.0) + (v.detach().float() if isinstance(v, Tensor) else float(v)) / accum
        logs.setdefault("loss", total)
        return logs, finite

    def _clip(self, phase: str, logs: dict[str, Any]) -> bool:
        """Clip the phase's gradients to ``clip_grad_norm``; whether their norm is finite."""
        if self.settings.clip_grad_norm is None:
            return True
        if self.sharded is not None:
            from .sharding import clip_grad_norm_

            norm = clip_grad_norm_(self.phase_params[phase], self.settings.clip_grad_norm)
        else:
            norm = self.acc.clip_grad_norm_(self.phase_params[phase], self.settings.clip_grad_norm)
        logs["grad_norm"] = norm.detach() if isinstance(norm, Tensor) else float(norm)
        return bool(torch.isfinite(torch.as_tensor(norm)))

    def _zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def train_step(self, source: BatchSource) -> dict[str, Any]:
        """One optimizer step of the phase the loss runs now; its logs."""
        phase = self.loss.phase_for(self.step)
        logs, finite = self._accumulate(phase, source)
        if self.sharded is not None:
            self.sharded.reshard()
        finite = self._everywhere(self._clip(phase, logs) and finite)
        if finite:
            self.optimizers[phase].step()
            self.lr_schedulers[phase].step()
            self._zero_grad()
            self.loss.on_step_end(phase, self.student)
            if self.ema is not None and "student" in self.loss.phase_modules(phase):
                self.ema.update(self.student_params)
        else:
            self._zero_grad()
            if self.settings.nonfinite == "stop":
                raise FewstepError(f"non-finite loss or gradient at step {self.step} (phase {phase}); the run stopped and "
                                   f"the newest checkpoint is the last good one (train.nonfinite=skip skips such steps)")
            logs["skipped_nonfinite"] = 1.0
        self.state.phase_steps[phase] += 1
        self.state.step += 1
        return {**logs, "phase": phase, "lr": self.lr_schedulers[phase].get_last_lr()[0]}

    # ------------------------------------------------------------------ around the steps
    def save(self) -> Path | None:
        path = None
        if self.sharded is not None:  # every process writes its shards
            return self.state.save(self.out / "checkpoints", keep=self.settings.keep_checkpoints)
        if self.acc.is_main_process:
            path = self.state.save(self.out / "checkpoints", keep=self.settings.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def _find_resume(self) -> Path | None:
        r = self.settings.resume
        if r == "none":
            return None
        if r == "auto":
            return latest_intact(self.out / "checkpoints", report=self.log)
        path = Path(r)
        if not path.is_dir():
            raise FewstepError(f"train.resume={r}: no such checkpoint directory (use auto, none, or a checkpoints/step-N path)")
        return path

    def _mean_over_processes(self, values: dict[str, Any]) -> dict[str, float]:
        """Logged values averaged over the processes (each saw its own part of the batch)."""
        if self.acc.num_processes == 1 or not values:
            return {k: float(v) for k, v in values.items()}
        t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=self.acc.device)
        t = self.acc.reduce(t, reduction="mean")
        return dict(zip(values, t.tolist()))

    def _write_log(self, row: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.settings.trackers:
                self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def _samples(self) -> None:
        if self.sample_fn is None or self.save_samples is None:
            return
        with self.whole_student(ema=True):
            if not self.acc.is_main_process:
                return
            self.student.eval()
            samples = self.sample_fn(self.student)
            self.student.train()
        self.save_samples(samples, self.out / "samples" / f"step-{self.step:08d}.png")

    def _evaluate(self) -> None:
        if self.evaluate is None:
            return
        with self.whole_student(ema=True):
            if not self.acc.is_main_process:
                return
            self.student.eval()
            metrics = self.evaluate(self.student, self.step)
            self.student.train()
            key, best = self.best_metric, self.state.best
            improved = key is not None and key in metrics and (best is None or metrics[key] < best)
            if improved and self.export is not None:
                self.state.best = metrics[key]
                self._export_to(self.out / "best")  # EMA weights are already loaded
        self._write_log({"step": self.step, "eval": True, **metrics, **({"best": True} if improved else {})})

    def _export_to(self, target: Path) -> None:
        """Export the student as it stands (inside ``whole_student``) atomically to ``target`` (written beside,
        then renamed)."""
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.export(self.student, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)

    def _export(self) -> Path | None:
        if self.export is None:
            return None
        final = self.out / "final"
        with self.whole_student(ema=self.settings.export_ema):
            if self.acc.is_main_process:
                self._export_to(final)
        self.acc.wait_for_everyone()
        return final

    def _start(self) -> BatchSource:
        """Resume (if a checkpoint is there), start the trackers; the batches from the current step on."""
        self.out.mkdir(parents=True, exist_ok=True)
        resume = self._find_resume()
        if resume is not None:
            self.state.restore(resume)
            self.log(f"fewstep: resumed from {resume} at step {self.step}")
        n, planned = self.acc.num_processes, self.settings.launch_processes
        if (n > 1 or planned != 1) and self.acc.is_main_process:
            note = "" if n == planned else (f"; the recipe is set for {planned} (train.launch_processes: "
                                            f"{self.settings.batch_size // planned} samples each)")
            self.log(f"fewstep: {n} process{'es' if n > 1 else ''} ({self.acc.distributed_type.value}), "
                     f"{self.plan.b} samples each per micro-batch{note}")
        if self.settings.trackers and self.acc.is_main_process:
            self.acc.init_trackers(self.out.name)
        return BatchSource(self.dataset, self.plan, rank=self.acc.process_index, start_step=self.step,
                           num_workers=self.settings.num_workers)

    # ------------------------------------------------------------------ run
    def run(self) -> LoopResult:
        s = self.settings
        source = self._start()
        start_time, last_ckpt, status = time.monotonic(), None, "finished"
        bar = tqdm(total=s.max_steps, initial=self.step, desc="distill", disable=not (s.progress and self.acc.is_main_process),
                   dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10.0)
        window = LogWindow(multi_phase=len(self.loss.phases) > 1)
        with StopSignal() as stop:
            while self.step < s.max_steps:
                # Data, phase, forward/backward, optimizer step, EMA.
                logs = self.train_step(source)
                bar.update(1)
                # Log.
                window.add(logs)
                if self.step % s.log_every == 0 or self.step == s.max_steps:
                    means, it_s = window.close()
                    row = {"step": self.step, "phase": logs["phase"], "it_s": it_s, **self._mean_over_processes(means)}
                    bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
                    self._write_log(row)
                # Sample and evaluate.
                if s.sample_every and self.step % s.sample_every == 0:
                    self._samples()
                if s.eval_every and self.step % s.eval_every == 0:
                    self._evaluate()
                # Save a checkpoint.
                if self.step % s.checkpoint_every == 0 and self.step < s.max_steps:
                    last_ckpt = self.save()
                # Stop early on a signal or the time limit.
                if stop.signal is not None:
                    status = "interrupted"
                    break
                if s.max_wall_time and time.monotonic() - start_time >= s.max_wall_time:
                    status = "time_limit"
                    break
        bar.close()
        if last_ckpt is None or int(last_ckpt.name.split("-")[1]) != self.step:
            last_ckpt = self.save()
        # Export the student.
        final = None
        if status == "finished":
            if s.sample_every:
                self._samples()
            final = self._export()
        if s.trackers:
            self.acc.end_training()
        if self._own_group:  # the one-process group fsdp started; the sharded networks are done with
            torch.distributed.destroy_process_group()
            self._own_group = False
        return LoopResult(self.step, status, last_ckpt, final)
