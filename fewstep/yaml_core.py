"""Recipes and ``key=value`` overrides read with YAML 1.2's core schema, not PyYAML's YAML 1.1 rules.

Under YAML 1.1 (``yaml.safe_load``) ``1e-4`` is the string "1e-4" (a float needs a dot), and ``no``, ``off``,
``on`` and ``yes`` are booleans, so ``optimizer.lr=1e-4`` and ``train.mixed_precision=no`` (the documented values)
were misread. The core schema (YAML 1.2, section 10.3) resolves only ``true``/``false`` as booleans, ``~``/``null``/
empty as null, and decimal, ``0o`` and ``0x`` integers and floats with or without a dot (``1e-4``, ``1E5``, ``.inf``);
everything else is a string. fewstep.config.coerce then reads each value as its setting's declared type (a quoted
``'1e-4'`` for a float is 0.0001, ``yes`` for a boolean is true): docs/cli.md, "How values are read".
"""
from __future__ import annotations

import re
from typing import Any

import yaml


class CoreLoader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2 core-schema scalar resolution (no timestamps, no sexagesimal numbers)."""


CoreLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in
            ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:null",
             "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_CORE = [
    ("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")),
    ("tag:yaml.org,2002:float",
     re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
     list("-+.0123456789")),
]
for _tag, _rx, _first in _CORE:
    CoreLoader.add_implicit_resolver(_tag, _rx, _first)


def _int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)


def _bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    return loader.construct_scalar(node).lower() == "true"


CoreLoader.add_constructor("tag:yaml.org,2002:int", _int)
CoreLoader.add_constructor("tag:yaml.org,2002:bool", _bool)


def load_yaml(text: str) -> Any:
    """``text`` parsed with the YAML 1.2 core schema."""
    return yaml.load(text, Loader=CoreLoader)  # noqa: S506 (a SafeLoader subclass: no Python objects)
