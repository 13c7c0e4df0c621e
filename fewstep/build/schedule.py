"""The recipe's noise schedule (``schedule`` section)."""
from __future__ import annotations

from typing import Any

from ..config import Recipe, check_kwargs
from ..errors import lookup
from ..schedules import SCHEDULES, Schedule
from .resolve import split_named


def schedule_from(recipe: Recipe) -> tuple[Schedule, dict[str, Any]]:
    """(the schedule, its recipe section: exported with a toy student)."""
    name, kw = split_named(recipe.schedule)
    make = lookup(SCHEDULES, name, "schedule")
    return make(**check_kwargs(make, kw, "schedule")), recipe.schedule
