"""YAML recipes read strictly: a key set twice in one mapping is an error, not "the last one wins".

`trl-tip train --config` hands the recipe to TRL's `TrlParser`, which reads it with `yaml.safe_load`; PyYAML keeps the
last of two equal keys without a word, so a recipe that sets `selection_ratio` twice runs with whichever comes last.
[`check_recipe_keys`] reads the recipe first with a loader that refuses such a mapping, naming the key and its lines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import yaml


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` whose mappings refuse a key given twice (merge keys `<<` still override, as YAML says)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    lines: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = lines.setdefault(key, line)
        except TypeError:  # an unhashable key: PyYAML itself refuses it below
            continue
        if first != line:
            raise ValueError(
                f"{key_node.start_mark.name}: `{key}` is set twice (lines {first} and {line}); a recipe sets each "
                "field once. Remove one of them."
            )
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml_strictly(path: str | os.PathLike) -> Any:
    """The YAML document at `path`, as `yaml.safe_load` reads it; raises ValueError when a mapping repeats a key."""
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)


def check_recipe_keys(argv: Sequence[str]) -> None:
    """Refuses the `--config` recipe named in `argv` when it sets a key twice; does nothing without one (a missing
    file is reported where the recipe is read)."""
    argv = list(argv)
    if "--config" not in argv:
        return
    index = argv.index("--config") + 1
    if index < len(argv) and os.path.isfile(argv[index]):
        load_yaml_strictly(argv[index])
