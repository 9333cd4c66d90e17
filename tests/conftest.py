import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrinks TRL's tile sizes so a tiny test crosses several token and vocabulary tiles, as real shapes do."""
    import trl.kernels.chunked_divergence as kernel

    monkeypatch.setattr(kernel, "TOKEN_CHUNK_SIZE", 3)
    monkeypatch.setattr(kernel, "VOCAB_CHUNK_SIZE", 16)
    return {"token_chunk_size": 3, "vocab_chunk_size": 16}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny student, teacher and prompt file written by `trl-tip tiny-models`, shared by the CLI and demo tests."""
    from trl_tip.cli import main as cli_main

    out = tmp_path_factory.mktemp("tiny-models")
    cli_main(["tiny-models", "--output-dir", str(out), "--num-prompts", "16"])
    return out
