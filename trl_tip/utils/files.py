"""Writing and reading the run's JSON Lines files (quadrant statistics, evaluation results)."""

from __future__ import annotations

import json
import os


# Staging files carry this suffix until they are complete; `trl-tip push` never uploads them.
STAGING_SUFFIX = ".incomplete"


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a staging file, so a crash never leaves a half-written file behind."""
    staging = f"{path}{STAGING_SUFFIX}"
    with open(staging, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(staging, path)


def write_jsonl_atomically(path: str | os.PathLike, rows: list[dict]) -> None:
    """One JSON object per line (`datasets.load_dataset("json", ...)` reads it), written atomically."""
    write_text_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON Lines file; blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
