"""Every recipe parses and validates; `trl-tip train` runs the tiny CPU recipe end to end, in and out of process."""

import subprocess
import sys

import paths
import pytest
import yaml

from trl_tip import TIPConfig
from trl_tip.data import load_prompt_dataset
from trl_tip.train import make_parser, run


ROOT = paths.ROOT
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if not {"accelerate", "study"} & set(p.parts))
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
SHARED_DATA = paths.DATA / "eval"


PAIRS = ("qwen3_8b_to_4b", "llama3_70b_to_8b", "qwen25_14b_to_1p5b")


def test_there_is_a_recipe_per_pair_and_variant():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in RECIPES}
    for pair in PAIRS:
        for variant in ("all", "entropy_sampling_50", "soft_or_50", "soft_or_20", "q3_10", "q3_20"):
            assert f"{pair}/{variant}.yaml" in names
    assert "tiny_cpu.yaml" in names


# The presets beyond TIP (README, "Rules from other papers, as presets"): what each recipe must set.
PRESETS = {
    "se_kd_20": {"token_selector": "entropy_topk", "selection_ratio": 0.2, "selection_scope": "sequence"},
    "entropy_top20_batch": {"token_selector": "entropy_topk", "selection_ratio": 0.2, "selection_scope": "batch"},
    "latf_adaptive_10": {
        "token_selector": "divergence_topk",
        "selection_ratio": 0.1,
        "selection_ratio_schedule": "adaptive",
        "selection_ratio_start": 1.0,
    },
    "soft_or_50_cosine": {"token_selector": "soft_or", "selection_ratio": 0.5, "selection_ratio_schedule": "cosine"},
    "paced": {"token_selector": "all", "problem_weighting": "paced", "paced_answer_column": "solution"},
    "fkl_then_rkl": {"token_selector": "all", "beta_schedule": "0:0,0.5:1"},
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_recipes_set_the_rule_they_name(preset, tmp_path):
    recipe = ROOT / "recipes" / "qwen3_8b_to_4b" / f"{preset}.yaml"
    _, config, _, _ = make_parser().parse_args_and_config(
        args=["--config", str(recipe), "--use_cpu", "true", "--output_dir", str(tmp_path)]
    )
    for name, value in PRESETS[preset].items():
        assert getattr(config, name) == value, name
    if preset == "fkl_then_rkl":
        assert [config.beta_schedule_value(p) for p in (0.0, 0.49, 0.5, 0.99)] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_parses_and_validates(recipe, tmp_path):
    # bf16 recipes validate on this CPU-only machine only with use_cpu (CPU autocast); the rest is as written.
    script_args, config, model_args, _ = make_parser().parse_args_and_config(
        args=["--config", str(recipe), "--use_cpu", "true", "--output_dir", str(tmp_path)]
    )
    assert isinstance(config, TIPConfig)
    raw = yaml.safe_load(recipe.read_text())
    assert config.token_selector == raw["token_selector"]
    # Unset, the ratio is 0.5 for the ratio selectors and 1.0 (every token) for `all`.
    assert config.selection_ratio == raw.get("selection_ratio", 1.0 if raw["token_selector"] == "all" else 0.5)
    assert config.beta == 1.0 and config.temperature == 1.0
    # A separate teacher, or the student as its own (self-distillation).
    assert model_args.model_name_or_path and script_args.dataset_name
    assert bool(config.teacher_model_name_or_path) != bool(config.teacher_model_kind)
    config.build_selector()
    if recipe.parent.name in PAIRS:
        assert config.num_rollouts_per_prompt == 16 and config.max_completion_length == 8192
        assert config.learning_rate == (3e-7 if "llama" in recipe.parent.name else 1e-6)
        assert config.lr_scheduler_type == "cosine"


def test_the_self_distillation_recipe_makes_a_lora_student_its_own_base_teacher(tmp_path):
    from trl import get_peft_config

    from trl_tip.trainer.privileged_context import teacher_prompt

    recipe = ROOT / "recipes" / "self_distillation" / "qwen3_4b_base_lora_soft_or_50.yaml"
    _, config, model_args, _ = make_parser().parse_args_and_config(
        args=["--config", str(recipe), "--use_cpu", "true", "--output_dir", str(tmp_path)]
    )
    assert config.teacher_model_kind == "base" and config.teacher_model_name_or_path is None
    assert get_peft_config(model_args) is not None, "base + PEFT: the teacher is the base model, no copy"
    row = {"prompt": [{"role": "user", "content": "Compute 2+3."}], "solution": "5"}
    (message,) = teacher_prompt(row, config.teacher_prompt_template)
    assert message["content"].startswith("Compute 2+3.\n\nThe reference answer is 5.")


@pytest.mark.parametrize("config", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs(config):
    raw = yaml.safe_load(config.read_text())
    cpu = config.stem.endswith("_cpu")
    assert raw["use_cpu"] is cpu
    assert raw["num_processes"] == (2 if cpu else 8)
    expected = {"zero3": "DEEPSPEED", "zero2": "DEEPSPEED", "ddp": "MULTI_GPU"}[config.stem.removesuffix("_cpu")]
    assert raw["distributed_type"] == expected
    if expected == "DEEPSPEED":
        assert raw["deepspeed_config"]["zero_stage"] == int(config.stem[4])


def tiny_overrides(models, output_dir):
    return [
        "--model_name_or_path",
        str(models / "student"),
        "--teacher_model_name_or_path",
        str(models / "teacher"),
        "--dataset_name",
        str(models / "prompts.jsonl"),
        "--output_dir",
        str(output_dir),
    ]


def test_train_runs_the_tiny_recipe(tiny_models, tmp_path):
    trainer = run(
        [
            "--config",
            str(ROOT / "recipes" / "tiny_cpu.yaml"),
            *tiny_overrides(tiny_models, tmp_path),
            "--max_steps",
            "2",
        ]
    )
    assert trainer.state.global_step == 2
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "tip_stats" / "steps.jsonl").is_file()


def test_qwen25_recipe_starts_with_heads_of_different_sizes(tmp_path, caplog):
    """`qwen25_14b_to_1p5b/soft_or_50.yaml` on tiny stand-ins whose heads pad one tokenizer (320 tokens) to different
    sizes, the teacher's more, like Qwen2.5-14B's 152064 rows and Qwen2.5-1.5B's 151936: the trainer starts and trains
    on the shared rows. Overridden for a CPU step: the models and data, float32, no vLLM, 8-token completions."""
    import math

    from trl_tip.testing import save_tiny_pair

    save_tiny_pair(str(tmp_path / "models"), student_vocab_size=328, teacher_vocab_size=360)
    with caplog.at_level("WARNING", logger="trl_tip"):
        trainer = run(
            [
                "--config",
                str(ROOT / "recipes" / "qwen25_14b_to_1p5b" / "soft_or_50.yaml"),
                *tiny_overrides(tmp_path / "models", tmp_path / "out"),
                *("--max_steps", "1", "--max_completion_length", "8", "--use_vllm", "false"),
                *("--dtype", "float32", "--bf16", "false", "--use_cpu", "true"),
            ]
        )
    assert trainer.args.token_selector == "soft_or" and trainer.args.num_rollouts_per_prompt == 16
    assert trainer.state.global_step == 1
    assert math.isfinite(trainer.state.log_history[0]["loss"])
    assert "use the 328 rows both heads share and ignore the teacher head's rows 328-359" in caplog.text


@pytest.mark.slow
def test_console_script_and_module_entry_points(tiny_models, tmp_path):
    help_text = subprocess.run(["trl-tip", "--help"], capture_output=True, text=True, check=True).stdout
    assert "train" in help_text and "tiny-models" in help_text
    module_help = subprocess.run(
        [sys.executable, "-m", "trl_tip.train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--token_selector" in module_help and "--selection_ratio" in module_help
    result = subprocess.run(
        [
            "trl-tip",
            "train",
            "--config",
            str(ROOT / "recipes" / "tiny_cpu.yaml"),
            *tiny_overrides(tiny_models, tmp_path),
            "--max_steps",
            "1",
            "--token_selector",
            "q3",
            "--selection_ratio",
            "0.2",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "tip_stats" / "steps.jsonl").is_file()
    bad = subprocess.run(
        ["trl-tip", "train", "--config", str(ROOT / "recipes" / "tiny_cpu.yaml"), "--selection_ratio", "1.5"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "`selection_ratio` must be a number in (0, 1]; got 1.5" in bad.stderr


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k_test.jsonl").is_file(), reason="tests/data/eval is missing")
def test_gsm8k_jsonl_gets_conversational_prompts():
    dataset = load_prompt_dataset(str(SHARED_DATA / "gsm8k_test.jsonl"))["train"]
    assert dataset.num_rows > 1000
    assert dataset[0]["prompt"][0]["role"] == "user" and dataset[0]["prompt"][0]["content"] == dataset[0]["question"]


def test_dataset_without_prompts_is_rejected(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match=r"needs a `prompt` column \(or `question`/`problem`\); it has \['text'\]"):
        load_prompt_dataset(str(path))
