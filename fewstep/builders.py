"""The one place that reads a recipe and builds objects, passing plain arguments to each component."""
from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .config import ModelSection, Recipe, check_kwargs
from .data.plan import ArrayDataset, is_stream
from .denoisers import Denoiser, MixtureDenoiser, MLPDenoiser, MLPNet, SD3Denoiser, UNetDenoiser
from .errors import FewstepError, check_choice, lookup
from .generate import cycling_conditions
from .loop import LoopSettings, PhaseOptimizer, optimizer_classes, scheduler_names
from .losses import loss_class
from .schedules import SCHEDULES, FlowSchedule, Schedule
from .solvers import SOLVERS, sample

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: loss constructor arguments the builder supplies (from the models), never the recipe
LOSS_INJECTED = ("teacher", "student", "schedule", "pipeline", "decoder", "fake_score", "discriminator", "sample_shape")


# ----------------------------------------------------------------------------- data
def digits_data(resolution: int = 8, classes: list[int] | None = None, labels: bool = True) -> ArrayDataset:
    """sklearn digits: x0 in [-1, 1] and class_labels. ``labels: false`` gives every image the null class
    (10, the index fewstep's class-conditional digits models reserve for "no label"), like a folder of
    unlabelled images: training then shapes the model's unconditional samples."""
    from .data.digits import NUM_CLASSES, DigitsDataset

    ds = DigitsDataset(resolution, classes)
    y = ds.labels if labels else torch.full_like(ds.labels, NUM_CLASSES)
    return ArrayDataset({"x0": ds.images, "class_labels": y})


def mixture_data(mixture: str = "ring", size: int = 100_000, seed: int = 0, conditional: bool = False, **kwargs: Any) -> ArrayDataset:
    """``size`` fixed samples of the named ``mixture`` (ring, imbalanced_ring, random; plus its arguments),
    with their mode as class_labels when ``conditional``."""
    from .data.mixtures import make_mixture

    m = make_mixture(mixture, **kwargs)
    x, k = m.sample(size, torch.Generator().manual_seed(seed), return_components=True)
    return ArrayDataset({"x0": x, "class_labels": k} if conditional else {"x0": x})


def _images(root: str, resolution: int, resize: bool = True, channels: int = 3):
    from .data.images import ImageFolder

    return ImageFolder(root, resolution, resize=resize, channels=channels)


def _tar(shards: str, resolution: int, resize: bool = True):
    from .data.tar_shards import TarShards

    return TarShards(shards, resolution, resize=resize)


def _hf(name: str, resolution: int, split: str = "train", image_column: str = "image", caption_column: str | None = "text",
        label_column: str | None = None, resize: bool = True):
    from .data.hf import HFImageDataset

    return HFImageDataset(name, resolution, split=split, image_column=image_column, caption_column=caption_column,
                          label_column=label_column, resize=resize)


def _prompts(path: str | None = None):
    """One prompt a line; without a path, fewstep's 40 built-in prompts (fewstep/assets/prompts.txt)."""
    from .data.prompts import PromptDataset

    return PromptDataset(path or Path(__file__).parent / "assets" / "prompts.txt")


def _pairs(path: str):
    from .pairs import PairsDataset

    return PairsDataset(path)


def _cache(path: str):
    from .data.cache import CachedDataset

    return CachedDataset(path)


DATA: dict[str, Callable[..., Any]] = {
    "digits": digits_data, "mixture": mixture_data, "images": _images, "tar": _tar, "hf": _hf,
    "prompts": _prompts, "cache": _cache, "pairs": _pairs,
}


# ----------------------------------------------------------------------------- checks without building
def _split(section: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    section = dict(section)
    return section.pop("name"), section


def check_recipe(recipe: Recipe) -> None:
    """Every name and keyword in a recipe, checked without loading any model or data."""
    name, kw = _split(recipe.schedule)
    check_kwargs(lookup(SCHEDULES, name, "schedule"), kw, "schedule")
    if not recipe.loss:
        raise FewstepError("missing section loss (with loss.name)")
    name, loss_kw = _split(recipe.loss)
    cls = loss_class(name)
    check_kwargs(cls, loss_kw, "loss", skip=LOSS_INJECTED)
    for key, valid in getattr(cls, "choices", {}).items():
        if key in loss_kw:
            check_choice(loss_kw[key], valid, key)
    cls.check(**loss_kw)
    if not recipe.data:
        raise FewstepError("missing section data (with data.name)")
    name, kw = _split(recipe.data)
    check_kwargs(lookup(DATA, name, "data"), kw, "data")
    # every phase the loss class can run (adversarial CD's discriminator too; ``phases_for`` is always a subset):
    # one the settings leave out is accepted, so a recipe may configure the discriminator an override brings in;
    # and the modules that train as a parameter group of a phase (f-distill's discriminator)
    phases = (*cls.phases, *cls.groups)
    for phase, spec in [("default", recipe.optimizer), *recipe.optimizers.items()]:
        if phase != "default" and phase not in phases:
            raise FewstepError(f"unknown optimizers.{phase}: loss {recipe.loss['name']} has phases {', '.join(phases)}")
        if phase in cls.groups and "name" in (spec or {}):
            raise FewstepError(f"optimizers.{phase}.name: {phase} trains as a parameter group of another phase's "
                               "optimizer; set its lr, betas or weight_decay, not another optimizer")
        merged = {**recipe.optimizer, **(spec or {})}
        opt_name, kw = _split(merged)
        cls_opt = lookup(optimizer_classes(), opt_name, "optimizer")
        check_kwargs(cls_opt, kw, "optimizer", skip=("params",))
        _check_optimizer_values(cls_opt, kw, "optimizer" if phase == "default" else f"optimizers.{phase}",
                                recipe.lr_scheduler)
    if recipe.lr_scheduler.name not in scheduler_names():
        raise FewstepError(f"unknown lr_scheduler.name {recipe.lr_scheduler.name!r}; valid: {', '.join(scheduler_names())}")
    lookup(SOLVERS, recipe.sample.solver, "sample.solver")
    if recipe.evaluation is not None:
        from .eval.evaluate import FEATURES

        check_choice(recipe.evaluation.features, FEATURES, "evaluation.features")
        if recipe.evaluation.num < 2:
            raise FewstepError(f"evaluation.num must be at least 2, got {recipe.evaluation.num}")
    for key, spec in (("teacher", recipe.teacher), ("student", recipe.student)):
        _check_model(spec, key)
    if recipe.student.init == "teacher" and recipe.teacher.kind in ("none", "mixture"):
        raise FewstepError(f"student.init=teacher needs a teacher network; teacher.kind is {recipe.teacher.kind}")
    for tracker in recipe.train.trackers:
        from accelerate.utils import LoggerType

        valid = [t.value for t in LoggerType if t.value != "all"]
        if tracker not in valid:
            raise FewstepError(f"unknown train.trackers entry {tracker!r}; valid: {', '.join(valid)}")


def _check_optimizer_values(cls: type, kwargs: dict[str, Any], key: str, schedule) -> None:
    """Values torch or diffusers would reject (``lr: -1``, ``betas: [2, 0]``): refused with the recipe, by
    building the optimizer and its LR schedule on one dummy parameter (before any stage trains)."""
    from diffusers.optimization import get_scheduler

    try:
        opt = cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise FewstepError(f"{key}: {cls.__name__} refuses {kwargs}: {str(e).splitlines()[0]}") from None
    if schedule.name not in scheduler_names():
        return  # reported by the caller with the valid names
    try:
        get_scheduler(schedule.name, opt, num_warmup_steps=schedule.warmup_steps, num_training_steps=max(1, schedule.warmup_steps + 1))
    except (ValueError, TypeError, RuntimeError) as e:
        raise FewstepError(f"lr_scheduler: {schedule.name} refuses warmup_steps={schedule.warmup_steps}: "
                           f"{str(e).splitlines()[0]}") from None


def _check_model(spec: ModelSection, key: str) -> None:
    if spec.kind in ("pipeline", "pretrained") and spec.init != "teacher" and not spec.path:
        raise FewstepError(f"{key}.kind={spec.kind} needs {key}.path (a local directory, a hub id, or stage:NAME)")
    if spec.init == "path" and not spec.path:
        raise FewstepError(f"{key}.init=path needs {key}.path")
    if spec.path and not spec.path.startswith("stage:") and spec.kind == "pretrained" and not Path(spec.path).exists():
        raise FewstepError(f"{key}.path {spec.path} does not exist")
    if spec.kind in ("unet2d", "mlp", "classifier") and spec.init == "scratch":
        check_kwargs(_network_class(spec.kind), spec.config, f"{key}.config")
    if spec.kind == "mixture":
        from .data.mixtures import make_mixture

        mix = dict(spec.mixture)
        make_mixture(mix.pop("name", "ring"), **mix)


# ----------------------------------------------------------------------------- models
@dataclass
class Model:
    denoiser: Denoiser | None
    kind: str
    pipeline: Any = None


class Network(torch.nn.Module):
    """A trained network that is not a denoiser (the digits feature network): the loop only needs ``net``."""

    null_cond = None

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net


def _network_class(kind: str):
    from diffusers import UNet2DModel

    from .eval.digits_net import DigitsFeatureNet

    return {"unet2d": UNet2DModel, "mlp": MLPNet, "classifier": DigitsFeatureNet}[kind]


def _resolve(path: str, stage_outputs: dict[str, Path], sub: str = "final") -> str:
    """``stage:NAME`` -> that earlier stage's ``sub`` directory (final/ for models, pairs/ for data)."""
    if path.startswith("stage:"):
        name = path[len("stage:"):]
        if name not in stage_outputs:
            raise FewstepError(f"{path}: no earlier stage named {name!r}; valid: {', '.join(stage_outputs) or '(none)'}")
        return str(stage_outputs[name] / sub)
    return path


def build_data(recipe: Recipe, stage_outputs: dict[str, Path] | None = None):
    """The recipe's dataset; a ``path: stage:NAME`` names an earlier stage's pairs."""
    dname, dkw = _split(recipe.data)
    if isinstance(dkw.get("path"), str):
        dkw["path"] = _resolve(dkw["path"], stage_outputs or {}, "pairs")
    return lookup(DATA, dname, "data")(**check_kwargs(DATA[dname], dkw, "data"))


def _null_for_unet(net) -> dict[str, Tensor] | None:
    n = getattr(net.config, "num_class_embeds", None)
    return {"class_labels": torch.tensor([n - 1])} if n else None


def _wrap(net, kind: str, schedule: Schedule, prediction_type: str, spec: ModelSection, null=None) -> Denoiser:
    if kind == "mlp":
        return MLPDenoiser(net, schedule, prediction_type, precondition=spec.precondition,
                           **({"null_cond": null} if null else {}))
    return UNetDenoiser(net, schedule, prediction_type, null_cond=null if null is not None else _null_for_unet(net))


def with_guidance_embedding(unet, dim: int):
    """A copy of a UNet2DConditionModel with LCM's guidance-scale embedding input (``time_cond_proj_dim``).

    The new projection (time_embedding.cond_proj) starts at zero, so the copy computes exactly what
    the original does until training moves it (Luo et al. 2023 add it the same way).
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise FewstepError(f"student.guidance_embedding needs a UNet2DConditionModel (SD, SDXL); got {type(unet).__name__}")
    if unet.config.time_cond_proj_dim is not None:
        return unet
    new = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": int(dim)}).to(unet.dtype)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise FewstepError(f"cannot add a guidance embedding to this UNet (missing {missing[:3]}, unexpected {unexpected[:3]})")
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new


def build_model(spec: ModelSection, key: str, schedule: Schedule, *, teacher: Model | None = None,
                stage_outputs: dict[str, Path] | None = None, seed: int = 0) -> Model:
    stage_outputs = stage_outputs or {}
    if spec.kind == "none":
        return Model(None, "none")
    if spec.kind == "mixture":
        from .data.mixtures import make_mixture

        mix = dict(spec.mixture)
        return Model(MixtureDenoiser(make_mixture(mix.pop("name", "ring"), **mix), schedule), "mixture")
    if spec.kind == "pipeline" and spec.init != "teacher":
        from .pipelines import load_pipeline

        lp = load_pipeline(_resolve(spec.path, stage_outputs))
        return Model(lp.denoiser(), "pipeline", lp)
    if spec.kind == "pretrained":
        from .export import load_final

        den, meta, lp = load_final(_resolve(spec.path, stage_outputs))
        return Model(den, "pipeline" if meta["kind"] == "lora" else meta["kind"], lp)  # a LoRA loads fused
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
            cls = SD3Denoiser if teacher.pipeline.family == "sd3" else UNetDenoiser
            return Model(cls(net, sched, ptype, null_cond=t.null_cond), "pipeline", teacher.pipeline)
        kind = "mlp" if isinstance(net, MLPNet) else "unet2d"
        return Model(_wrap(net, kind, sched, ptype, spec, t.null_cond), kind)
    cls = _network_class(spec.kind)
    if spec.init == "path":
        path = Path(_resolve(spec.path, stage_outputs))
        sub = path / {"unet2d": "unet", "mlp": "mlp", "classifier": "classifier"}[spec.kind]
        net = cls.from_pretrained(sub if sub.is_dir() else path)
    else:
        torch.manual_seed(seed)
        net = cls(**check_kwargs(cls, spec.config, f"{key}.config"))
    if spec.kind == "classifier":
        return Model(Network(net), "classifier")
    return Model(_wrap(net, spec.kind, schedule, spec.prediction_type or "epsilon", spec), spec.kind)


def cast_teacher(teacher: Model, dtype: str) -> None:
    """Cast a teacher network to ``train.teacher_dtype``; LoRA adapters on it (a ``teacher_lora`` fake score)
    stay float32, as they train."""
    den = teacher.denoiser
    if den is None or not hasattr(den, "net"):
        return
    to = DTYPES[dtype]
    for n, p in den.net.named_parameters():
        if "lora_" not in n and p.dtype != to:
            p.data = p.data.to(to)
    for b in den.net.buffers():
        if b.is_floating_point() and b.dtype != to:
            b.data = b.data.to(to)


# ----------------------------------------------------------------------------- everything
@dataclass
class Built:
    recipe: Recipe
    schedule: Schedule
    teacher: Model
    student: Model
    loss: Any
    dataset: Any
    settings: LoopSettings
    optimizers: dict[str, PhaseOptimizer]
    prepare: Callable[[dict], dict] | None
    sample_fn: Callable[[Denoiser], Tensor] | None
    export: Callable[[Denoiser, Path], None]
    evaluate: Callable[[Denoiser, int], dict[str, float]] | None = None


def _schedule_from(recipe: Recipe) -> tuple[Schedule, dict[str, Any]]:
    name, kw = _split(recipe.schedule)
    make = lookup(SCHEDULES, name, "schedule")
    return make(**check_kwargs(make, kw, "schedule")), recipe.schedule


def _sample_shape(model: Model) -> tuple[int, ...]:
    den = model.denoiser
    if isinstance(den, MixtureDenoiser):
        return (den.mixture.dim,)
    net = den.net
    if isinstance(net, MLPNet):
        return (net.config.dim,)
    size = net.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return (net.config.in_channels, size, size)


def make_sample_fn(model: Model, sampler: dict[str, Any], *, num: int, prompts: list[str], seed: int,
                   steps: int | None = None) -> Callable[[Denoiser], Tensor]:
    """Samples for grids: fixed noise, classes cycling 0..C-1 (or the sampler's one ``class_label``) or the
    recipe's prompts, with the model's ``sampler`` settings (fewstep.sampling); decoded for pipelines."""
    from .sampling import sampler_grid, sampler_solver

    shape = _sample_shape(model)
    lp = model.pipeline
    guidance = sampler.get("guidance")

    def fn(den: Denoiser) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        device = next(iter(den.parameters()), torch.zeros(())).device
        x = torch.randn(num, *shape, generator=g).to(device)
        cond = cycling_conditions(den, lp, num, prompts=prompts if lp is not None else None,
                                  class_label=sampler.get("class_label"), device=device)
        out = sample(den, sampler_solver(sampler, seed=seed + 1), x, sampler_grid(den.schedule, sampler, steps), cond,
                     guidance=guidance if cond is not None else None)
        if lp is not None:
            with torch.no_grad():
                out = lp.decode_latents(out)
        return out

    return fn


def make_prepare(pipeline) -> Callable[[dict], dict] | None:
    """For pipeline models: prompts -> condition tensors, images -> latents. Cached data passes through."""
    if pipeline is None:
        return None

    def prepare(batch: dict) -> dict:
        if "prompt" in batch:
            batch = {**batch, **pipeline.encode_prompts(list(batch["prompt"]))}
        x0 = batch.get("x0")
        if isinstance(x0, Tensor) and x0.ndim == 4 and x0.shape[1] == 3:
            batch = {**batch, "x0": pipeline.encode_images(x0)}
        return batch

    return prepare


def build(recipe: Recipe, *, stage_outputs: dict[str, Path] | None = None) -> Built:
    """Build every object of a (validated) recipe."""
    check_recipe(recipe)
    tr = recipe.train
    schedule, schedule_spec = _schedule_from(recipe)
    teacher = build_model(recipe.teacher, "teacher", schedule, stage_outputs=stage_outputs, seed=tr.seed)
    if teacher.pipeline is not None:
        schedule = teacher.denoiser.schedule
    student = build_model(recipe.student, "student", schedule, teacher=teacher, stage_outputs=stage_outputs, seed=tr.seed)
    if student.denoiser is None or not hasattr(student.denoiser, "net"):
        raise FewstepError(f"student.kind={recipe.student.kind} is not a trainable network; valid: unet2d, mlp, pipeline, pretrained")
    net = student.denoiser.net
    net.requires_grad_(True)
    if recipe.lora is not None:
        from .lora import inject_lora

        lo = recipe.lora
        inject_lora(net, rank=lo.rank, alpha=lo.alpha, target_modules=lo.target_modules, dropout=lo.dropout, init=lo.init)
    if tr.gradient_checkpointing:
        if not getattr(net, "_supports_gradient_checkpointing", False):
            raise FewstepError(f"train.gradient_checkpointing: {type(net).__name__} does not support it; set it to false")
        net.enable_gradient_checkpointing()
    name, kw = _split(recipe.loss)
    cls = loss_class(name)
    kw = check_kwargs(cls, kw, "loss", skip=LOSS_INJECTED)
    if isinstance(kw.get("fake_from"), str) and kw["fake_from"].startswith("stage:"):
        from .checkpoint import latest_intact

        ckpt = latest_intact(Path(_resolve(kw["fake_from"], stage_outputs or {}, "checkpoints")), report=lambda m: None)
        if ckpt is None:
            raise FewstepError(f"loss.fake_from: {kw['fake_from']} has no intact checkpoint")
        kw["fake_from"] = str(ckpt)
    if hasattr(cls, "build"):
        if "sample_shape" in inspect.signature(cls.__init__).parameters:
            kw["sample_shape"] = _sample_shape(student)
        loss = cls.build(teacher=teacher.denoiser, student=student.denoiser, schedule=schedule,
                         pipeline=student.pipeline or teacher.pipeline, **kw)
    else:
        loss = cls(**kw)
    # after the loss: a fake score copied from the teacher starts from its float32 weights (DMD2 keeps its fake
    # UNet in float32), not from their teacher_dtype rounding
    cast_teacher(teacher, tr.teacher_dtype)
    dname = recipe.data["name"]
    dataset = build_data(recipe, stage_outputs)
    if "x0" in loss.needs and not is_stream(dataset) and "x0" not in dataset[0]:
        why = getattr(loss, "needs_why", "")
        raise FewstepError(f"loss {name} needs data with x0 (images, latents or vectors){why}; data {dname} gives "
                           f"{', '.join(dataset[0])}")
    optimizers = {}
    for phase in loss.phases:
        merged = {**recipe.optimizer, **(recipe.optimizers.get(phase) or {})}
        opt_name, okw = _split(merged)
        groups = {g: dict(recipe.optimizers[g]) for g in loss.groups
                  if g in loss.phase_modules(phase) and recipe.optimizers.get(g)}
        optimizers[phase] = PhaseOptimizer(opt_name, okw, recipe.lr_scheduler.name, recipe.lr_scheduler.warmup_steps,
                                           groups)
    shared = {f.name: getattr(tr, f.name) for f in dataclasses.fields(LoopSettings) if hasattr(tr, f.name)}
    settings = LoopSettings(**{**shared, "output_dir": Path(tr.output_dir), "trackers": list(tr.trackers)},
                            best_metric=recipe.evaluation.best if recipe.evaluation is not None else None)
    sm = recipe.sample
    sampler = sampler_settings(recipe, loss)
    if student.pipeline is not None:
        from .export import check_exportable

        check_exportable(student.denoiser, sampler)  # before any training: refused now, not after a day's run
    sample_fn = None if student.kind == "classifier" else make_sample_fn(
        student, sampler, num=sm.num, prompts=sm.prompts, seed=tr.seed)

    def export(den: Denoiser, directory: Path) -> None:
        from .export import pipeline_scheduler, student_schedule_spec, write_final

        meta = {"recipe": recipe.name, "method": name, "teacher": _describe(recipe.teacher), "sampler": sampler}
        if student.kind != "classifier":
            meta["sample_shape"] = list(_sample_shape(student))
        write_final(den, directory, kind=student.kind, meta=meta, recipe_yaml=recipe.to_yaml(),
                    schedule_spec=student_schedule_spec(den, schedule_spec), pipeline=student.pipeline,
                    scheduler=pipeline_scheduler(den, student.pipeline, sampler))

    evaluate = None
    if recipe.evaluation is not None and student.kind != "classifier":
        evaluate = make_evaluate(student, recipe, sampler, seed=tr.seed)
    return Built(recipe, schedule, teacher, student, loss, dataset, settings, optimizers,
                 make_prepare(student.pipeline or teacher.pipeline), sample_fn, export, evaluate)


def sampler_settings(recipe: Recipe, loss: Any) -> dict[str, Any]:
    """The recipe's ``sample`` section plus what the loss trained under (``loss.sampler_settings``): the sampler
    written to fewstep.json and used for grids and evaluation."""
    sm = recipe.sample
    return {"solver": sm.solver, "steps": sm.steps, "guidance": sm.guidance, "spacing": sm.spacing,
            **({"class_label": sm.class_label} if sm.class_label is not None else {}), **loss.sampler_settings()}


def make_evaluate(student: Model, recipe: Recipe, sampler: dict[str, Any], *,
                  seed: int) -> Callable[[Denoiser, int], dict[str, float]]:
    """Samples from the student (fixed noise, classes cycling) scored as `fewstep eval` scores them."""
    from .eval.evaluate import evaluate, make_extractor, reference_from

    ev, sm = recipe.evaluation, recipe.sample
    extract, _ = make_extractor(ev.features)
    reference = reference_from(ev.reference, extract)
    draw = make_sample_fn(student, sampler, num=ev.num, prompts=sm.prompts, seed=seed + 1, steps=ev.steps)

    def run(den: Denoiser, step: int) -> dict[str, float]:
        with torch.no_grad():
            images = draw(den)
            images = images.clamp(-1, 1) if images.ndim == 4 else images  # as `fewstep sample` / `eval` see them
            metrics = evaluate(images, extract, reference, with_pr=False, seed=seed)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    return run


def _describe(spec: ModelSection) -> str | None:
    if spec.kind == "none":
        return None
    if spec.kind == "mixture":
        return f"analytic mixture ({spec.mixture.get('name', 'ring')})"
    return f"{spec.kind}: {spec.path}" if spec.path else spec.kind



# ----------------------------------------------------------------------------- pairs
def pair_conditions(dataset, teacher: Denoiser) -> Callable[[list[int]], dict[str, Any]] | None:
    """Index i takes the condition (labels or prompt) of data item i mod len(data); None if unconditional."""
    if teacher.null_cond is None:  # an unconditional teacher
        return None
    if is_stream(dataset):
        raise FewstepError("pairs need a map-style dataset for their conditions (not a stream); use prompts, digits, images")
    n = len(dataset)
    keys = ("class_labels", "prompt", *teacher.cond_keys)
    if not any(k in dataset[0] for k in keys):
        if "encoder_hidden_states" in teacher.cond_keys:
            raise FewstepError(f"a text-conditioned teacher needs prompts for its pairs; the data gives {', '.join(dataset[0])}")
        return None  # unconditional pairs from a model that could also take labels

    def conditions(indices: list[int]) -> dict[str, Any]:
        items = [dataset[i % n] for i in indices]
        out: dict[str, Any] = {}
        for k in keys:
            if k in items[0] and k not in out:
                vals = [it[k] for it in items]
                out[k] = vals if isinstance(vals[0], str) else torch.stack([torch.as_tensor(v) for v in vals])
        return out

    return conditions


def check_pairs(recipe: Recipe) -> None:
    """The sections pair generation reads (teacher, schedule, data, pairs), checked without loading anything."""
    _check_model(recipe.teacher, "teacher")
    if recipe.teacher.kind == "none":
        raise FewstepError("pairs need a teacher (teacher.kind is none)")
    name, kw = _split(recipe.schedule)
    check_kwargs(lookup(SCHEDULES, name, "schedule"), kw, "schedule")
    if not recipe.data:
        raise FewstepError("missing section data (with data.name): pairs take their conditions from it")
    name, kw = _split(recipe.data)
    check_kwargs(lookup(DATA, name, "data"), kw, "data")
    lookup(SOLVERS, recipe.pairs.solver, "pairs.solver")


def pairs_job(recipe: Recipe, *, stage_outputs: dict[str, Path] | None = None) -> dict[str, Any]:
    """Keyword arguments for fewstep.pairs.generate_pairs from a recipe's teacher, data and pairs sections."""
    check_pairs(recipe)
    schedule, _ = _schedule_from(recipe)
    teacher = build_model(recipe.teacher, "teacher", schedule, stage_outputs=stage_outputs, seed=recipe.train.seed)
    cast_teacher(teacher, recipe.train.teacher_dtype)
    dataset = build_data(recipe, stage_outputs)
    p = recipe.pairs
    return dict(teacher=teacher.denoiser, num=p.num, shard_size=p.shard_size, batch_size=p.batch_size, solver=p.solver,
                steps=p.steps, guidance=p.guidance, spacing=p.spacing, seed=p.seed, shape=_sample_shape(teacher),
                conditions=pair_conditions(dataset, teacher.denoiser), encode=make_prepare(teacher.pipeline),
                teacher_name=_describe(recipe.teacher))
