"""The self teacher's prompt: the student's prompt plus privileged context, from `teacher_prompt_template`.

Composition follows TRL's experimental `SDFTTrainer` (`trl/experimental/sdft/sdft_trainer.py`,
`DemonstrationTeacherContextBuilder._compose_teacher_prompt`): a conversational prompt keeps its system messages and
its last user message is replaced by the formatted template, whose `{prompt}` is that message's text; a plain-text
prompt is formatted directly. Its `_extract_last_user_text` and its way of turning a context into text are imported,
not copied. One difference: TRL formats only `{prompt}` and `{privileged_context}`; here every other `{name}` may be
any dataset column (`"{prompt}\\n\\nThe answer is {answer}."` needs no extra column), checked against the dataset
before training, so a missing one fails at construction, naming it.
"""

from __future__ import annotations

import string
from typing import Any

from ..utils.trl_experimental import import_trl_experimental


PROMPT_FIELD = "prompt"


def _trl_sdft():
    return import_trl_experimental("sdft.sdft_trainer")


def template_fields(template: str) -> list[str]:
    """The names `template` formats, in order of first use; raises ValueError for a field `str.format` would not
    fill from a column (positional `{}`, attribute or index access)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(
            f"`teacher_prompt_template` {template!r} is not a valid format string ({error}). Write literal braces "
            "as `{{` and `}}`."
        ) from error
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"`teacher_prompt_template` {template!r} has the field {{{name}}}; each field must be `{{prompt}}` or "
                "a dataset column's name, e.g. `{privileged_context}`."
            )
        if name not in names:
            names.append(name)
    return names


def check_teacher_prompt_template(template: Any) -> None:
    """Raises ValueError unless `template` is a format string that uses `{prompt}`."""
    if not isinstance(template, str):
        raise ValueError(f"`teacher_prompt_template` must be a string; got {template!r}.")
    names = template_fields(template)
    if PROMPT_FIELD not in names:
        raise ValueError(
            f"`teacher_prompt_template` {template!r} never uses `{{prompt}}`: the teacher would not see the problem. "
            'Include it, e.g. "{prompt}\\n\\n{privileged_context}".'
        )
    if names == [PROMPT_FIELD] and not template.format(prompt="").strip():
        raise ValueError(
            f"`teacher_prompt_template` {template!r} gives the self teacher exactly the student's prompt, so teacher "
            "and student are one model reading one text: every divergence is 0 and nothing trains. Add the "
            'privileged context the student does not see, e.g. "{prompt}\\n\\n{privileged_context}" (a dataset '
            "column)."
        )


def context_columns(template: str) -> list[str]:
    """The dataset columns the template reads (every field but `{prompt}`)."""
    return [name for name in template_fields(template) if name != PROMPT_FIELD]


def check_context_columns(template: str, dataset, split: str) -> None:
    """Raises ValueError when `dataset` (with known columns) lacks a column the template names."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        return
    for name in context_columns(template):
        if name not in columns:
            raise ValueError(
                f"`teacher_prompt_template` {template!r} reads the column `{name}`, which the {split} dataset lacks "
                f"(columns: {columns}). Add a `{name}` column (TRL's self-distillation column is "
                "`privileged_context`: the reference solution, an instruction, ...) or change "
                "`teacher_prompt_template`."
            )


def context_text(value: Any, column: str) -> str:
    """A column's value as the text the template receives: TRL's conversion (a string as is, messages by their texts
    one per line, anything else by `str`)."""
    if value is None:
        raise ValueError(
            f"A row's `{column}` is None, so its teacher prompt cannot be written. Give every row a `{column}` value "
            "(an empty string for no context)."
        )
    return _trl_sdft().DemonstrationTeacherContextBuilder(trainer=None)._stringify_privileged_context(value)


def teacher_prompt(example: dict, template: str) -> str | list[dict]:
    """The teacher's prompt for one dataset row: `template` filled from the row's prompt and columns, in the row's
    prompt format (conversational or plain text)."""
    prompt = example[PROMPT_FIELD]
    values = {name: context_text(example.get(name), name) for name in context_columns(template)}
    if isinstance(prompt, list):
        text = template.format(prompt=_trl_sdft()._extract_last_user_text(prompt), **values)
        return [*prompt[:-1], {"role": "user", "content": text}]
    return template.format(prompt=prompt, **values)
