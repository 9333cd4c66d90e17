"""TIP's loss reaches TRL's `DistillationTrainer` through its module-level `_chunked_divergence_loss`; these tests
pin what happens around that one call: a TRL that stops making it fails loudly, and trainers sharing a process (in two
threads, or one stepped inside another's step) each get their own loss, and a plain `DistillationTrainer` TRL's."""

import inspect
import re
import threading
import types

import pytest
import trl
from tiny_runs import TINY_CPU_RUN
from trl import DistillationConfig, DistillationTrainer
from trl.trainer import distillation_trainer as trl_distillation

from trl_tip import TIPConfig, TIPGKDTrainer
from trl_tip.testing import tiny_causal_lm, tiny_math_dataset


COMMON = {
    **TINY_CPU_RUN,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "max_steps": 1,
}


def build(tokenizer, output_dir, seed, trainer_cls=TIPGKDTrainer, config_cls=TIPConfig, **overrides):
    """A trainer on a tiny student (`seed`) and a wider teacher (`seed + 1`)."""
    return trainer_cls(
        model=tiny_causal_lm(tokenizer, seed=seed),
        teacher_model=tiny_causal_lm(tokenizer, hidden_size=128, seed=seed + 1),
        args=config_cls(output_dir=str(output_dir), **{**COMMON, **overrides}),
        train_dataset=tiny_math_dataset(8),
        eval_dataset=tiny_math_dataset(4, seed=1),
        processing_class=tokenizer,
    )


def rollouts(trainer):
    """One generation batch of the trainer's student, in training mode: the inputs of `compute_loss`."""
    trainer.model.train()
    return trainer._generate_and_score_completions(list(tiny_math_dataset(4)))


def training_loss(trainer, inputs) -> float:
    trainer.model.train()
    return trainer.compute_loss(trainer.model, inputs).item()


def test_a_trl_that_bypasses_the_module_level_loss_fails_the_step_naming_the_version(tokenizer, tmp_path, monkeypatch):
    """A TRL release whose `_compute_loss` calls the divergence directly (not through its module) would train on every
    token, divided by the selected count; the training and the evaluation step raise instead."""
    direct = DistillationTrainer._compute_loss
    original = inspect.unwrap(trl_distillation._chunked_divergence_loss)
    # The same method, with `_chunked_divergence_loss` bound to TRL's function instead of looked up in the module.
    globals_with_direct_reference = {**direct.__globals__, "_chunked_divergence_loss": original}
    bypassing = types.FunctionType(
        direct.__code__, globals_with_direct_reference, direct.__name__, direct.__defaults__, direct.__closure__
    )
    monkeypatch.setattr(DistillationTrainer, "_compute_loss", bypassing)
    trainer = build(tokenizer, tmp_path, seed=0)
    version = re.escape(f"trl {trl.__version__}; trl-tip supports trl>=1.16,<1.17")
    with pytest.raises(RuntimeError, match=rf"This training step's loss did not go through TIP's .*{version}"):
        trainer.train()
    with pytest.raises(RuntimeError, match=rf"This evaluation step's loss did not go through TIP's .*{version}"):
        trainer.evaluate()


def test_two_trainers_stepping_in_two_threads_each_get_their_own_loss(tokenizer, tmp_path):
    soft_or = build(tokenizer, tmp_path / "soft_or", seed=0, token_selector="soft_or", selection_ratio=0.5)
    q3 = build(tokenizer, tmp_path / "q3", seed=10, token_selector="q3", selection_ratio=0.2)
    inputs = rollouts(soft_or)  # one tokenizer, so both trainers can score the same rollouts
    alone = {"soft_or": training_loss(soft_or, inputs), "q3": training_loss(q3, inputs)}
    assert alone["soft_or"] != pytest.approx(alone["q3"], rel=1e-3), "the two trainers must compute different losses"

    # Both students wait for each other in their forward, so both steps are inside TRL's `_compute_loss` at once.
    both_inside = threading.Barrier(2, timeout=60)

    def wait_for_the_other(module, args):
        both_inside.wait()  # returns None: the forward's inputs stay as they are

    hooks = [t.model.base_model.register_forward_pre_hook(wait_for_the_other) for t in (soft_or, q3)]
    concurrent, errors = {}, []

    def step(name, trainer):
        try:
            concurrent[name] = training_loss(trainer, inputs)
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            both_inside.abort()

    threads = [threading.Thread(target=step, args=item) for item in (("soft_or", soft_or), ("q3", q3))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        for hook in hooks:
            hook.remove()
    assert not errors, errors
    assert concurrent == pytest.approx(alone, rel=1e-6)


class SteppingOthers:
    """A selector that runs `step_others` the first time it selects, then selects as `selector` does."""

    fixed_count = True

    def __init__(self, selector, step_others):
        self.selector, self.step_others, self.stepped = selector, step_others, False

    def count(self, valid_mask):
        return self.selector.count(valid_mask)

    def select(self, stats, generator=None):
        if not self.stepped:
            self.stepped = True
            self.step_others()
        return self.selector.select(stats, generator)


def test_trainers_built_and_stepped_inside_another_trainers_step_get_their_own_loss(tokenizer, tmp_path):
    outer = build(tokenizer, tmp_path / "outer", seed=0, token_selector="soft_or", selection_ratio=0.5)
    inputs = rollouts(outer)
    inner_settings = {"seed": 10, "token_selector": "q3", "selection_ratio": 0.2}
    plain_settings = {"seed": 20, "trainer_cls": DistillationTrainer, "config_cls": DistillationConfig}
    alone = {
        "outer": training_loss(outer, inputs),
        "inner": training_loss(build(tokenizer, tmp_path / "inner-alone", **inner_settings), inputs),
        "plain": training_loss(build(tokenizer, tmp_path / "plain-alone", **plain_settings), inputs),
    }
    nested = {}

    def step_others():
        # Inside the outer trainer's loss: a TIP trainer and a plain DistillationTrainer, built and stepped here.
        nested["inner"] = training_loss(build(tokenizer, tmp_path / "inner", **inner_settings), inputs)
        nested["plain"] = training_loss(build(tokenizer, tmp_path / "plain", **plain_settings), inputs)

    outer.token_selector = SteppingOthers(outer.token_selector, step_others)
    nested["outer"] = training_loss(outer, inputs)
    assert outer.token_selector.stepped
    assert nested == pytest.approx(alone, rel=1e-6)
    assert len({round(v, 6) for v in alone.values()}) == 3, "the three trainers must compute different losses"
