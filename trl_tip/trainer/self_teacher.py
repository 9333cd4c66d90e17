"""Self-distillation in `TIPGKDTrainer`: the student, reading privileged context, as its own teacher.

The teacher kinds are TRL's (`trl/experimental/sdft/`, `SDFTConfig.teacher_model_kind`), and so is their setup:

- `live`: the current student. No copy: TRL's `teacher_model` slot holds a [`SelfTeacher`], a module without
  parameters that forwards through the student's backbone under no_grad and hands TRL the student's head detached.
  (SDFT sets `teacher_model = model` instead; here that would let TRL's `teacher_model.eval()` switch the student out
  of training mode and let the teacher's logits carry gradients into the student's head.)
- `base`: the student's weights at the start of training. A PEFT student's base model with its adapters disabled
  (TRL's `use_adapter(model, None)`), no copy; otherwise one frozen copy, made before TRL builds the trainer and then
  prepared by TRL like any teacher: under ZeRO-3 `prepare_deepspeed` shards it over the processes (each holds 1/N of
  it, gathered layer by layer in the teacher's forward), under DDP every process holds it whole, outside DDP's
  wrapper. SDFT loads the copy from the student's path after the student is sharded; copying first also covers a
  student built in memory.
- `ema`: that copy, moved toward the student after each `teacher_sync_steps` optimizer steps by TRL's
  `SyncTeacherModelCallback` (`teacher = (1 - teacher_update_rate) * teacher + rate * student`, gathering ZeRO-3
  shards). Its weights are saved in each checkpoint, so a resume continues from them. A PEFT student is refused: TRL's
  PEFT variant averages the LoRA factors A and B separately, whose product is not an average of the student.

Privileged context: the teacher reads its own prompt (`teacher_prompt_template`, chat template applied, left-padded)
followed by exactly the student's completion tokens and completion mask. Both sequences end with the same completion
block, so TRL's slice of the last `logits_to_keep` hidden states lines the two up position by position whatever the
prompt lengths; statistics, selection, normalization and the loss then run unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import torch
from accelerate.utils import is_peft_model
from torch import nn
from trl.trainer.utils import pad, use_adapter

from ..utils.trl_experimental import import_trl_experimental
from .privileged_context import check_context_columns, teacher_prompt


TEACHER_PROMPT_IDS = "teacher_prompt_ids"
TEACHER_PROMPT_MASK = "teacher_prompt_mask"
EMA_STATE_FILE = "self_teacher_{rank}.pt"


class _DetachedHead:
    """The student's output embedding as TRL reads a teacher's (`.weight`, `.bias`), detached on every read (a
    ZeRO-3 shard excepted, see `weight`): the teacher's logits carry no gradient, and a read inside the step sees the
    weights as they are then."""

    def __init__(self, head: nn.Module):
        self._head = head

    @property
    def weight(self) -> torch.Tensor:
        weight = self._head.weight
        # A ZeRO-3 shard stays the parameter itself: the loss's `maybe_gather_lm_head_ctx` must see DeepSpeed's
        # attributes to gather it. No gradient reaches it through the teacher's slot: TIP's and TRL's divergence
        # functions return no gradient for the teacher's head, and the statistics run under no_grad.
        return weight if hasattr(weight, "ds_status") else weight.detach()

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self._head, "bias", None)
        return None if bias is None else bias.detach()


class SelfTeacher(nn.Module):
    """
    The student's own weights in TRL's `teacher_model` slot, for the `live` teacher and a PEFT student's `base`.

    It registers no parameter (the student is held outside `nn.Module`'s registry), so the run keeps one set of
    weights, and `.eval()`, `.to()` or an optimizer built over it never touch the student. `TIPGKDTrainer` runs its
    forward through the student's backbone, in eval mode and under no_grad, with the adapters disabled for `base`.
    """

    def __init__(self, student: nn.Module, kind: str):
        super().__init__()
        self.__dict__["student"] = student
        self.kind = kind

    @property
    def config(self):
        return self.student.config

    def get_output_embeddings(self) -> _DetachedHead:
        return _DetachedHead(self.student.get_output_embeddings())

    @contextlib.contextmanager
    def weights(self) -> Iterator[nn.Module]:
        """The student as this teacher: eval mode (no dropout), its adapters off for `base`."""
        student = self.student
        training = student.training
        student.train(False)
        try:
            with use_adapter(student, None) if self.kind == "base" else contextlib.nullcontext():
                yield student
        finally:
            student.train(training)


def check_self_teacher(args, model, teacher_model, peft_config, train_dataset, eval_dataset) -> None:
    """Raises ValueError at construction for a self teacher that cannot run as asked, naming the field."""
    kind = args.teacher_model_kind
    if kind is None:
        return
    if teacher_model is not None:
        raise ValueError(
            f"`teacher_model_kind`={kind!r} makes the student its own teacher, but `teacher_model` was passed too. "
            "Drop `teacher_model=` for self-distillation, or unset `teacher_model_kind` to distill from it."
        )
    if kind == "ema" and _trains_an_adapter(model, peft_config):
        raise ValueError(
            '`teacher_model_kind="ema"` needs a full-parameter student: with a PEFT adapter, TRL\'s EMA teacher '
            "averages the LoRA factors A and B separately, and their product is not an average of the student. Use "
            '`teacher_model_kind="base"` (the base model, adapters disabled: no copy) or `"live"`, or train without '
            "`peft_config`."
        )
    check_context_columns(args.teacher_prompt_template, train_dataset, "train")
    evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval", eval_dataset)]
    for name, dataset in evals:
        if dataset is not None:
            check_context_columns(args.teacher_prompt_template, dataset, f"`{name}`" if name != "eval" else "eval")


def _trains_an_adapter(model, peft_config) -> bool:
    """Whether the student trains a PEFT adapter: one is given, or the model passed already carries one."""
    return peft_config is not None or (not isinstance(model, str) and is_peft_model(model))


def frozen_copy_source(args, model, peft_config):
    """What TRL should load as the teacher for `base`/`ema` without PEFT: a copy of the student (the same path, or a
    deep copy of a model built in memory, taken before TRL shards or wraps the student); `None` when no copy is kept
    (`live`, or `base` on a PEFT student)."""
    kind = args.teacher_model_kind
    if kind == "live" or (kind == "base" and _trains_an_adapter(model, peft_config)):
        return None
    if isinstance(model, str):
        return model
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


@contextlib.contextmanager
def teacher_loaded_like_student(args, teacher_model) -> Iterator[None]:
    """While TRL builds the trainer, a copy given as a path loads with the student's `model_init_kwargs` (a self
    teacher has no `teacher_model_init_kwargs` of its own: `TIPConfig` refuses them)."""
    if not isinstance(teacher_model, str):
        yield
        return
    args.teacher_model_init_kwargs = dict(args.model_init_kwargs or {})
    try:
        yield
    finally:
        args.teacher_model_init_kwargs = None


class SelfTeacherMixin:
    """Self-distillation hooks of [`TIPGKDTrainer`]; a mixin over TRL's `DistillationTrainer`."""

    _teacher_inputs: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def self_distillation(self) -> bool:
        return self.args.teacher_model_kind is not None

    def _init_self_teacher(self) -> None:
        """After TRL's `__init__`: the teacher slot for `live`/PEFT `base`, the EMA callback for `ema`."""
        if not self.self_distillation:
            return
        if self._is_vlm:
            raise ValueError(
                "Self-distillation (`teacher_model_kind`) supports text models; the teacher prompt of a "
                "vision-language model would need its images placed again. Unset `teacher_model_kind` and pass a "
                "`teacher_model`."
            )
        if self.teacher_model is None:
            self.teacher_model = SelfTeacher(self.model, self.args.teacher_model_kind)
        elif self.args.teacher_model_kind == "ema":
            sync = import_trl_experimental("sdft.teacher_sync").SyncTeacherModelCallback
            self.add_callback(sync(teacher_model=self.teacher_model, accelerator=self.accelerator))

    def _add_teacher_prompts(self, inputs: list[dict], output: dict) -> None:
        """Adds the teacher prompts of a generated batch (left-padded like TRL's prompts) to `output`, row by row."""
        if not self.self_distillation:
            return
        prompts = [teacher_prompt(example, self.args.teacher_prompt_template) for example in inputs]
        ids = [torch.tensor(row) for row in self._tokenize_prompts(prompts)[0]]
        masks = [torch.ones_like(row) for row in ids]
        device = output["prompt_ids"].device
        padding = {"padding_side": "left", "pad_to_multiple_of": self.pad_to_multiple_of}
        output[TEACHER_PROMPT_IDS] = pad(ids, padding_value=self._tokenizer.pad_token_id, **padding).to(device)
        output[TEACHER_PROMPT_MASK] = pad(masks, padding_value=0, **padding).to(device)

    @contextlib.contextmanager
    def _teacher_reads_privileged_context(self, inputs: dict) -> Iterator[None]:
        """Within the block, the teacher's forward reads this micro-batch's teacher prompt + completion."""
        if not self.self_distillation:
            yield
            return
        self._teacher_inputs = (
            torch.cat([inputs[TEACHER_PROMPT_IDS], inputs["completion_ids"]], dim=1),
            torch.cat([inputs[TEACHER_PROMPT_MASK], inputs["completion_mask"]], dim=1),
        )
        try:
            yield
        finally:
            self._teacher_inputs = None

    def _get_last_hidden_state(self, unwrapped_model, input_ids, attention_mask, logits_to_keep, **multimodal):
        # TRL calls this for the student and, through `_forward_redirection`, for the unwrapped teacher; only the
        # teacher's call gets the teacher's sequence. Both end with the same `logits_to_keep` completion positions.
        teacher = self.accelerator.unwrap_model(self.teacher_model) if self._teacher_inputs is not None else None
        if teacher is None or unwrapped_model is not teacher:
            return super()._get_last_hidden_state(
                unwrapped_model, input_ids, attention_mask, logits_to_keep, **multimodal
            )
        input_ids, attention_mask = self._teacher_inputs
        if not isinstance(teacher, SelfTeacher):
            return super()._get_last_hidden_state(teacher, input_ids, attention_mask, logits_to_keep)
        with torch.no_grad(), teacher.weights() as student:
            return super()._get_last_hidden_state(student, input_ids, attention_mask, logits_to_keep)

    # ----------------------------------------------------------------------------------------------------------------
    # The EMA teacher's weights travel with each checkpoint (per process: under ZeRO-3 each holds its own shard).

    def _ema_teacher_tensors(self) -> tuple[dict[str, torch.Tensor], bool]:
        """The EMA teacher's tensors this process holds (its ZeRO-3 shard, else the whole weights), and whether
        they are shards."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        tensors = {name: getattr(p, "ds_tensor", p.data) for name, p in teacher.named_parameters()}
        return tensors, any(hasattr(p, "ds_tensor") for p in teacher.parameters())

    def _save_self_teacher(self, output_dir: str) -> None:
        if self.args.teacher_model_kind != "ema":
            return
        tensors, sharded = self._ema_teacher_tensors()
        if sharded or self.accelerator.is_main_process:
            name = EMA_STATE_FILE.format(rank=self.accelerator.process_index if sharded else "all")
            torch.save({k: v.detach().cpu() for k, v in tensors.items()}, os.path.join(output_dir, name))

    def _load_self_teacher(self, checkpoint: str) -> None:
        if self.args.teacher_model_kind != "ema":
            return
        for rank in (self.accelerator.process_index, "all"):
            path = os.path.join(checkpoint, EMA_STATE_FILE.format(rank=rank))
            if os.path.isfile(path):
                saved = torch.load(path, weights_only=True)
                with torch.no_grad():
                    for name, tensor in self._ema_teacher_tensors()[0].items():
                        tensor.copy_(saved[name].to(tensor.device, tensor.dtype))
                return
        raise FileNotFoundError(
            f"{checkpoint} has no EMA teacher ({EMA_STATE_FILE.format(rank='all')} or per-process files): it was not "
            'saved by a `teacher_model_kind="ema"` run, so resuming would restart the teacher from the initial '
            "weights. Resume from a checkpoint of this run."
        )
