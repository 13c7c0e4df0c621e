"""Small helpers every builder uses: a named section split, and ``stage:NAME`` references."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import FewstepError


def split_named(section: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(its ``name``, its other keys) of a section that names a constructor (loss, data, schedule, optimizer)."""
    section = dict(section)
    return section.pop("name"), section


def resolve_stage(path: str, stage_outputs: dict[str, Path], sub: str = "final") -> str:
    """``stage:NAME`` -> that earlier stage's ``sub`` directory (final/ for models, pairs/ for data)."""
    if path.startswith("stage:"):
        name = path[len("stage:"):]
        if name not in stage_outputs:
            raise FewstepError(f"{path}: no earlier stage named {name!r}; valid: {', '.join(stage_outputs) or '(none)'}")
        return str(stage_outputs[name] / sub)
    return path
