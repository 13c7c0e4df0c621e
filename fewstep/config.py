"""Recipes: YAML files that name the pieces, `key=value` overrides, and validation with helpful errors.

Fixed sections (``train``, ``sample``, ``lora``, ``lr_scheduler``, ``teacher``, ``student``) are
dataclasses. Sections that name a constructor (``schedule``, ``loss``, ``data``, ``optimizer``, and
a model's ``config``) are checked against that constructor's own signature: an unknown key lists
the valid ones, a wrong type says what was expected. Builders (fewstep.builders) then pass plain
arguments to components; no component ever sees a recipe.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import FewstepError, check_choice
from .settings import PARALLEL, TEACHER_PLACEMENT, LoopSettings
from .yaml_core import load_yaml

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


# ----------------------------------------------------------------------------- sections
@dataclass
class TrainSection(LoopSettings):
    """How the loop runs (fewstep.settings.LoopSettings, passed to the loop as it is), and what only the
    builders read."""

    overwrite: bool = False
    teacher_dtype: str = "float32"  # float32 | float16 | bfloat16
    gradient_checkpointing: bool = False
    prompt_table: int = 10_000  # data: prompts with at most this many distinct prompts: each encoded once; 0: off


RUN_LENGTH_KEYS = {
    "train.max_steps", "train.max_wall_time", "train.resume", "train.overwrite", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "train.sample_every", "train.eval_every", "train.progress",
    "train.num_workers", "train.trackers", "train.launch_processes",
    "train.output_dir",  # where the run is, not what it is: a moved or copied run directory resumes
}
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class SampleSection:
    """How students (and teachers, in grids) are sampled; exported into final/ metadata."""

    solver: str = "ddim"
    steps: int = 25
    guidance: float | None = None
    num: int = 64
    spacing: str | None = None
    class_label: int | None = None  # class-conditional models: one class for all samples (C, the null class: unconditional)
    prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a painting of a lighthouse at dusk"])


@dataclass
class LoraSection:
    """peft LoRA adapters on the trainable network (Hu et al. 2021)."""

    rank: int = 4
    alpha: float | None = None  # default: rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0
    init: str = "gaussian"  # gaussian | default (kaiming) | pissa | olora ... (peft's init_lora_weights)
    base_dtype: str | None = None  # float16 | bfloat16 | float32: the frozen base's storage (None: the network's
    #                                own dtype); adapters stay float32


@dataclass
class EvalSection:
    """Metrics during training, every ``train.eval_every`` steps, through the same code as `fewstep eval`."""

    features: str = "digits"
    reference: str = "digits"
    num: int = 500
    steps: int | None = None  # default: sample.steps
    best: str | None = "fd"  # keep the model with the lowest value of this metric in best/


@dataclass
class PairsSection:
    """Teacher pairs (noise, ODE endpoint, condition) for reflow (Liu et al. 2022): `fewstep pairs`, stage kind pairs.

    Index i draws its noise from its own seed (``seed`` and i) and takes the condition of data item
    i mod len(data); shards of ``shard_size`` indices are written atomically, so a resumed or
    multi-process run writes every index exactly once.
    """

    num: int = 10_000
    shard_size: int = 1000
    batch_size: int = 256
    solver: str = "ddim"
    steps: int = 25
    guidance: float | None = None
    spacing: str | None = None
    seed: int = 0
    encoder_propagation: list[int] | None = None  # key steps of Faster Diffusion's encoder reuse; None: off
    channels_last: bool = False  # the teacher's convolutions in channels_last memory format (pays off on GPUs)


@dataclass
class LRSchedulerSection:
    name: str = "constant"
    warmup_steps: int = 0


@dataclass
class ModelSection:
    """A network. ``kind``: none, unet2d, mlp, mixture, pipeline, pretrained (a fewstep final/ dir), or
    classifier (the digits feature network).

    ``path``: a diffusers pipeline (local dir or hub id), a fewstep final/ dir, or ``stage:NAME`` for
    an earlier stage's output. ``init`` (students): scratch, teacher (a copy of the teacher's
    network) or path. ``config``: constructor arguments of the network (UNet2DModel, MLPNet).
    """

    kind: str = "none"
    path: str | None = None
    init: str = "scratch"
    config: dict[str, Any] = field(default_factory=dict)
    prediction_type: str | None = None
    precondition: str = "none"
    mixture: dict[str, Any] = field(default_factory=lambda: {"name": "ring"})
    guidance: float | None = None
    schedule: str | None = None  # "flow": reinterpret a VP teacher's copy as a rectified flow (InstaFlow)
    guidance_embedding: int | None = None  # LCM: add a w-embedding input of this width (256) to a UNet2DConditionModel copy
    resolution: int | None = None  # pipelines: the image side in pixels to train and sample at (default: the pipeline's)


MODEL_KINDS = ("none", "unet2d", "mlp", "mixture", "pipeline", "pretrained", "classifier")
INITS = ("scratch", "teacher", "path")

SECTIONS: dict[str, type] = {
    "train": TrainSection, "sample": SampleSection, "lora": LoraSection, "lr_scheduler": LRSchedulerSection,
    "teacher": ModelSection, "student": ModelSection, "evaluation": EvalSection, "pairs": PairsSection,
}
NAMED_SECTIONS = ("schedule", "loss", "data", "optimizer")
TOP_KEYS = ("name", "description", "stages", "optimizers", *SECTIONS, *NAMED_SECTIONS)


# ----------------------------------------------------------------------------- type checking
def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


#: a number's spelling (YAML 1.2 core's float and decimal int), for a quoted number read as a float or an int
_NUMBER = re.compile(r"^\s*[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?\s*$")
#: booleans as users type them (YAML 1.1's words too), for a setting declared bool
_BOOLS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` read as annotation ``tp`` declares, whatever YAML made of it: a float or an int from a number or a
    quoted number (``'1e-4'``, ``1E5`` for an int when whole), a bool from true/false/yes/no/on/off in any case, a
    string from a number or a boolean as written. Anything else raises a one-line error (docs/cli.md)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return coerce(value, arg, key)
            except FewstepError:
                continue
        raise FewstepError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise FewstepError(f"{key}: expected null, got {value!r}")
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise FewstepError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        inner = args[0] if args else Any
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise FewstepError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise FewstepError(f"{key}: expected true or false (or yes/no, on/off), got {value!r}")
    if isinstance(value, str) and tp in (float, int) and _NUMBER.match(value):
        value = float(value) if tp is float or not value.strip().lstrip("+-").isdigit() else int(value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise FewstepError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 1E5, 1e3: whole numbers written as floats
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise FewstepError(f"{key}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return str(value)
        raise FewstepError(f"{key}: expected a string, got {value!r}")
    return value


def check_kwargs(fn: Any, kwargs: dict[str, Any], key: str, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Validate ``kwargs`` against ``fn``'s signature (a class validates its __init__)."""
    target = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(target)
    try:
        hints = get_type_hints(target)
    except Exception:
        hints = {}
    params = {n: p for n, p in sig.parameters.items() if n not in ("self", *skip) and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    out = {}
    for k, v in kwargs.items():
        if k not in params:
            if accepts_any:
                out[k] = v
                continue
            raise FewstepError(f"unknown key {key}.{k}; valid: {', '.join(f'{key}.{n}' for n in params) or '(none)'}")
        out[k] = coerce(v, hints.get(k, params[k].annotation), f"{key}.{k}")
    missing = [n for n, p in params.items() if p.default is p.empty and n not in out]
    if missing:
        raise FewstepError(f"missing key {key}.{missing[0]} (required by {getattr(fn, '__name__', fn)})")
    return out


def build_section(cls: type, data: Any, key: str) -> Any:
    """A dataclass section from a mapping, with unknown keys and wrong types reported."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FewstepError(f"{key}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    values = {}
    for k, v in data.items():
        if k not in fields:
            raise FewstepError(f"unknown key {key}.{k}; valid: {', '.join(f'{key}.{n}' for n in fields)}")
        values[k] = coerce(v, hints[k], f"{key}.{k}")
    return cls(**values)


# ----------------------------------------------------------------------------- recipe
@dataclass
class Recipe:
    """A validated recipe: the raw (resolved) mapping and its typed sections."""

    raw: dict[str, Any]
    name: str
    train: TrainSection
    sample: SampleSection
    lora: LoraSection | None
    evaluation: EvalSection | None
    lr_scheduler: LRSchedulerSection
    teacher: ModelSection
    student: ModelSection
    schedule: dict[str, Any]
    loss: dict[str, Any]
    data: dict[str, Any]
    optimizer: dict[str, Any]
    optimizers: dict[str, dict[str, Any]]
    stages: list[dict[str, Any]]
    pairs: PairsSection = field(default_factory=PairsSection)
    overrides: list[str] = field(default_factory=list)  # command-line overrides, re-applied to every stage

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def _named(raw: dict, key: str, default: dict | None = None) -> dict[str, Any]:
    section = raw.get(key, default)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise FewstepError(f"{key}: expected a mapping, got {section!r}")
    if section and "name" not in section:
        raise FewstepError(f"{key}: missing key {key}.name")
    return dict(section)


def validate(raw: dict[str, Any]) -> Recipe:
    """Check the structure of a recipe mapping and return a Recipe; names are checked by the builders."""
    if not isinstance(raw, dict):
        raise FewstepError("a recipe must be a YAML mapping")
    for k in raw:
        if k not in TOP_KEYS:
            raise FewstepError(f"unknown key {k}; valid: {', '.join(TOP_KEYS)}")
    train = build_section(TrainSection, raw.get("train"), "train")
    check_choice(train.mixed_precision, MIXED_PRECISIONS, "train.mixed_precision")
    check_choice(train.teacher_dtype, DTYPES, "train.teacher_dtype")
    check_choice(train.nonfinite, ("stop", "skip"), "train.nonfinite")
    check_choice(train.parallel, PARALLEL, "train.parallel")
    check_choice(train.fsdp_teacher, TEACHER_PLACEMENT, "train.fsdp_teacher")
    if train.compile and train.parallel == "fsdp":
        raise FewstepError("train.compile with train.parallel=fsdp is not supported yet (FSDP2's hooks inside the "
                           "compiled regions are untested here); use one of them")
    for key in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                "launch_processes"):
        if getattr(train, key) < 1:
            raise FewstepError(f"train.{key} must be at least 1, got {getattr(train, key)}")
    for key in ("sample_every", "eval_every", "num_workers", "prompt_table"):
        if getattr(train, key) < 0:
            raise FewstepError(f"train.{key} must be >= 0, got {getattr(train, key)}")
    if train.max_wall_time < 0:
        raise FewstepError(f"train.max_wall_time must be >= 0 seconds, got {train.max_wall_time}")
    if train.ema_decay is not None and not 0.0 <= train.ema_decay < 1.0:
        raise FewstepError(f"train.ema_decay must be in [0, 1), got {train.ema_decay}")
    sample = build_section(SampleSection, raw.get("sample"), "sample")
    if sample.steps < 1 or sample.num < 1:
        raise FewstepError(f"sample.steps and sample.num must be at least 1, got {sample.steps} and {sample.num}")
    teacher = build_section(ModelSection, raw.get("teacher"), "teacher")
    student = build_section(ModelSection, raw.get("student"), "student")
    for key, spec in (("teacher", teacher), ("student", student)):
        check_choice(spec.kind, MODEL_KINDS, f"{key}.kind")
        check_choice(spec.init, INITS, f"{key}.init")
    if student.kind == "none":
        raise FewstepError(f"student.kind must name a network; valid: {', '.join(k for k in MODEL_KINDS if k not in ('none', 'mixture'))}")
    lora = None if raw.get("lora") is None else build_section(LoraSection, raw.get("lora"), "lora")
    if lora is not None and lora.base_dtype is not None:
        check_choice(lora.base_dtype, DTYPES, "lora.base_dtype")
    evaluation = None if raw.get("evaluation") is None else build_section(EvalSection, raw.get("evaluation"), "evaluation")
    optimizers = raw.get("optimizers") or {}
    if not isinstance(optimizers, dict):
        raise FewstepError(f"optimizers: expected a mapping of phase -> optimizer, got {optimizers!r}")
    pairs = build_section(PairsSection, raw.get("pairs"), "pairs")
    for key in ("num", "shard_size", "batch_size", "steps"):
        if getattr(pairs, key) < 1:
            raise FewstepError(f"pairs.{key} must be at least 1, got {getattr(pairs, key)}")
    keys = pairs.encoder_propagation
    if keys is not None and (not keys or min(keys) < 0 or len(set(keys)) != len(keys)):
        raise FewstepError(f"pairs.encoder_propagation: distinct step indices >= 0 (the paper's: 0, 1, 2, 3, 5, 10, 15, "
                           f"25, 35), or null for off; got {keys}")
    if student.schedule not in (None, "flow"):
        raise FewstepError(f"unknown student.schedule {student.schedule!r}; valid: flow (or leave it unset)")
    stages = raw.get("stages") or []
    if not isinstance(stages, list) or not all(isinstance(s, dict) and "name" in s for s in stages):
        raise FewstepError("stages: expected a list of mappings, each with a name")
    lr_scheduler = build_section(LRSchedulerSection, raw.get("lr_scheduler"), "lr_scheduler")
    if lr_scheduler.warmup_steps < 0:
        raise FewstepError(f"lr_scheduler.warmup_steps must be >= 0, got {lr_scheduler.warmup_steps}")
    if lr_scheduler.name == "constant" and lr_scheduler.warmup_steps:
        raise FewstepError(f"lr_scheduler.warmup_steps {lr_scheduler.warmup_steps} has no effect with name constant "
                           "(diffusers' get_scheduler ignores it); use name constant_with_warmup, or warmup_steps 0")
    return Recipe(
        raw=raw, name=str(raw.get("name", "recipe")), train=train, sample=sample, lora=lora, evaluation=evaluation,
        lr_scheduler=lr_scheduler,
        teacher=teacher, student=student, schedule=_named(raw, "schedule", {"name": "vp"}),
        loss=_named(raw, "loss"), data=_named(raw, "data"), optimizer=_named(raw, "optimizer", {"name": "AdamW", "lr": 1e-4}),
        optimizers=optimizers, stages=stages, pairs=pairs,
    )


# ----------------------------------------------------------------------------- files and overrides
def available_recipes(directory: Path = RECIPES_DIR) -> dict[str, Path]:
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))} if directory.is_dir() else {}


def find_recipe(name_or_path: str) -> Path:
    """A recipe file by path, or by name in recipes/ (with or without .yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    known = available_recipes()
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if stem in known and (p.parent == Path(".") or p.parent == RECIPES_DIR or not p.parent.exists()):
        return known[stem]
    raise FewstepError(f"recipe {name_or_path} not found; valid names: {', '.join(known) or '(none)'} (or a path to a .yaml file)")


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise FewstepError(f"override {text!r} must look like key=value (e.g. train.max_steps=100)")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise FewstepError(f"override {text!r} has an empty key part")
    try:
        parsed = load_yaml(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides (values parsed as YAML) to a copy of ``raw``."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise FewstepError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a mapping")
            node = child
        node[parts[-1]] = value
    return raw


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe."""
    path = find_recipe(name_or_path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise FewstepError(f"{path} is not a text file (not UTF-8); a recipe is YAML (see `fewstep ls`, recipes/)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise FewstepError(f"{path} is not valid YAML{where}") from None
    base, staged = split_stage_overrides(overrides or [])
    recipe = validate(apply_overrides(raw, base))
    names = [str(st.get("name")) for st in recipe.stages]
    for text in staged:
        parts, _ = parse_override(text)
        if len(parts) < 3 or parts[1] not in names:
            raise FewstepError(f"override {text!r}: stages.NAME.KEY=VALUE needs one of this recipe's stages as NAME; "
                               f"valid: {', '.join(names) or 'none (the recipe has no stages)'}")
    recipe.overrides = list(overrides or [])
    return recipe


def split_stage_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(overrides of the base recipe, ``stages.NAME.KEY=VALUE`` overrides of one stage, applied over its keys)."""
    staged = [o for o in overrides if o.split("=", 1)[0].strip().startswith("stages.")]
    return [o for o in overrides if o not in staged], staged


def stage_override(text: str) -> tuple[str, str]:
    """``stages.NAME.KEY=VALUE`` -> (NAME, ``KEY=VALUE``)."""
    key, value = text.split("=", 1)
    _, name, rest = key.strip().split(".", 2)
    return name, f"{rest}={value}"


def differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe mappings."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, key + ".")
        elif va != vb:
            out.append(key)
    return out


def run_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys that make two recipes different runs (run-length settings excluded)."""
    return [k for k in differing_keys(a, b) if k not in RUN_LENGTH_KEYS]
