"""The embedded pair's training settings, shared by `trl-tip demo` and every run of `trl-tip study`."""

from __future__ import annotations

import torch

from ..trainer.tip_config import TIPConfig
from .arguments import PairArguments


def pair_config(args: PairArguments, output_dir: str, seed: int, **fields) -> TIPConfig:
    """`args.steps` optimizer steps of `args.batch_size` rollouts of up to `args.max_new_tokens` tokens at
    `args.learning_rate` (cosine schedule, reverse KL at temperature 1 unless `fields` say otherwise), logged every
    step, nothing saved during training, in float32 on the CPU unless CUDA is there; `fields` add the rule (selector,
    ratio, schedules, self teacher) and any other `TIPConfig` field."""
    settings = {"lr_scheduler_type": "cosine", "beta": 1.0, "temperature": 1.0, **fields}
    return TIPConfig(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_completion_length=args.max_new_tokens,
        learning_rate=args.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        seed=seed,
        **settings,
    )
