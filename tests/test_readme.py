"""The ```python blocks of the README and of every docs page (docs/**/*.md) run, so they cannot rot.

Each document's blocks run in order, each once, in one namespace and one temporary working directory of that
document's own, as a reader pasting them into one session would: the Quickstart's training example writes
`Qwen3-4B-TIP/`, which its `tip_stats` example reads back. Each block is its own test (`README.md:<line>`,
`docs/quickstart.md:<line>`); selecting one runs the blocks above it in the same document first.

To run on a CPU in seconds with no network, these are the only differences from the documents' text:

- `HUB_MODELS`: Hub model ids, as string literals in a block, are replaced by the tiny student and teacher folders that
  `trl-tip tiny-models` writes (the `tiny_models` fixture of tests/conftest.py).
- `HUB_DATASETS`: `datasets.load_dataset` of these ids loads that folder's tiny prompt file instead; other calls (the
  documents' local json files) go to `datasets` as written.
- `RUN_ON_CPU`: `trl_tip.TIPConfig` builds the config with the block's own fields plus these (CPU, float32, one
  optimizer step, 8-token completions); the batch and rollout fields stay the block's, so `TIPConfig`'s checks run on
  the documents' numbers.
- The Hub is put in offline mode, so a Hub id missing from the tables fails at once (and the test below names it).

A block that needs a GPU or the network is marked in its document by the line `<!-- readme-test: skip (reason) -->`
right above its fence: its test is reported as skipped with that reason, never dropped silently.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import datasets
import huggingface_hub.constants
import paths
import pytest

import trl_tip


README = paths.ROOT / "README.md"
DOCS = paths.ROOT / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
SKIP_MARKER = re.compile(r"^<!-- readme-test: skip \((.+)\) -->$")
# A string literal shaped like a Hub id, `owner/name`.
HUB_ID_LITERAL = re.compile(r"""["']([\w.-]+/[\w.-]+)["']""")

HUB_MODELS = {"Qwen/Qwen3-4B": "student", "Qwen/Qwen3-8B": "teacher"}
HUB_DATASETS = {"trl-lib/DeepMath-103K": "prompts.jsonl"}
RUN_ON_CPU = {"use_cpu": True, "bf16": False, "max_steps": 1, "max_completion_length": 8, "report_to": "none"}


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    source: str
    skip: str | None  # the reason given by a skip marker above the fence


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        above = text[: match.start()].rstrip("\n").rpartition("\n")[2]
        marker = SKIP_MARKER.match(above)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(line, match.group(1), marker.group(1) if marker else None))
    return blocks


BLOCKS = readme_blocks(README.read_text())
# Every docs page with its blocks, by its path from the repository root (`docs/quickstart.md`), in path order.
DOC_BLOCKS = {
    page.relative_to(paths.ROOT).as_posix(): readme_blocks(page.read_text()) for page in sorted(DOCS.rglob("*.md"))
}
# (page, index of the block in its page) for every docs block, and the test ids `docs/<page>.md:<line>`.
DOC_CASES = [(page, index) for page, blocks in DOC_BLOCKS.items() for index in range(len(blocks))]
DOC_IDS = [f"{page}:{DOC_BLOCKS[page][index].line}" for page, index in DOC_CASES]


class ReadmeSession:
    """Runs one document's blocks in order, each at most once, in one namespace and in its own working directory;
    remembers the first failure."""

    def __init__(self, blocks: list[Block], models_dir, workdir, name: str = "README.md"):
        self.blocks, self.models_dir, self.workdir, self.name = blocks, models_dir, workdir, name
        self.namespace = {"__name__": "readme"}
        self.done, self.failure = 0, None

    def source(self, block: Block) -> str:
        source = block.source
        for hub_id, folder in HUB_MODELS.items():
            for quote in "\"'":
                source = source.replace(f"{quote}{hub_id}{quote}", repr(str(self.models_dir / folder)))
        return source

    def run_through(self, index: int) -> None:
        while self.done <= index:
            if self.failure is not None:
                raise RuntimeError(f"an earlier {self.name} block failed: {self.failure}")
            block = self.blocks[self.done]
            if block.skip is None:
                try:
                    with contextlib.chdir(self.workdir):
                        exec(compile(self.source(block), f"{self.name}:{block.line}", "exec"), self.namespace)
                except BaseException as error:
                    self.failure = f"{self.name}:{block.line}: {error!r}"
                    raise
            self.done += 1


@pytest.fixture(scope="module")
def stand_ins(tiny_models):
    """The tiny stand-ins and the offline Hub of the module docstring, for every document's blocks."""
    real_load_dataset = datasets.load_dataset
    real_config = trl_tip.TIPConfig

    def load_dataset(path, *args, **kwargs):
        if path in HUB_DATASETS:
            return real_load_dataset("json", data_files=str(tiny_models / HUB_DATASETS[path]), split=kwargs["split"])
        return real_load_dataset(path, *args, **kwargs)

    def config_on_cpu(**fields):
        return real_config(**{**fields, **RUN_ON_CPU})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "load_dataset", load_dataset)
        patch.setattr(trl_tip, "TIPConfig", config_on_cpu)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield tiny_models


@pytest.fixture(scope="module")
def session(stand_ins, tmp_path_factory):
    return ReadmeSession(BLOCKS, stand_ins, tmp_path_factory.mktemp("readme"))


@pytest.fixture(scope="module")
def doc_sessions(stand_ins, tmp_path_factory):
    """One session per docs page, made when its first block runs: its own namespace and working directory."""
    sessions = {}

    def session_of(page: str) -> ReadmeSession:
        if page not in sessions:
            workdir = tmp_path_factory.mktemp(page.replace("/", "-").removesuffix(".md"))
            sessions[page] = ReadmeSession(DOC_BLOCKS[page], stand_ins, workdir, name=page)
        return sessions[page]

    return session_of


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"README.md:{b.line}" for b in BLOCKS])
def test_readme_python_block_runs(index, session):
    block = BLOCKS[index]
    if block.skip is not None:
        pytest.skip(f"README.md:{block.line} is marked `readme-test: skip`: {block.skip}")
    session.run_through(index)


@pytest.mark.parametrize(("page", "index"), DOC_CASES, ids=DOC_IDS)
def test_docs_python_block_runs(page, index, doc_sessions):
    block = DOC_BLOCKS[page][index]
    if block.skip is not None:
        pytest.skip(f"{page}:{block.line} is marked `readme-test: skip`: {block.skip}")
    doc_sessions(page).run_through(index)


def test_readme_and_docs_have_python_blocks_and_every_hub_id_they_name_has_a_stand_in():
    all_blocks = BLOCKS + [block for blocks in DOC_BLOCKS.values() for block in blocks]
    assert BLOCKS and len(all_blocks) >= 4 and "docs/quickstart.md" in DOC_BLOCKS
    named = {hub_id for b in all_blocks if b.skip is None for hub_id in HUB_ID_LITERAL.findall(b.source)}
    missing = named - set(HUB_MODELS) - set(HUB_DATASETS)
    assert not missing, f"add a tiny stand-in to HUB_MODELS/HUB_DATASETS, or mark the block skipped: {missing}"


def test_a_skip_marker_applies_to_the_block_right_below_it():
    text = (
        "Intro.\n\n"
        "<!-- readme-test: skip (needs a GPU) -->\n```python\nimport torch\ntorch.zeros(1).cuda()\n```\n\n"
        "Text.\n\n```python\nx = 1\n```\n\n```bash\nls\n```\n"
    )
    first, second = readme_blocks(text)
    assert (first.line, first.skip, first.source) == (4, "needs a GPU", "import torch\ntorch.zeros(1).cuda()\n")
    assert (second.line, second.skip, second.source) == (11, None, "x = 1\n")
