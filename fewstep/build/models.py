"""Teachers and students from the recipe's ``teacher`` and ``student`` sections: networks, pipelines,
fewstep final/ directories, copies of the teacher, and the analytic mixture."""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ModelSection, check_kwargs
from ..denoisers import Denoiser, MixtureDenoiser, MLPDenoiser, MLPNet, UNetDenoiser
from ..errors import FewstepError
from ..schedules import FlowSchedule, Schedule
from .resolve import resolve_stage


@dataclass
class LoadedModel:
    """A teacher or student as built: its denoiser (None for ``kind: none``), its kind (unet2d, mlp, mixture,
    pipeline, classifier) and, for latent models, its diffusers pipeline (VAE, text encoders)."""

    denoiser: Denoiser | None
    kind: str
    pipeline: Any = None


class PlainNetwork(torch.nn.Module):
    """A trained network that is not a denoiser (the digits feature network): the loop only needs ``net``."""

    null_cond = None

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net


def network_class(kind: str):
    from diffusers import UNet2DModel

    from ..eval.digits_net import DigitsFeatureNet

    return {"unet2d": UNet2DModel, "mlp": MLPNet, "classifier": DigitsFeatureNet}[kind]


def _null_for_unet(net) -> dict[str, Tensor] | None:
    n = getattr(net.config, "num_class_embeds", None)
    return {"class_labels": torch.tensor([n - 1])} if n else None


def wrap_denoiser(net, kind: str, schedule: Schedule, prediction_type: str, spec: ModelSection, null=None) -> Denoiser:
    if kind == "mlp":
        return MLPDenoiser(net, schedule, prediction_type, precondition=spec.precondition,
                           **({"null_cond": null} if null else {}))
    return UNetDenoiser(net, schedule, prediction_type, null_cond=null if null is not None else _null_for_unet(net))


def with_guidance_embedding(unet, dim: int):
    """A copy of a UNet2DConditionModel with LCM's guidance-scale embedding input (``time_cond_proj_dim``).

    The new projection (time_embedding.cond_proj) starts at zero, so the copy computes exactly what
    the original does until training moves it. Luo et al.'s code (luosiallen/latent-consistency-model) and diffusers'
    ``train_lcm_distill_sd_wds.py`` leave it at PyTorch's random Linear init instead, which adds a guidance-dependent
    offset to every timestep embedding from the first step (docs/recipes.md, sd15_lcm).
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise FewstepError(f"student.guidance_embedding needs a UNet2DConditionModel (SD, SDXL); got {type(unet).__name__}")
    if unet.config.time_cond_proj_dim is not None:
        return unet
    meta = any(p.is_meta for p in unet.parameters())  # --dry-run's weightless teacher: the copy stays weightless
    with torch.device("meta") if meta else nullcontext():
        new = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": int(dim)}).to(unet.dtype)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False, assign=meta)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise FewstepError(f"cannot add a guidance embedding to this UNet (missing {missing[:3]}, unexpected {unexpected[:3]})")
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new


def build_model(spec: ModelSection, key: str, schedule: Schedule, *, teacher: LoadedModel | None = None,
                stage_outputs: dict[str, Path] | None = None, seed: int = 0, weights: bool = True) -> LoadedModel:
    """The model of a ``teacher`` or ``student`` section; ``weights=False`` builds a pipeline from its configs on the
    meta device (``--dry-run``: sizes without loading a 12B model)."""
    stage_outputs = stage_outputs or {}
    if spec.kind == "none":
        return LoadedModel(None, "none")
    if spec.kind == "mixture":
        from ..data.mixtures import make_mixture

        mix = dict(spec.mixture)
        return LoadedModel(MixtureDenoiser(make_mixture(mix.pop("name", "ring"), **mix), schedule), "mixture")
    if spec.kind == "pipeline" and spec.init != "teacher":
        from ..pipelines import load_pipeline

        lp = load_pipeline(resolve_stage(spec.path, stage_outputs), resolution=spec.resolution, empty=not weights)
        return LoadedModel(lp.denoiser(), "pipeline", lp)
    if spec.kind == "pretrained":
        from ..export import load_final

        den, meta, lp = load_final(resolve_stage(spec.path, stage_outputs))
        return LoadedModel(den, "pipeline" if meta["kind"] == "lora" else meta["kind"], lp)  # a LoRA loads fused
    if spec.init == "teacher":
        if teacher is None or teacher.denoiser is None or not hasattr(teacher.denoiser, "net"):
            raise FewstepError(f"{key}.init=teacher needs a teacher network")
        t = teacher.denoiser
        net = copy.deepcopy(t.net)
        ptype = spec.prediction_type or t.prediction_type
        sched = t.schedule
        if spec.schedule == "flow" and sched.kind != "flow":
            # InstaFlow: the copy's output is read as the flow velocity u = z - x1 at t = 1000 s
            sched, ptype = FlowSchedule(sched.num_train_timesteps), "flow"
        if spec.guidance_embedding:
            net = with_guidance_embedding(net, spec.guidance_embedding)
        if teacher.pipeline is not None:
            return LoadedModel(teacher.pipeline.wrap(net, sched, ptype, null_cond=t.null_cond), "pipeline", teacher.pipeline)
        kind = "mlp" if isinstance(net, MLPNet) else "unet2d"
        return LoadedModel(wrap_denoiser(net, kind, sched, ptype, spec, t.null_cond), kind)
    cls = network_class(spec.kind)
    if spec.init == "path":
        path = Path(resolve_stage(spec.path, stage_outputs))
        sub = path / {"unet2d": "unet", "mlp": "mlp", "classifier": "classifier"}[spec.kind]
        net = cls.from_pretrained(sub if sub.is_dir() else path)
    else:
        torch.manual_seed(seed)
        net = cls(**check_kwargs(cls, spec.config, f"{key}.config"))
    if spec.kind == "classifier":
        return LoadedModel(PlainNetwork(net), "classifier")
    return LoadedModel(wrap_denoiser(net, spec.kind, schedule, spec.prediction_type or "epsilon", spec), spec.kind)


def cast_frozen(net: nn.Module, dtype: str) -> None:
    """Store ``net``'s weights and floating buffers in ``dtype`` (a name of config.DTYPES), all but its LoRA
    adapters, which train and stay float32 (diffusers' LoRA scripts: the frozen UNet in weight_dtype,
    cast_training_params for the adapters)."""
    to = getattr(torch, dtype)
    for n, p in net.named_parameters():
        if "lora_" not in n and p.dtype != to:
            p.data = p.data.to(to)
    for b in net.buffers():
        if b.is_floating_point() and b.dtype != to:
            b.data = b.data.to(to)


def cast_teacher(teacher: LoadedModel, dtype: str) -> None:
    """Cast a teacher network to ``train.teacher_dtype``; LoRA adapters on it (a ``teacher_lora`` fake score)
    stay float32, as they train."""
    den = teacher.denoiser
    if den is None or not hasattr(den, "net"):
        return
    cast_frozen(den.net, dtype)


def frozen_parts(*models: LoadedModel) -> list[nn.Module]:
    """The untrained pipeline parts of ``models`` (a student built from the teacher shares its pipeline): once each."""
    parts: dict[int, nn.Module] = {}
    for model in models:
        if model.pipeline is not None and not model.pipeline.empty:
            parts.update((id(part), part) for part in model.pipeline.frozen_parts())
    return list(parts.values())


def sample_shape(model: LoadedModel) -> tuple[int, ...]:
    den = model.denoiser
    if isinstance(den, MixtureDenoiser):
        return (den.mixture.dim,)
    if den.sample_shape is not None:  # pipeline denoisers know their latent shape
        return den.sample_shape
    net = den.net
    if isinstance(net, MLPNet):
        return (net.config.dim,)
    size = net.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return (net.config.in_channels, size, size)
