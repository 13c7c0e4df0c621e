"""User-facing errors: one clear line naming what is wrong and the valid options."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")


class FewstepError(Exception):
    """An error caused by input (a name, a path, a value) rather than by a bug.

    The CLI prints its message as one line and exits with code 2.
    """


def lookup(table: Mapping[str, V], name: str, kind: str) -> V:
    """Return ``table[name]`` or raise a FewstepError that lists the valid names."""
    if name not in table:
        raise FewstepError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(table))}")
    return table[name]


def check_choice(value: str, valid: Iterable[str], kind: str) -> str:
    """Raise a FewstepError unless ``value`` is one of ``valid``."""
    valid = list(valid)
    if value not in valid:
        raise FewstepError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")
    return value
