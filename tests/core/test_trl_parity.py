"""Pins the private pieces of trl 1.16 that trl_tip relies on, so an upstream change fails here, loudly, first.

Every private kernel symbol is imported by `trl_tip/core/trl_kernels.py` alone (checked below), so a TRL upgrade that
breaks a test here is fixed in that one file.
"""

import inspect
import pathlib
import re

import paths
import pytest
import trl
from packaging.version import Version
from trl.kernels import chunked_divergence, chunked_logprob
from trl.trainer import distillation_trainer
from trl.trainer.distillation_trainer import DistillationTrainer


def test_trl_version_is_the_pinned_minor():
    assert Version("1.16") <= Version(trl.__version__) < Version("1.17")


def test_chunked_divergence_loss_signature_and_call_site():
    """TIPGKDTrainer takes the module-level `_chunked_divergence_loss` call of `_compute_loss` (loss_routing.py)."""
    params = list(inspect.signature(distillation_trainer._chunked_divergence_loss).parameters)
    assert params == [
        "student_hidden_states",
        "teacher_hidden_states",
        "student_lm_head_weight",
        "teacher_lm_head_weight",
        "completion_mask",
        "beta",
        "num_items_in_batch",
        "student_lm_head_bias",
        "teacher_lm_head_bias",
        "student_logit_scale",
        "teacher_logit_scale",
        "student_final_logit_softcapping",
        "teacher_final_logit_softcapping",
        "temperature",
    ]
    source = inspect.getsource(DistillationTrainer._compute_loss)
    assert "_chunked_divergence_loss(" in source
    assert "return loss, entropy_sum.detach(), n_valid" in source


def test_trainer_hooks_keep_their_signatures():
    def params(fn):
        return list(inspect.signature(fn).parameters)

    assert params(DistillationTrainer.compute_loss) == [
        "self",
        "model",
        "inputs",
        "return_outputs",
        "num_items_in_batch",
    ]
    assert params(DistillationTrainer._generate_single_turn) == [
        "self",
        "prompt_ids",
        "images",
        "multimodal_fields",
        "has_tool_images",
    ]
    assert params(DistillationTrainer._generate_and_score_completions) == ["self", "inputs"]
    assert params(DistillationTrainer._save_rng_state) == ["self", "output_dir"]
    assert params(DistillationTrainer._load_rng_state) == ["self", "checkpoint"]
    assert "num_items_in_batch" in inspect.getsource(DistillationTrainer._generate_and_score_completions)
    # compute_loss reads the per-batch normalizer from the inputs; TIP substitutes the selected-token count there.
    assert 'inputs["num_items_in_batch"]' in inspect.getsource(DistillationTrainer.compute_loss)
    # _generate routes every rollout through _generate_single_turn, where dataset completions stand in (lmbda < 1).
    assert "self._generate_single_turn(" in inspect.getsource(DistillationTrainer._generate)


def test_kernel_internals_used_by_the_statistics_pass():
    for name in ("_project", "_stats_tile", "_stats_kernel", "_compute_dtype", "TOKEN_CHUNK_SIZE", "VOCAB_CHUNK_SIZE"):
        assert hasattr(chunked_divergence, name), name
    for name in ("_BLOCK_SIZE", "_use_triton", "_jit", "_transform", "_torch_transform"):
        assert hasattr(chunked_logprob, name), name
    # The teacher-entropy fold applies TRL's logit transform, in Triton and in torch, with these arguments.
    for transform in (chunked_logprob._torch_transform, getattr(chunked_logprob._transform, "fn", None)):
        if transform is not None:
            assert list(inspect.signature(transform).parameters) == [
                "z",
                "logit_scale",
                "softcap",
                "inv_t",
                "HAS_SOFTCAP",
            ]
    assert list(inspect.signature(chunked_divergence._stats_tile).parameters) == [
        "s_tile",
        "s_stride",
        "t_tile",
        "t_stride",
        "s_max",
        "s_sum",
        "s_x_sum",
        "t_max",
        "t_sum",
        "t_weighted_gap",
        "s_weighted_gap",
        "n_cols",
        "s_scale",
        "s_softcap",
        "t_scale",
        "t_softcap",
        "inv_t",
        "S_HAS_SOFTCAP",
        "T_HAS_SOFTCAP",
        "BLOCK_SIZE",
    ]
    assert list(inspect.signature(chunked_divergence._project).parameters) == [
        "tile",
        "hidden_chunk",
        "weight",
        "bias",
        "start",
        "end",
        "dtype",
    ]
    backward = inspect.getsource(chunked_divergence.ChunkedDivergenceFunction.backward)
    # DivergenceFromStats hands TRL's backward a context with exactly these attributes.
    for attribute in (
        "ctx.saved_tensors",
        "ctx.dtypes",
        "ctx.needs_input_grad",
        "ctx.beta",
        "ctx.mode",
        "ctx.kernel_args",
    ):
        assert attribute in backward, attribute


def test_kernel_walks_the_student_rows_and_slices_the_teacher_by_them():
    """Heads of different sizes (`trl_kernels.on_shared_rows`): TRL's tiles read the row count from the student head
    after the gather and slice both heads by it, so a longer teacher head needs no cut; a longer student head is cut by
    `StudentHeadCut`, which runs TRL's forward on a stand-in context recording only these calls."""
    function = chunked_divergence.ChunkedDivergenceFunction
    forward, backward = inspect.getsource(function.forward), inspect.getsource(function.backward)
    for source in (forward, backward):
        assert "vocab = student_weight.shape[0]" in source
    project = inspect.getsource(chunked_divergence._project)
    assert "weight[start:end]" in project and "bias[start:end]" in project
    recorded = {"set_materialize_grads", "save_for_backward", "mark_non_differentiable"}
    assert set(re.findall(r"ctx\.(\w+)\(", forward)) <= recorded
    assert "ctx.saved_tensors" in backward and "ctx.needs_input_grad[:3]" in backward


def test_stats_kernel_takes_the_arguments_of_its_eager_twin():
    """On CUDA the statistics pass launches TRL's Triton `_stats_kernel` with the arguments it gives `_stats_tile`: the
    first twelve by position (tiles, strides, accumulators, column count), the logit transforms and block size by
    name. Triton names its pointers `*_ptr`, so the positional ones are compared by count, the named ones by name."""
    kernel = chunked_divergence._stats_kernel
    python_function = getattr(kernel, "fn", None)
    if python_function is None:
        import pytest

        pytest.skip("Triton is not installed (CPU build of torch): TRL defines no Triton kernel to check.")
    kernel_params = list(inspect.signature(python_function).parameters)
    eager_params = list(inspect.signature(chunked_divergence._stats_tile).parameters)
    assert len(kernel_params) == len(eager_params)
    by_name = ["s_scale", "s_softcap", "t_scale", "t_softcap", "inv_t", "S_HAS_SOFTCAP", "T_HAS_SOFTCAP", "BLOCK_SIZE"]
    assert kernel_params[12:] == eager_params[12:] == by_name


@pytest.mark.slow
def test_math_modules_stand_alone_without_the_trainer():
    """trl_tip's math (stats, selectors, quadrants, loss) imports neither our trainer nor TRL's."""
    import subprocess
    import sys

    code = (
        "import sys, trl_tip.core.stats, trl_tip.core.selectors, trl_tip.core.quadrants, trl_tip.core.loss, trl_tip\n"
        "banned = ('trl_tip.trainer', 'trl_tip.config', 'trl.trainer.distillation_trainer')\n"
        "loaded = [m for m in banned if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert trl_tip.TIPGKDTrainer.__name__ == 'TIPGKDTrainer'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_core_loads_no_trainer():
    """`import trl_tip.core` (every module of it) loads neither transformers' `Trainer`, TRL's trainers nor ours."""
    import subprocess
    import sys

    code = (
        "import pkgutil, importlib, sys, trl_tip.core\n"
        "for info in pkgutil.iter_modules(trl_tip.core.__path__):\n"
        "    importlib.import_module('trl_tip.core.' + info.name)\n"
        "banned = ('transformers.trainer', 'trl.trainer.distillation_trainer', 'trl_tip.trainer')\n"
        "loaded = [m for m in sys.modules if m in banned or m.startswith(tuple(b + '.' for b in banned))]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_the_adapter_imports_private_trl_kernel_symbols():
    """One module of trl_tip imports `trl.kernels` and names its private helpers: the adapter `core/trl_kernels.py`."""
    import trl_tip

    package = paths.ROOT / "trl_tip"
    assert pathlib.Path(trl_tip.__file__).parent == package
    kernel_import = re.compile(r"^\s*(from|import)\s+trl\.kernels", re.MULTILINE)
    private = re.compile(
        r"\b(_project|_stats_tile|_stats_kernel|_compute_dtype|_BLOCK_SIZE|_use_triton|_jit|_transform|_torch_transform)\b"
    )
    offenders = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.name != "trl_kernels.py" and (kernel_import.search(text := path.read_text()) or private.search(text))
    )
    assert offenders == [], f"import these through trl_tip.core.trl_kernels instead: {offenders}"
