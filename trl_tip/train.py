"""`trl-tip train`: TIP on-policy distillation from a YAML recipe, like `trl distillation --config ...`.

trl-tip train --config recipes/qwen3_8b_to_4b/soft_or_50.yaml [--flag value ...]
python -m trl_tip.train --config recipes/tiny_cpu.yaml
accelerate launch --config_file recipes/accelerate/zero3.yaml -m trl_tip.train --config <recipe>.yaml
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields

import yaml
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from .data import load_prompt_dataset
from .hub.push import HubPushError
from .trainer.benchmark_callback import BenchmarkArguments
from .utils.command_errors import (
    check_config_file,
    debugging,
    exit_with_usage_status,
    usage_errors,
    usage_exit,
)
from .utils.recipe_yaml import check_recipe_keys


# What the checks before training raise (bad fields, recipe, dataset, model path, output folder, Hub token).
SETUP_ERRORS = (ValueError, OSError, yaml.YAMLError, HubPushError)


@dataclass
class TrainScriptArguments(ScriptArguments, BenchmarkArguments):
    """TRL's script arguments (the dataset) plus the benchmarks run when training ends: a recipe keeps `benchmarks`
    and the `benchmark_*` keys beside the dataset's, while `TIPConfig` holds only training settings."""

    def benchmark_arguments(self) -> BenchmarkArguments:
        return BenchmarkArguments(**{f.name: getattr(self, f.name) for f in fields(BenchmarkArguments)})


def make_parser(prog: str | None = None) -> TrlParser:
    from .trainer.tip_config import TIPConfig

    return TrlParser((TrainScriptArguments, TIPConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def main(script_args, training_args, model_args, dataset_args):
    from trl import get_dataset, get_peft_config, get_quantization_config

    from .trainer.dataset_checks import check_datasets
    from .trainer.run_folder import check_output_dir
    from .trainer.tip_trainer import TIPGKDTrainer

    if model_args.model_name_or_path is None:
        raise ValueError(
            "A student model is required: set `model_name_or_path` in the recipe or with --model_name_or_path."
        )
    self_distillation = training_args.teacher_model_kind is not None
    if training_args.teacher_model_name_or_path is None and not self_distillation:
        raise ValueError(
            "A teacher model is required: set `teacher_model_name_or_path` in the recipe or on the command line, or "
            "`teacher_model_kind` (base, live or ema) to make the student its own teacher."
        )

    init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}
    if not self_distillation:  # a self teacher is loaded like the student
        teacher_kwargs = {**init_kwargs, "revision": training_args.teacher_model_revision}
        training_args.teacher_model_init_kwargs = {**teacher_kwargs, **(training_args.teacher_model_init_kwargs or {})}

    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_prompt_dataset(
            script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming
        )
    else:
        raise ValueError("A dataset is required: set `dataset_name` (Hub id, .jsonl file or folder) or `datasets`.")
    if script_args.dataset_train_split not in dataset:
        raise ValueError(
            f"`dataset_train_split` {script_args.dataset_train_split!r} is not in the dataset; it has {list(dataset)}."
        )

    # Before any model loads: the output folder (no other run in it) and the train rows, named by their source.
    resume = training_args.resume_from_checkpoint is not None
    check_output_dir(training_args.output_dir, training_args.overwrite_output_dir, resume)
    source = f"`dataset_name` {script_args.dataset_name!r}" if script_args.dataset_name else "The `datasets` mixture"
    where = f"{source} (split `{script_args.dataset_train_split}`)"
    check_datasets(training_args, dataset[script_args.dataset_train_split], where=where)
    trainer = TIPGKDTrainer(
        model=model_args.model_name_or_path,
        teacher_model=training_args.teacher_model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset.get(script_args.dataset_test_split) if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        benchmark_args=script_args.benchmark_arguments(),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Student and tip_stats/ saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def run(argv: list[str] | None = None, prog: str | None = None):
    """`trl-tip train ...`: an error found before training starts (a bad field, recipe, dataset or output folder) is
    `UsageExit("trl-tip train: <message>")`, one line; one raised while training keeps its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    with usage_errors("train", *SETUP_ERRORS):
        if not argv:
            raise ValueError(
                "give a recipe: trl-tip train --config RECIPE.yaml [--field value ...] (see trl-tip train --help)."
            )
        check_config_file(argv)
        parser = make_parser(prog=prog)
        check_recipe_keys(argv)  # TrlParser's YAML read keeps the last of two keys
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(args=argv)
    try:
        return main(script_args, training_args, model_args, dataset_args)
    except SETUP_ERRORS as error:
        if debugging() or raised_while_training(error):
            raise
        raise usage_exit("train", error) from None


def raised_while_training(error: BaseException) -> bool:
    """Whether `error` came from inside transformers' training loop (a runtime failure, shown with its traceback)
    rather than from the checks and loading before it."""
    traceback = error.__traceback__
    while traceback is not None:
        code = traceback.tb_frame.f_code
        if code.co_name == "_inner_training_loop" or (
            code.co_name == "train" and code.co_filename.endswith(os.path.join("transformers", "trainer.py"))
        ):
            return True
        traceback = traceback.tb_next
    return False


if __name__ == "__main__":
    exit_with_usage_status(lambda argv: run(argv, prog="python -m trl_tip.train"), sys.argv[1:])
