"""Checks of the models a `TIPGKDTrainer` is given, before and while it trains (issue 24, "models are trusted").

- A model named by a local path that is not there is refused as "no such folder" before anything loads
  ([`check_model_sources`]); transformers would speak of Hub repo ids or of connecting to the Hub.
- Both heads are checked finite once, when the trainer is built ([`check_heads_finite`]): a NaN in a head's weights
  otherwise surfaces as a NaN loss or a crash deep in the statistics.
- Each generation batch is checked by [`RolloutWatch`]: prompts (with the completion budget) longer than a model's
  context are warned about once, and a sampled id past the rows the teacher has is refused with its cause.

Tokenizers are compared by content, and ids past the teacher's rows are kept out of sampling, in `head_rows.py`.
"""

from __future__ import annotations

import logging

import torch

from ..models import check_model_folder
from .self_teacher import TEACHER_PROMPT_MASK


logger = logging.getLogger(__name__)


def check_model_sources(model, teacher_model, args) -> None:
    """Refuses, before anything loads, a student or teacher named by a local path that is not a saved model folder,
    naming the argument (`model`, `teacher_model` or `teacher_model_name_or_path`)."""
    sources = [(model, "model"), (teacher_model, "teacher_model")]
    if teacher_model is None:
        sources.append((args.teacher_model_name_or_path, "teacher_model_name_or_path"))
    for source, field in sources:
        if isinstance(source, str):
            check_model_folder(source, field)


def _local_values(weight: torch.Tensor) -> torch.Tensor:
    """The part of a head's weight this process holds: a ZeRO-3 partition, an FSDP2 shard, or the whole tensor."""
    weight = getattr(weight, "ds_tensor", weight)
    return weight.to_local() if hasattr(weight, "to_local") else weight


def check_heads_finite(trainer) -> None:
    """
    Raises ValueError when the student's or the teacher's output head holds NaN or infinite weights, naming the model
    and counting them. Once, when the trainer is built (one pass over each head; each process checks what it holds).
    A self teacher shares the student's head.
    """
    models = [("student", trainer.accelerator.unwrap_model(trainer.model))]
    if trainer.teacher_model is not None and trainer.args.teacher_model_kind is None:
        models.append(("teacher", trainer.accelerator.unwrap_model(trainer.teacher_model)))
    for role, model in models:
        head = model.get_output_embeddings()
        if head is None:
            continue
        for part in ("weight", "bias"):
            values = getattr(head, part, None)
            if values is None:
                continue
            values = _local_values(values).detach()
            bad = int((~torch.isfinite(values)).sum()) if values.numel() else 0
            if bad:
                raise ValueError(
                    f"The {role} model's output head (`lm_head.{part}`) holds {bad} NaN or infinite values of "
                    f"{values.numel()}: every next-token distribution it gives would be NaN. Load a {role} whose "
                    "weights are finite (check the checkpoint, or the dtype it was converted to)."
                )


def _context(model) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


class RolloutWatch:
    """
    Checks each generated batch, with one host sync:

    - the longest prompt plus `max_completion_length` against the student's and the teacher's context
      (`max_position_embeddings`): warned about once per run, after which the length is no longer read;
    - for a student head longer than the teacher's, that no sampled id reaches past the teacher's rows (they are
      kept out of sampling, `head_rows.never_sample_rows_past`; a generator that ignores that is refused here, before
      the teacher's forward would fail with an IndexError).
    """

    def __init__(self, trainer, student_rows: int, teacher_rows: int):
        student = trainer.accelerator.unwrap_model(trainer.model)
        contexts = [("student", _context(student))]
        if trainer.teacher_model is not None and trainer.args.teacher_model_kind is None:
            contexts.append(("teacher", _context(trainer.accelerator.unwrap_model(trainer.teacher_model))))
        self.contexts = [(role, size) for role, size in contexts if isinstance(size, int)]
        self.max_completion_length = trainer.args.max_completion_length
        # The heads' row counts from their configs (`head_rows.vocab_sizes`; 0 and 0 for a self teacher).
        self.teacher_rows = teacher_rows if student_rows > teacher_rows else None
        self.warned = False

    def see(self, output: dict) -> None:
        checks, names = [], []
        if not self.warned and self.contexts:
            # A self teacher reads its own, longer prompt with the same completion.
            masks = [output[key] for key in ("prompt_mask", TEACHER_PROMPT_MASK) if key in output]
            checks.append(torch.stack([mask.sum(dim=1).max() for mask in masks]).max())
            names.append("prompt")
        if self.teacher_rows is not None and output["completion_ids"].numel():
            checks.append(output["completion_ids"].max())
            names.append("max_id")
        if not checks:
            return
        values = dict(zip(names, torch.stack([c.to(torch.long) for c in checks]).tolist()))
        if "max_id" in values and values["max_id"] >= self.teacher_rows:
            raise ValueError(
                f"A rollout sampled the token id {values['max_id']}, past the {self.teacher_rows} rows the teacher's "
                "head and embedding have (the student's head is longer). Those ids are suppressed in generation; a "
                "generator that ignores `suppress_tokens` (or vLLM's `logit_bias`) cannot be used with this pair."
            )
        if "prompt" in values:
            self._warn_if_too_long(values["prompt"])

    def _warn_if_too_long(self, longest: int) -> None:
        for role, context in self.contexts:
            if longest + self.max_completion_length <= context:
                continue
            self.warned = True
            alone = " (the prompt alone is longer)" if longest > context else ""
            logger.warning(
                f"A prompt of {longest} tokens plus `max_completion_length`={self.max_completion_length} makes "
                f"sequences of up to {longest + self.max_completion_length} positions, past the {role}'s context "
                f"(`max_position_embeddings`={context}){alone}: positions beyond it are outside what the model was "
                "trained on, and its distributions there are not to be trusted. Shorten the prompts or "
                "`max_completion_length`, or use models with a longer context. (Warned once per run.)"
            )
            return
