"""TIPGKDTrainer.train() through paths the other trainer tests do not take: tool-calling rollouts, a generalized JSD
strictly between its KL endpoints, and batch-scope selection. Tiny local models, one or two steps each."""

import re

import pytest
import torch
from reference import reference_gjsd, reference_logits
from tiny_runs import TINY_CPU_RUN
from trl.chat_template_utils import qwen2_5_chat_template

from trl_tip import EntropyTopK, TIPConfig, TIPGKDTrainer
from trl_tip.testing import tiny_causal_lm, tiny_math_dataset, tiny_tokenizer


SETTINGS = TINY_CPU_RUN


def kept_per_rollout(valid_tokens: int, ratio_tenths: int) -> int:
    """The ratio selectors' count, in exact integers: floor(ratio * m) of a rollout's m valid tokens, at least one."""
    return max(1, valid_tokens * ratio_tenths // 10) if valid_tokens else 0


# ---------------------------------------------------------------------------------------------------------------------
# Tool masks


def add(a: int, b: int) -> int:
    """
    Adds two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


class RecordingEntropyTopK(EntropyTopK):
    """`entropy_topk` that keeps a copy of the valid mask it was given."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.masks = []

    def select(self, stats, generator=None):
        self.masks.append(stats.mask.clone())
        return super().select(stats, generator)


def calculator_student(trainer):
    """
    The student's first turn, scripted: rollouts 0, 2, ... call `add` on the prompt's two numbers in the Qwen2.5
    format (`<tool_call>{json}</tool_call>`), the others answer directly.

    A random tiny model cannot emit a well-formed tool call, and TRL decides whether a rollout called a tool by parsing
    its tokens, so only those first-turn tokens are scripted. Everything after is TRL's own tool loop: it parses the
    call, runs `add`, appends the result with the chat template, builds `tool_mask`, and lets the real student generate
    the turn after the tool's answer.
    """
    generate = trainer._generate_single_turn
    tokenizer = trainer.processing_class

    def first_turn_scripted(prompt_ids, images, multimodal_fields, has_tool_images=False):
        prompts = tokenizer.batch_decode(prompt_ids)
        if any("<tool_response>" in prompt for prompt in prompts):
            return generate(prompt_ids, images, multimodal_fields, has_tool_images)
        completions = []
        for index, prompt in enumerate(prompts):
            a, b = (int(n) for n in re.findall(r"What is (\d+) plus (\d+)\?", prompt)[-1])
            if index % 2 == 0:
                text = f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call><|im_end|>'
            else:
                text = f"The answer is {a + b}.<|im_end|>"
            completions.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        return completions

    return first_turn_scripted


def test_tool_output_tokens_are_never_selected_nor_counted(loss_calls, monkeypatch, tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template  # TRL knows how to parse its tool calls
    student, teacher = tiny_causal_lm(tokenizer, seed=0), tiny_causal_lm(tokenizer, hidden_size=128, seed=1)
    for model in (student, teacher):
        model.config.max_position_embeddings = 2048  # the tool schema makes ~700-token prompts
    selector = RecordingEntropyTopK(ratio=0.5)
    args = TIPConfig(output_dir=str(tmp_path), **{**SETTINGS, "max_completion_length": 128, "max_steps": 1})
    trainer = TIPGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=tiny_math_dataset(4),
        processing_class=tokenizer,
        tools=[add],
        token_selector=selector,
    )
    monkeypatch.setattr(trainer, "_generate_single_turn", calculator_student(trainer))
    trainer.train()

    batch = trainer._buffered_inputs[0]  # the one micro-batch of the one step
    completion, tool = batch["completion_mask"].bool(), batch["tool_mask"].bool()
    tool_output = completion & ~tool
    assert trainer.state.log_history[0]["tools/call_frequency"] == 0.5
    assert tool_output.any(dim=1).tolist().count(True) == 1, "one rollout of two called the tool"
    for row in range(2):
        if tool_output[row].any():  # the masked tokens are the tool's answer, as the chat template renders it
            prompt = tokenizer.decode(batch["prompt_ids"][row])
            a, b = (int(n) for n in re.findall(r"What is (\d+) plus (\d+)\?", prompt)[-1])
            text = tokenizer.decode(batch["completion_ids"][row][tool_output[row]])
            assert f"<tool_response>\n{a + b}\n</tool_response>" in text
    model_tokens = completion & tool

    # The selector sees the student's own tokens as valid, not the tool's output...
    (valid,) = selector.masks
    assert torch.equal(valid, model_tokens)
    # ...so the loss never contains a tool-output token.
    (call,) = loss_calls
    assert call["selected"].any() and not (call["selected"].bool() & tool_output).any()
    assert torch.equal(call["valid_mask"], model_tokens)

    # The global normalizer counts floor(ratio * m) of the m model tokens of each rollout, not of its tool output.
    lengths = model_tokens.sum(dim=1).tolist()
    expected = sum(kept_per_rollout(m, 5) for m in lengths)
    with_tool_output = sum(kept_per_rollout(m, 5) for m in completion.sum(dim=1).tolist())
    assert expected != with_tool_output
    assert int(batch["num_selected_in_batch"]) == expected == int(call["num_items_in_batch"])
    assert int(call["selected"].sum()) == expected

    # The quadrant statistics count the model's tokens only, all of them and the selected ones.
    (row,) = trainer.quadrant_tracker.step_rows()
    assert row["num_tokens"] == sum(lengths) < int(completion.sum())
    assert row["num_selected"] == expected


# ---------------------------------------------------------------------------------------------------------------------
# Generalized JSD strictly between the KL endpoints


def make_trainer(tmp_path, **overrides):
    tokenizer = tiny_tokenizer()
    student, teacher = tiny_causal_lm(tokenizer, seed=0), tiny_causal_lm(tokenizer, hidden_size=128, seed=1)
    args = TIPConfig(output_dir=str(tmp_path), **{**SETTINGS, **overrides})
    return TIPGKDTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=tiny_math_dataset(8), processing_class=tokenizer
    )


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_generalized_jsd_loss_of_a_step_matches_a_float64_reference(beta, loss_calls, tmp_path):
    trainer = make_trainer(
        tmp_path, beta=beta, token_selector="soft_or", selection_ratio=0.5, gradient_accumulation_steps=2, max_steps=1
    )
    with torch.no_grad():  # a sharper teacher than a random one, so the divergences are far from zero
        trainer.teacher_model.lm_head.weight.mul_(20.0)
    trainer.train()

    # One step, two micro-batches; soft_or keeps floor(m / 2) tokens of each rollout (checked here, from the masks),
    # and each micro-batch's summed divergence is divided by the count kept over the whole step.
    assert len(loss_calls) == 2
    kept = [call["selected"].bool() for call in loss_calls]
    lengths = [m for call in loss_calls for m in call["valid_mask"].sum(dim=1).tolist()]
    step_count = sum(kept_per_rollout(m, 5) for m in lengths)
    assert sum(int(mask.sum()) for mask in kept) == step_count
    references = {b: [] for b in (beta, 0.0, 1.0, 1 - beta)}  # per micro-batch, at beta and at the other values
    for call, mask in zip(loss_calls, kept):
        assert int(call["num_items_in_batch"]) == step_count
        student = reference_logits(call["student_hidden"], call["student_head"])
        teacher = reference_logits(call["teacher_hidden"], call["teacher_head"])
        for b, losses in references.items():
            losses.append(reference_gjsd(student, teacher, b)[mask].sum() / step_count)
        torch.testing.assert_close(call["loss"].double(), references[beta][-1], rtol=1e-5, atol=1e-8)
    logged = trainer.state.log_history[0]["loss"]  # the step's loss: the sum over its micro-batches
    assert logged == pytest.approx(float(sum(references[beta])), rel=1e-5)
    # The comparison tells beta apart from the KL endpoints and from the mirrored mixture 1 - beta.
    for b, losses in references.items():
        if b != beta:
            assert abs(float(sum(losses)) - logged) > 1e-3 * logged, b


# ---------------------------------------------------------------------------------------------------------------------
# Batch-scope selection


def test_batch_scope_keeps_the_per_rollout_total_from_the_pooled_micro_batch(loss_calls, tmp_path):
    trainer = make_trainer(
        tmp_path,
        token_selector="entropy_topk",
        selection_ratio=0.3,
        selection_scope="batch",
        gradient_accumulation_steps=2,
        max_steps=2,
        max_completion_length=16,
    )
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()

    assert len(loss_calls) == 4  # 2 steps x 2 micro-batches
    pooled_differs = False
    for step in range(2):
        calls = loss_calls[2 * step : 2 * step + 2]
        per_rollout = [[kept_per_rollout(m, 3) for m in call["valid_mask"].sum(dim=1).tolist()] for call in calls]
        for call, counts in zip(calls, per_rollout):
            valid, kept, entropy = call["valid_mask"], call["selected"].bool(), call["stats"].entropy
            # The count: sum over the rollouts of floor(0.3 * m), at least 1 each (selectors.kept_per_sequence)...
            assert int(kept.sum()) == sum(counts)
            # ...taken as the top entropies of the pooled micro-batch, wherever they fall.
            assert entropy[kept].min() >= entropy[valid & ~kept].max()
            pooled_differs |= kept.sum(dim=1).tolist() != counts
            # The normalizer is the step's count, known from the masks alone.
            assert int(call["num_items_in_batch"]) == sum(map(sum, per_rollout))
    assert pooled_differs, "some rollout keeps more or fewer than its own floor(0.3 * m): the micro-batch is pooled"

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    assert all(log["tip/selected_fraction"] < 0.5 for log in logs)
    assert any(not torch.equal(p, before[name]) for name, p in trainer.model.named_parameters())
