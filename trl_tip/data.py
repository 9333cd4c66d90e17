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
        dataset = load_dataset("json", data_files=name)
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
        dataset[split] = data.map(functools.partial(_as_prompt, column=source))
    return dataset


def _as_prompt(row: dict, column: str) -> dict:
    """A one-turn conversational prompt from the text in `row[column]`."""
    return {"prompt": [{"role": "user", "content": row[column]}]}
