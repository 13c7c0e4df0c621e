"""The loop's settings: one dataclass. The recipe's ``train`` section (fewstep.config.TrainSection) extends it
with the keys only the builders read, so a field is declared once and a renamed one cannot fall back to a default."""
from __future__ import annotations

from dataclasses import dataclass, field

#: train.parallel: accelerate's DistributedDataParallel, or PyTorch's FSDP2 (fewstep/sharding.py)
PARALLEL = ("ddp", "fsdp")
#: train.fsdp_teacher: the frozen teacher whole on every process, or sharded like the trained networks
TEACHER_PLACEMENT = ("replicate", "shard")


@dataclass
class LoopSettings:
    """How the loop runs. Run-length keys (fewstep.config.RUN_LENGTH_KEYS) may change between a run and its resume."""

    output_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 16  # the batch of all processes together
    launch_processes: int = 1  # the processes the recipe's batch is set for (batch_size / launch_processes each)
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | none | a checkpoint path
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    clip_grad_norm: float | None = 1.0
    ema_decay: float | None = None
    ema_warmup: bool = True  # diffusers EMAModel's warm-up: decay_t = min(ema_decay, (1 + t) / (10 + t)) (fewstep/ema.py)
    export_ema: bool = True
    log_every: int = 10
    sample_every: int = 0
    eval_every: int = 0
    max_wall_time: float = 0.0  # seconds; 0 = no limit
    nonfinite: str = "stop"  # stop | skip
    num_workers: int = 0
    progress: bool = True
    trackers: list[str] = field(default_factory=list)
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 shards every trained network; fewstep/sharding.py, docs/scaleout.md)
    fsdp_teacher: str = "replicate"  # replicate | shard: the frozen teacher under parallel=fsdp
    compile: bool = False  # torch.compile every network the loss calls, per block (fewstep/compiling.py)


def divisors(batch_size: int) -> list[int]:
    """The process counts a global ``batch_size`` splits over evenly."""
    return [n for n in range(1, batch_size + 1) if batch_size % n == 0]
