"""TIPConfig documents itself like TRL's configs: every field of its own in the docstring, grouped in `> Parameters
that control ...` sections, with the same text as its `--help`; the note on defaults matches `DistillationConfig`."""

import ast
import dataclasses
import re

import pytest
from transformers import HfArgumentParser
from trl import DistillationConfig

from trl_tip import TIPConfig


ENTRY = re.compile(r"^ {8}(\w+) \((.+)\):$")
SECTION = re.compile(r"^ {8}> Parameters that control .+$")
BULLET = re.compile(r"^ {4}> - `(\w+)`: Defaults to `([^`]+)`")
# Instantiating a config runs TrainingArguments' checks; bf16 (TRL's default) needs a GPU unless use_cpu is set.
CPU = {"use_cpu": True, "bf16": False}


def normalized(text: str) -> str:
    return " ".join(text.split())


def docstring_entries() -> dict[str, tuple[str, str]]:
    """`{field: (type line, text)}` of the docstring's Parameters section, in order."""
    doc = TIPConfig.__doc__
    section = doc[doc.index("\n    Parameters:\n") : doc.index("\n    > [!NOTE]")]
    entries, current = {}, None
    for line in section.splitlines()[2:]:
        match = ENTRY.match(line)
        if match:
            current = match.group(1)
            assert current not in entries, f"{current} is documented twice"
            entries[current] = [match.group(2), []]
        elif SECTION.match(line) or not line.strip():
            current = None
        else:
            assert current is not None and line.startswith(" " * 12), f"unexpected docstring line: {line!r}"
            entries[current][1].append(line)
    return {name: (kind, normalized(" ".join(text))) for name, (kind, text) in entries.items()}


def own_fields() -> list[dataclasses.Field]:
    inherited = {f.name for f in dataclasses.fields(DistillationConfig)}
    return [f for f in dataclasses.fields(TIPConfig) if f.name not in inherited]


def default_of(cls, name: str):
    spec = {f.name: f for f in dataclasses.fields(cls)}[name]
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def test_every_own_field_is_documented_with_its_help_text():
    entries = docstring_entries()
    fields = own_fields()
    assert [f.name for f in fields] == list(entries), "the docstring lists TIPConfig's own fields, in field order"
    for spec in fields:
        kind, text = entries[spec.name]
        assert normalized(spec.metadata["help"]) == text, f"`{spec.name}`: help= and the docstring differ"
        stated = re.search(r"defaults to `([^`]+)`", kind)
        if stated:
            assert ast.literal_eval(stated.group(1)) == spec.default, f"`{spec.name}`: the stated default is wrong"
        else:
            assert spec.default is None, f"`{spec.name}` has a default the docstring does not state"


def test_docstring_groups_fields_in_sections_like_trl():
    doc = TIPConfig.__doc__
    sections = re.findall(r"^ {8}> Parameters that control (.+)$", doc, flags=re.MULTILINE)
    assert len(sections) >= 6
    trl_sections = re.findall(r"^ {8}> Parameters that control (.+)$", DistillationConfig.__doc__, flags=re.MULTILINE)
    assert trl_sections, "TRL's DistillationConfig no longer groups its docstring this way"


def test_help_renders_on_the_command_line():
    # argparse %-formats help strings: a bare `%` in a help text would break `trl-tip train --help`.
    help_text = HfArgumentParser(TIPConfig).format_help()
    for spec in own_fields():
        assert f"--{spec.name}" in help_text


def test_note_lists_exactly_the_defaults_that_differ_from_distillation_config(tmp_path):
    note = TIPConfig.__doc__[TIPConfig.__doc__.index("> [!NOTE]") :]
    bullets = dict(match.groups() for match in map(BULLET.match, note.splitlines()) if match)
    assert bullets, "the note lists TIP's defaults"

    inherited = {f.name for f in dataclasses.fields(DistillationConfig)}
    # Inherited fields TIPConfig redeclares with another default ...
    redeclared = set(TIPConfig.__annotations__) & inherited
    differing = {name for name in redeclared if default_of(TIPConfig, name) != default_of(DistillationConfig, name)}
    # ... or whose value TIPConfig's __post_init__ changes.
    tip, trl = TIPConfig(output_dir=str(tmp_path), **CPU), DistillationConfig(output_dir=str(tmp_path), **CPU)
    differing |= {name for name in inherited if repr(getattr(tip, name)) != repr(getattr(trl, name))}

    listed_inherited = {name for name in bullets if name in inherited}
    assert listed_inherited == differing
    if not differing:
        assert "overrides no default of [`~trl.DistillationConfig`]" in note
    for name in ("beta", "temperature"):
        # The note names them as kept; they must still be TRL's.
        assert default_of(TIPConfig, name) == default_of(DistillationConfig, name) == 1.0
    own = {f.name for f in own_fields()}
    for name, value in bullets.items():
        assert name in own | inherited, f"the note names an unknown field `{name}`"
        if name in own:
            assert ast.literal_eval(value) == default_of(TIPConfig, name), f"`{name}`: the note states a wrong default"
    # The defaults that make a TIP run differ from plain on-policy distillation: 50% soft_or, selected-token scale.
    assert {"token_selector", "selection_ratio", "loss_normalization"} <= set(bullets)


@pytest.mark.parametrize("name", ["token_selector", "selection_scope", "loss_normalization", "normalization_scope"])
def test_choice_fields_keep_their_choices(name):
    spec = {f.name: f for f in dataclasses.fields(TIPConfig)}[name]
    assert spec.default in spec.metadata["choices"]
