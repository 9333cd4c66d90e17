"""Prompt datasets as TRL's trainers read them: a `prompt` column, from a Hub id, a local `.json`/`.jsonl` file or a
`save_to_disk` folder. Below the trainer and the commands, so `trl-tip train`, the demo and the study share it."""

from __future__ import annotations

import functools
import os


PROMPT_COLUMNS = ("question", "problem")


def load_prompt_dataset(name: str, config: str | None = None, streaming: bool = False):
    """
    Loads a dataset by Hub id, local `.json`/`.jsonl` file, or `save_to_disk` folder, and gives it the `prompt` column
    TRL expects: rows with only `question` (GSM8K) or `problem` (MATH) get a one-turn conversational prompt.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isfile(name):
        if not name.endswith((".json", ".jsonl")):
            raise ValueError(f"`dataset_name` {name!r} is a file but not .json/.jsonl; convert it or pass a folder.")
        dataset = load_json_rows(name)
    elif os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
        dataset = load_from_disk(name)
    else:
        dataset = load_dataset(name, name=config, streaming=streaming)
    if not isinstance(dataset, DatasetDict):
        dataset = DatasetDict({"train": dataset})
    for split, data in dataset.items():
        columns = data.column_names or []
        if "prompt" in columns:
            continue
        source = next((c for c in PROMPT_COLUMNS if c in columns), None)
        if source is None:
            raise ValueError(
                f"Split `{split}` of {name!r} needs a `prompt` column (or `question`/`problem`); it has {columns}."
            )
        if not streaming:
            check_rows(
                data, source, text_problem, f"{name!r} (split `{split}`)", f"Give every row its `{source}` text"
            )
        dataset[split] = data.map(functools.partial(_as_prompt, column=source))
    return dataset


def load_json_rows(path: str):
    """A local `.json`/`.jsonl` file as one `datasets.Dataset`; a file that is empty, holds no rows or is not JSON
    rows raises a one-line ValueError naming the file (and the first bad line), instead of `datasets`' traceback."""
    from datasets import load_dataset

    if _is_blank(path):
        raise ValueError(f"{path!r} is empty: it holds no rows (one JSON object per line).")
    try:
        rows = load_dataset("json", data_files=path, split="train")
    except Exception as error:  # StopIteration, DatasetGenerationError, ArrowInvalid, ...: all say "not JSON rows"
        raise ValueError(_json_rows_problem(path, error)) from error
    if rows.num_rows == 0:
        raise ValueError(f"{path!r} holds no rows (one JSON object per line).")
    return rows


def _is_blank(path: str, limit: int = 1 << 20) -> bool:
    size = os.path.getsize(path)
    if size > limit:
        return False
    with open(path, "rb") as f:
        return not f.read().strip()


def _json_rows_problem(path: str, error: BaseException) -> str:
    """Why `datasets` could not read `path` as JSON rows: its first line that is not a JSON object, else the cause."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(1 << 26)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as bad:
            return f"{path!r} line {bad.lineno} is not valid JSON ({bad.msg}, column {bad.colno})."
        if rows == []:
            return f"{path!r} holds no rows (an empty JSON list)."
        kinds = {type(row).__name__ for row in rows if not isinstance(row, dict)} if isinstance(rows, list) else set()
        if kinds:
            return f"{path!r} is a JSON list whose items are not all objects (found {', '.join(sorted(kinds))})."
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as bad:
                return (
                    f"{path!r} line {number} is not valid JSON ({bad.msg}, column {bad.colno}); each line must be "
                    "one JSON object (a row)."
                )
            if not isinstance(row, dict):
                return (
                    f"{path!r} line {number} is a JSON {type(row).__name__}, not an object; each line must be a row."
                )
    cause = error
    for _ in range(10):  # the innermost cause: pyarrow's own words
        if (cause.__cause__ or cause.__context__) is None:
            break
        cause = cause.__cause__ or cause.__context__
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return (
        f"{path!r} could not be read as rows ({type(cause).__name__}: {detail}); check that each column holds one "
        "type in every row."
    )


def text_problem(value) -> str | None:
    """What is wrong with a cell that must hold text: None when it is fine."""
    if value is None:
        return "is null"
    if isinstance(value, str) and not value.strip():
        return "is empty"
    return None


def value_problem(value) -> str | None:
    """What is wrong with a cell that must hold a value (any type): None when it is fine."""
    return "is null" if value is None else None


def prompt_problem(value) -> str | None:
    """What is wrong with a `prompt` cell (text, or a list of `{"role", "content"}` messages): None when it is fine."""
    if value is None:
        return "is null"
    if isinstance(value, str):
        return "is empty" if not value.strip() else None
    if isinstance(value, (list, tuple)):
        if not value:
            return "is a conversation with no messages"
        for position, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                return f"has a message (number {position}) without a `role`"
            if message["role"] in ("system", "user") and message.get("content") is None:
                return f"has a {message['role']} message (number {position}) whose `content` is null"
        contents = [message.get("content") for message in value]
        if all(content is None or (isinstance(content, str) and not content.strip()) for content in contents):
            return "is a conversation whose messages are all empty"
        return None
    return f"is of type {type(value).__name__}, not text or a list of messages"


def first_bad_row(dataset, column: str, problem, batch_size: int = 2048) -> tuple[int, str] | None:
    """The first row of `dataset[column]` for which `problem(cell)` says what is wrong, as (row index, reason)."""
    start = 0
    for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
        for offset, value in enumerate(batch[column]):
            reason = problem(value)
            if reason is not None:
                return start + offset, reason
        start += len(batch[column])
    return None


def check_rows(dataset, column: str, problem, where: str, fix: str) -> None:
    """Raises ValueError naming `where`, the row and the column when a cell of `column` has a `problem`."""
    bad = first_bad_row(dataset, column, problem)
    if bad is not None:
        row, reason = bad
        raise ValueError(f"{where} row {row} (0-based), column `{column}`: the value {reason}. {fix}.")


def _as_prompt(row: dict, column: str) -> dict:
    """A one-turn conversational prompt from the text in `row[column]`."""
    return {"prompt": [{"role": "user", "content": row[column]}]}
