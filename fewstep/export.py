"""A run's ``final/`` directory: diffusers-format components, ``fewstep.json`` and a model card.

``fewstep.json`` tells ``fewstep sample`` how to rebuild the denoiser and sample it (solver, step
count, guidance). Components load with plain diffusers ``from_pretrained``.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .denoisers import Denoiser, MLPDenoiser, MLPNet, UNetDenoiser
from .errors import FewstepError
from .schedules import Schedule, make_schedule

META = "fewstep.json"


def diffusers_scheduler(schedule_spec: dict[str, Any], prediction_type: str):
    """A diffusers scheduler equivalent to a fewstep schedule spec (for loading with plain diffusers)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    spec = dict(schedule_spec)
    name = spec.pop("name", "vp")
    if name == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=spec.get("num_train_timesteps", 1000), shift=spec.get("shift", 1.0))
    return DDIMScheduler(
        num_train_timesteps=spec.get("num_train_timesteps", 1000), beta_start=spec.get("beta_start", 0.00085),
        beta_end=spec.get("beta_end", 0.012), beta_schedule=spec.get("beta_schedule", "scaled_linear"),
        rescale_betas_zero_snr=spec.get("rescale_betas_zero_snr", False), prediction_type=prediction_type,
        clip_sample=False, set_alpha_to_one=True, timestep_spacing=spec.get("timestep_spacing", "trailing"),
    )


def student_schedule_spec(student: Denoiser, recipe_spec: dict[str, Any]) -> dict[str, Any]:
    """The spec of the schedule the student runs on: the recipe's, unless the student was
    reinterpreted as a rectified flow (InstaFlow) or loaded with a flow schedule."""
    sch = getattr(student, "schedule", None)  # classifiers have none
    if sch is not None and sch.kind == "flow" and recipe_spec.get("name", "vp") != "flow":
        return {"name": "flow", "num_train_timesteps": sch.num_train_timesteps, "shift": sch.shift}
    return recipe_spec


#: the least ``timestep_scaling`` a flow transformer's consistency student exports with: FlowMatchLCMScheduler's step
#: is x0 = x - sigma u (c_skip = 0), and at 1000 c_skip(t) = sigma_d^2 / ((1000 t)^2 + sigma_d^2) <= 2.5e-7 for t >= 1
FLOW_LCM_MIN_SCALING = 1000.0


def check_exportable(student: Denoiser, sampler: dict[str, Any]) -> None:
    """Refuse (before training) a pipeline student whose sampler no diffusers scheduler runs: LCMScheduler
    fixes sigma_data at 0.5 in its boundary coefficients; FlowMatchLCMScheduler has none (c_skip = 0, c_out = 1),
    which a flow consistency student's f(x, t) = c_skip x + c_out x0_hat meets where timestep_scaling is large (a flow's
    x0_hat = x - s u already equals x at s = 0, the boundary condition)."""
    if (sampler["solver"] == "consistency" and student.schedule.kind == "flow"
            and float(sampler.get("timestep_scaling", 10.0)) < FLOW_LCM_MIN_SCALING):
        raise FewstepError(f"loss.timestep_scaling {sampler.get('timestep_scaling', 10.0)}: a flow transformer's "
                           "consistency student exports with diffusers' FlowMatchLCMScheduler, which has no c_skip; use "
                           f"{FLOW_LCM_MIN_SCALING:g} or more (c_skip below 2.5e-7 from t = 1; LCM's 10 is for VP models)")
    if sampler["solver"] == "consistency" and student.schedule.kind == "vp" and sampler.get("sigma_data", 0.5) != 0.5:
        raise FewstepError(f"loss.sigma_data {sampler['sigma_data']}: a pipeline student exports with diffusers' "
                           "LCMScheduler, whose boundary coefficients fix sigma_data at 0.5; use 0.5 (LCM's value) "
                           "for a pipeline student")


def pipeline_scheduler(student: Denoiser, pipeline, sampler: dict[str, Any]):
    """The diffusers scheduler a pipeline student is exported with, or None to keep the pipeline's.

    A student reinterpreted as a rectified flow gets FlowMatchEulerDiscreteScheduler (its Euler step
    is exactly fewstep's on the flow schedule); a VP consistency student gets LCMScheduler with the loss's
    ``timestep_scaling`` and N as ``original_inference_steps`` (its step is fewstep's consistency sampler with
    lcm spacing; a sigma_data it cannot express was refused by ``check_exportable`` when the run was built); a VP
    renoise (DMD2) student gets LCMScheduler with c_skip = 0, to be called with its timesteps (docs/fdistill.md). A
    flow transformer's (SD3, FLUX.1) consistency or renoise student gets FlowMatchLCMScheduler on the pipeline's config.
    """
    if pipeline is None:
        return None
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchLCMScheduler, LCMScheduler

    from .pipelines import TRANSFORMER_FAMILIES

    current = pipeline.pipe.scheduler
    solver = sampler["solver"]
    if solver == "consistency" and student.schedule.kind == "vp":
        return LCMScheduler.from_config(current.config, timestep_scaling=float(sampler.get("timestep_scaling", 10.0)),
                                        original_inference_steps=int(sampler.get("original_steps", 50)),
                                        prediction_type=student.prediction_type)
    if solver == "renoise" and student.schedule.kind == "vp":
        # DMD2's sampler is LCMScheduler's step with c_skip = 0, c_out = 1: a huge timestep_scaling gives
        # exactly that in float32 (c_skip ~ 1e-19)
        return LCMScheduler.from_config(current.config, timestep_scaling=1.0e6, original_inference_steps=50,
                                        prediction_type=student.prediction_type)
    if solver in ("consistency", "renoise") and student.schedule.kind == "flow" and pipeline.family in TRANSFORMER_FAMILIES:
        # x0 = x - sigma u, then re-noise to the next sigma: the consistency step on a flow (c_skip at the grid's
        # timesteps is below 1e-7) and DMD2's; its grid is the pipeline's own (FLUX.1: shifted with the resolution)
        known = set(inspect.signature(FlowMatchLCMScheduler.__init__).parameters)
        return FlowMatchLCMScheduler.from_config({k: v for k, v in current.config.items() if k in known})
    if student.schedule.kind == "flow" and not type(current).__name__.startswith("FlowMatch"):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=student.schedule.num_train_timesteps, shift=1.0)
    return None


def single_file_card(meta: dict[str, Any], schedule: Schedule | None = None) -> str:
    """The model card's lines for ComfyUI and AUTOMATIC1111 users of the single-file checkpoint; a student trained at
    fixed timesteps (DMD2 SDXL's one step at 399) also gets the noise levels sigma = sqrt(1 - abar) / sqrt(abar) of
    those timesteps on ``schedule``, which the UIs take as custom sigmas."""
    if not meta.get("single_file"):
        return ""
    s = meta["sampler"]
    cfg = 1.0 if s.get("guidance") is None else s["guidance"]
    fixed = ""
    if s.get("timesteps") and schedule is not None:
        alpha, sigma = schedule.alpha_sigma(torch.tensor([float(t) for t in s["timesteps"]], dtype=torch.float64))
        sigmas = ", ".join(f"{v:.4f}" for v in (sigma / alpha).tolist())
        fixed = (f" It was trained to start at timestep(s) {s['timesteps']}, not the UI's 999: give the sampler the "
                 f"sigmas [{sigmas}, 0] (ComfyUI: SamplerCustom with those sigmas); the UI's default schedule gives "
                 "another image.")
    return (f"\n## ComfyUI and AUTOMATIC1111\n\n`{meta['single_file']}` is the whole model (UNet, VAE, text "
            "encoders) in float16 in the original Stable Diffusion layout: put it in ComfyUI's `models/checkpoints` or "
            f"AUTOMATIC1111's `models/Stable-diffusion`. Sampler: {SINGLE_FILE_SAMPLERS[meta['scheduler']]}; steps: "
            f"{s['steps']}; CFG scale: {cfg}" + (" (the guidance is trained in: 1 means none on top)" if cfg == 1.0 else "")
            + "; scheduler: the UI's default (normal)." + fixed + " Their samplers space the steps themselves, so past "
            "one step the result can differ slightly from `fewstep sample`'s (not measured: no UI runs in fewstep's "
            "tests).\n")


def model_card(meta: dict[str, Any], recipe_yaml: str, schedule: Schedule | None = None) -> str:
    s = meta["sampler"]
    guidance = "none" if s.get("guidance") is None else s["guidance"]
    lora = "" if meta["kind"] != "lora" else (
        f"\nA LoRA for `{meta['base']}` ({meta['weights']}, diffusers format). In plain diffusers:\n\n{lora_usage(meta, schedule)}"
        "\n`fewstep lora fuse <this directory> --out DIR` bakes it into a full pipeline.\n")
    return f"""# {meta.get('recipe', 'fewstep model')}

Made with fewstep {meta['fewstep_version']}.

| | |
|---|---|
| method | {meta.get('method')} |
| teacher | {meta.get('teacher') or 'none (trained from data)'} |
| network | {meta['kind']} ({meta['prediction_type']} prediction) |
| sampler | {s['solver']}, {s['steps']} steps{f" (timesteps {s['timesteps']})" if s.get('timesteps') else ""} |
| guidance | {guidance} |
| scheduler | {meta.get('scheduler', 'see fewstep.json')} |

Sample it with `fewstep sample --model <this directory> --num 16 --seed 0 --out samples.png`.
{lora}{single_file_card(meta, schedule)}
## Recipe

```yaml
{recipe_yaml.rstrip()}
```
"""


def write_final(student: Denoiser, directory: Path, *, kind: str, meta: dict[str, Any], recipe_yaml: str,
                schedule_spec: dict[str, Any] | None = None, pipeline=None, scheduler=None) -> Path:
    """Write ``student`` and its metadata to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    net = student.net
    if kind == "classifier":
        net.save_pretrained(directory / "classifier", safe_serialization=True)
        meta = {"fewstep_version": __version__, "kind": kind, **meta}
        (directory / META).write_text(json.dumps(meta, indent=2))
        (directory / "README.md").write_text(f"# {meta.get('recipe')}\n\nA classifier trained with fewstep (loss {meta.get('method')}).\n\n"
                                             f"```yaml\n{recipe_yaml.rstrip()}\n```\n")
        return directory
    meta = {"fewstep_version": __version__, "kind": kind, "prediction_type": student.prediction_type, **meta}
    from .lora_io import has_lora

    lora = has_lora(net)
    if kind == "pipeline" and lora:
        _write_lora(net, directory, meta, pipeline, scheduler)
    elif kind == "pipeline":
        if pipeline is None:
            raise FewstepError("exporting a pipeline student needs its pipeline")
        from .pipelines import TRANSFORMER_FAMILIES

        attr = "transformer" if pipeline.family in TRANSFORMER_FAMILIES else "unet"
        original, original_scheduler = getattr(pipeline.pipe, attr), pipeline.pipe.scheduler
        setattr(pipeline.pipe, attr, net)
        if scheduler is not None:
            pipeline.pipe.scheduler = scheduler
        try:
            pipeline.pipe.save_pretrained(directory, safe_serialization=True)
            meta["scheduler"] = type(pipeline.pipe.scheduler).__name__
            if single_file_ready(pipeline, student, meta["scheduler"]):  # for ComfyUI / AUTOMATIC1111
                from .single_file import save_single_file

                save_single_file(pipeline.pipe, directory / SINGLE_FILE, dtype=torch.float16)
                meta["single_file"] = SINGLE_FILE
        finally:
            setattr(pipeline.pipe, attr, original)
            pipeline.pipe.scheduler = original_scheduler
    else:
        component = "mlp" if kind == "mlp" else "unet"
        if lora:  # no diffusers LoRA loader exists for these networks: the adapters are merged in
            from .lora_io import merged_network

            net = merged_network(net)
            meta["lora"] = "merged into the weights"
        net.save_pretrained(directory / component, safe_serialization=True)
        meta["component"] = component
        meta["schedule"] = schedule_spec
        sched = diffusers_scheduler(schedule_spec or {"name": "vp"}, student.prediction_type)
        sched.save_pretrained(directory / "scheduler")
        meta["scheduler"] = type(sched).__name__
        if isinstance(student, MLPDenoiser):
            meta["precondition"] = student.precondition
            meta["sigma_data"] = student.sigma_data
    if student.null_cond is not None and "class_labels" in student.null_cond:
        meta["null_class"] = int(student.null_cond["class_labels"].reshape(-1)[0])
    (directory / META).write_text(json.dumps(meta, indent=2))
    (directory / "README.md").write_text(model_card(meta, recipe_yaml, student.schedule))
    return directory


#: the single-file checkpoint an SD 1.x or SDXL pipeline student is also exported as (fewstep/single_file.py)
SINGLE_FILE = "model.safetensors"
#: diffusers schedulers whose sampling ComfyUI and AUTOMATIC1111 have (their "lcm" / "LCM" and "ddim" / "DDIM")
SINGLE_FILE_SAMPLERS = {"LCMScheduler": "LCM (ComfyUI sampler `lcm`, AUTOMATIC1111 `LCM`)",
                        "DDIMScheduler": "DDIM (ComfyUI sampler `ddim`, AUTOMATIC1111 `DDIM`)"}


def single_file_ready(pipeline, student: Denoiser, scheduler: str) -> bool:
    """An SD 1.x or SDXL epsilon-prediction student on SD's own schedule, sampled by a scheduler those UIs have: what
    a single file in the original layout runs as in them (a flow-trained UNet, InstaFlow's, would not, nor would
    an LCM student's guidance-scale input, which the original UNet has no key for)."""
    from .single_file import TEXT_PREFIXES

    unet = getattr(pipeline.pipe, "unet", None)
    return (type(pipeline.pipe).__name__ in TEXT_PREFIXES
            and student.prediction_type == "epsilon" and student.schedule.kind == "vp"
            and scheduler in SINGLE_FILE_SAMPLERS
            and getattr(unet.config, "time_cond_proj_dim", None) is None)  # LCM's guidance input: no place there


def _write_lora(net, directory: Path, meta: dict[str, Any], pipeline, scheduler) -> None:
    """A LoRA student: the adapters in diffusers' format, the scheduler to use, and the base to load them on."""
    from .lora_io import LORA_WEIGHTS, save_pipeline_lora

    if pipeline is None:
        raise FewstepError("exporting a pipeline student needs its pipeline")
    save_pipeline_lora(pipeline, net, directory)
    from .lora_kohya import FAMILIES, KOHYA_WEIGHTS, save_kohya_lora

    if pipeline.family in FAMILIES:  # the same adapters for ComfyUI and AUTOMATIC1111
        save_kohya_lora(net, pipeline.family, directory / KOHYA_WEIGHTS)
        meta["kohya_weights"] = KOHYA_WEIGHTS
    sched = scheduler if scheduler is not None else pipeline.pipe.scheduler
    sched.save_pretrained(directory / "scheduler")
    meta.update(kind="lora", family=pipeline.family, base=pipeline.origin.get("base"),
                base_loras=list(pipeline.origin.get("base_loras", [])), weights=LORA_WEIGHTS,
                scheduler=type(sched).__name__, pipeline_class=type(pipeline.pipe).__name__)


def pipeline_call(meta: dict[str, Any], steps: int, family: str,
                  schedule: Schedule | None = None) -> tuple[dict[str, Any] | None, str]:
    """The keyword arguments of the plain diffusers pipeline call that samples an exported pipeline or LoRA student
    with its sampler at ``steps`` (the model card's: ``guidance_scale``, and ``num_inference_steps`` or, for the
    re-noising sampler, its trailing ``timesteps``), or (None, why) where no pipeline call expresses the sampler.
    An sCM student's TrigFlow grid (``spacing: trigflow``) is laid out on the student's ``schedule``."""
    s = meta["sampler"]
    if str(meta.get("scheduler", "")).startswith("FlowMatch") and family in ("sd", "sdxl"):
        return None, "the SD pipelines have no flow-matching loop: docs/reflow.md's manual loop samples this student"
    trigflow = s.get("spacing") == "trigflow" and steps > 1
    if trigflow and family not in ("sd", "sdxl"):
        return None, (f"the TrigFlow grid at {steps} steps is not the pipeline's FlowMatchLCMScheduler grid: "
                      "`fewstep sample` samples this student")
    if trigflow and schedule is None:
        raise ValueError("pipeline_call needs the student's schedule for a spacing: trigflow sampler")
    from .denoisers.flux import FLUX_GUIDANCE

    # FLUX.1 [dev]'s guidance is an input: with none in fewstep's sampler, its denoiser's default (FluxPipeline's 3.5)
    unguided = FLUX_GUIDANCE if family == "flux" else 1.0
    kwargs: dict[str, Any] = {"guidance_scale": unguided if s.get("guidance") is None else s["guidance"]}
    if family == "flux" and meta.get("resolution"):  # the grid shifts with the size, so the call names it
        kwargs.update(height=meta["resolution"], width=meta["resolution"])
    if s["solver"] == "renoise" and family in ("sd", "sdxl") and trigflow:
        from .sampling import sampler_grid

        kwargs["timesteps"] = [int(t) for t in sampler_grid(schedule, s, steps)[:-1].tolist()]
    elif s["solver"] == "renoise" and family in ("sd", "sdxl"):
        given = s.get("timesteps") if steps == s["steps"] else None
        kwargs["timesteps"] = given or list(range(999, 0, -1000 // steps))[:steps]
    else:
        kwargs["num_inference_steps"] = steps
    return kwargs, ""


def lora_usage(meta: dict[str, Any], schedule: Schedule | None = None) -> str:
    """The plain-diffusers lines that sample a LoRA final/ (for its model card; ``schedule``: the student's)."""
    s = meta["sampler"]
    fused = "".join(f'pipe.load_lora_weights("{f}")\npipe.fuse_lora()\npipe.unload_lora_weights()\n'
                    for f in meta.get("base_loras", []))
    kwargs, why = pipeline_call(meta, s["steps"], meta.get("family", "sd"), schedule)
    if kwargs is None:  # no pipeline call reproduces the sampler: say so rather than print one that does not
        return f"Load it with `{meta['pipeline_class']}` and `load_lora_weights`; no plain pipeline call samples it: {why}.\n"
    guidance = kwargs.pop("guidance_scale")
    steps = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return f"""```python
import diffusers

pipe = diffusers.{meta["pipeline_class"]}.from_pretrained("{meta["base"]}")
{fused}pipe.load_lora_weights("<this directory>")
pipe.scheduler = diffusers.{meta["scheduler"]}.from_pretrained("<this directory>", subfolder="scheduler")
image = pipe("a photo of a cat", {steps}, guidance_scale={guidance}).images[0]
```
"""


def read_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    if not path.is_file():
        raise FewstepError(f"{directory} is not a fewstep model directory (no {META}) nor a diffusers pipeline (no "
                          "model_index.json); pass a run's final/ directory, a pipeline directory or a hub id")
    return json.loads(path.read_text())


def is_plain_pipeline(name: str | Path) -> bool:
    """Whether ``name`` is a diffusers pipeline fewstep did not write: a directory with ``model_index.json`` and no
    ``fewstep.json``, or something that is no local path (a hub id, which ``load_pipeline`` resolves)."""
    from .pipelines import is_hub_id

    path = Path(name).expanduser()
    if path.exists():
        return (path / "model_index.json").is_file() and not (path / META).is_file()
    return is_hub_id(str(name))


def plain_pipeline_meta(lp) -> dict[str, Any]:
    """The metadata a plain diffusers pipeline (a teacher users distill from, not a fewstep run's final/) is sampled
    by: fewstep's deterministic solver for its schedule (DDIM with the scheduler's own spacing for epsilon/v-prediction
    pipelines, Euler for flow matching) at the pipeline's own default steps and guidance_scale (read from its
    ``__call__``: StableDiffusionPipeline 50 and 7.5, SDXL 50 and 5.0, SD3 28 and 7.0; FLUX.1's guidance is embedded,
    the denoiser's default)."""
    import inspect

    if type(lp.pipe).__name__ == "LatentConsistencyModelPipeline":  # every other class load_pipeline takes has one
        raise FewstepError(f"a plain {type(lp.pipe).__name__} has no teacher sampler in fewstep; valid plain pipelines: "
                           "StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline")
    defaults = {k: v.default for k, v in inspect.signature(type(lp.pipe).__call__).parameters.items()}
    flow = lp.schedule.kind == "flow"
    sampler: dict[str, Any] = {"solver": "euler" if flow else "ddim", "steps": int(defaults["num_inference_steps"]),
                               "guidance": None if lp.family == "flux" else float(defaults["guidance_scale"])}
    return {"kind": "pipeline", "family": lp.family, "method": "teacher (a plain diffusers pipeline)",
            "recipe": None, "teacher": lp.origin["base"], "sampler": sampler, "sample_shape": list(lp.sample_shape),
            "resolution": lp.resolution, "prediction_type": lp.prediction_type,
            "scheduler": type(lp.pipe.scheduler).__name__, "plain_pipeline": True}


def load_final(directory: str | Path, *, device: str | torch.device = "cpu") -> tuple[Denoiser, dict[str, Any], Any]:
    """(denoiser, metadata, pipeline or None) from a ``final/`` directory, or from a plain diffusers pipeline
    (directory or hub id: ``plain_pipeline_meta`` gives its sampler)."""
    if is_plain_pipeline(directory):
        from .pipelines import load_pipeline

        lp = load_pipeline(str(directory), device=device)
        return lp.denoiser(), plain_pipeline_meta(lp), lp
    directory = Path(directory)
    meta = read_meta(directory)
    kind = meta["kind"]
    if kind == "lora":
        lp = load_lora_final(directory, meta, device=device)
        return lp.denoiser(), meta, lp
    if kind == "pipeline":
        from .pipelines import load_pipeline

        lp = load_pipeline(str(directory), device=device, resolution=meta.get("resolution"))
        return lp.denoiser(), meta, lp
    schedule: Schedule = make_schedule(**_schedule_kwargs(meta["schedule"]))
    null = {"class_labels": torch.tensor([meta["null_class"]])} if meta.get("null_class") is not None else None
    if kind == "mlp":
        net = MLPNet.from_pretrained(directory / "mlp")
        den = MLPDenoiser(net, schedule, meta["prediction_type"], precondition=meta.get("precondition", "none"),
                          sigma_data=meta.get("sigma_data", 0.5), **({"null_cond": null} if null else {}))
    elif kind == "unet2d":
        from diffusers import UNet2DModel

        den = UNetDenoiser(UNet2DModel.from_pretrained(directory / "unet"), schedule, meta["prediction_type"], null_cond=null)
    else:
        raise FewstepError(f"unknown exported kind {kind!r} in {directory}; valid: mlp, pipeline, unet2d")
    return den.to(device).eval(), meta, None


def load_lora_final(directory: Path, meta: dict[str, Any], *, device: str | torch.device = "cpu"):
    """The base pipeline with this LoRA (and the LoRAs its base was made with) fused in, on the exported scheduler."""
    import diffusers

    from .lora_io import check_lora_dir, fuse_into, load_lora, lora_chain
    from .pipelines import load_pipeline

    check_lora_dir(directory)
    if not meta.get("base"):
        raise FewstepError(f"{directory}/{META} names no base pipeline for its LoRA")
    lp = load_pipeline(meta["base"], device=device, resolution=meta.get("resolution"))
    chain = lora_chain(meta, directory)
    for path in chain:
        load_lora(lp.pipe, path)
        fuse_into(lp.pipe)
    sched_cls = getattr(diffusers, json.loads((directory / "scheduler" / "scheduler_config.json").read_text())["_class_name"])
    lp.set_scheduler(sched_cls.from_pretrained(directory / "scheduler"))
    lp.origin = {"base": meta["base"], "base_loras": [str(p.resolve()) for p in chain]}
    return lp


def _schedule_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    spec = dict(spec)
    return {"name": spec.pop("name", "vp"), **spec}


__all__ = ["diffusers_scheduler", "load_final", "pipeline_call", "pipeline_scheduler", "read_meta", "student_schedule_spec", "write_final"]
