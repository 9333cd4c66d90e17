"""Rollouts of `TIPGKDTrainer`: several rollouts per prompt, and GKD's `lmbda` mix of on-policy student rollouts
with the dataset's own completions."""

from __future__ import annotations

from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import RepeatSampler


def rollout_loss_mask(output: dict):
    """The tokens of a generated batch that can enter the loss: the completion mask without tool-output tokens."""
    mask = output["completion_mask"]
    return mask * output["tool_mask"] if "tool_mask" in output else mask


class RolloutMixin:
    """Sampler and generation hooks of [`TIPGKDTrainer`]; a mixin over TRL's `DistillationTrainer`.

    `_dataset_examples` holds the (prompt, completion) pairs of the dataset while an off-policy batch is built;
    `None` means the student generates.
    """

    _dataset_examples = None

    @property
    def _generation_batch_size(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps

    def _get_train_sampler(self, dataset=None):
        rollouts = self.args.num_rollouts_per_prompt
        if rollouts == 1:
            return super()._get_train_sampler(dataset)
        # TRL's sampler with each prompt repeated: the batch holds generation_batch / rollouts distinct prompts.
        return RepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=rollouts,
            batch_size=self._generation_batch_size // rollouts,
            repeat_count=self.args.gradient_accumulation_steps,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _draw_off_policy(self, inputs) -> bool:
        """One on/off-policy draw per generation batch (same on every rank); off-policy keeps the dataset pairs."""
        off_policy = self.model.training and self.args.lmbda < 1.0 and self._policy_rng.random() >= self.args.lmbda
        if off_policy:
            self._dataset_examples = [(example["prompt"], example["completion"]) for example in inputs]
        return off_policy

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if self._dataset_examples is None:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        return [self._tokenize_completion(prompt, completion) for prompt, completion in self._dataset_examples]

    def _tokenize_completion(self, prompt, completion) -> list[int]:
        """Token ids of a dataset completion as the chat template renders it after `prompt`, truncated like a
        rollout."""
        if is_conversational({"prompt": prompt}):
            rendered = apply_chat_template(
                {"prompt": prompt, "completion": completion}, self.processing_class, **self.chat_template_kwargs
            )
            ids = self._tokenizer(rendered["completion"], add_special_tokens=False)["input_ids"]
        else:
            ids = self._tokenizer(completion, add_special_tokens=False)["input_ids"]
            if not ids or ids[-1] not in self.eos_token_ids:
                ids = [*ids, self._tokenizer.eos_token_id]
        if self.max_completion_length is not None:
            ids = ids[: self.max_completion_length]
        return ids
