"""Self-distillation: the student, given privileged context, is its own teacher (`teacher_model_kind`), on the same
selected-token loss as a separate teacher."""

import copy

import pytest
import torch
from peft import LoraConfig
from tiny_runs import TINY_CPU_RUN

from trl_tip import TIPConfig, TIPGKDTrainer
from trl_tip.testing import tiny_causal_lm, tiny_math_dataset
from trl_tip.trainer.privileged_context import teacher_prompt
from trl_tip.trainer.self_teacher import SelfTeacher


def with_context(dataset, context=lambda row: f"The answer is {row['answer']}."):
    return dataset.map(lambda row: {"privileged_context": context(row)})


def make_trainer(tokenizer, output_dir, kind="live", student=None, dataset=None, peft_config=None, **overrides):
    student = student if student is not None else tiny_causal_lm(tokenizer, seed=0)
    dataset = dataset if dataset is not None else with_context(tiny_math_dataset(16, with_answers=True))
    args = TIPConfig(output_dir=str(output_dir), teacher_model_kind=kind, **{**TINY_CPU_RUN, **overrides})
    return TIPGKDTrainer(
        model=student, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )


def loss_logs(trainer):
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------------------------------
# The teacher's prompt.


def test_teacher_prompt_replaces_the_last_user_message_and_keeps_the_system_message():
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}]
    row = {"prompt": prompt, "privileged_context": "The answer is 5."}
    assert teacher_prompt(row, "{prompt}\n\n{privileged_context}") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?\n\nThe answer is 5."},
    ]
    assert teacher_prompt({"prompt": "2+3=", "answer": 5}, "{prompt} (answer: {answer})") == "2+3= (answer: 5)"
    messages = [{"role": "assistant", "content": "Step 1."}, {"role": "assistant", "content": "So 5."}]
    assert teacher_prompt({"prompt": "Q", "privileged_context": messages}, "{prompt}|{privileged_context}") == (
        "Q|Step 1.\nSo 5."
    )
    # Braces in the data are text, not fields.
    assert teacher_prompt({"prompt": "{x}", "privileged_context": "{y}"}, "{prompt}{privileged_context}") == "{x}{y}"


def test_a_row_without_a_context_value_fails_naming_the_column():
    with pytest.raises(ValueError, match="`privileged_context` is None"):
        teacher_prompt({"prompt": "Q", "privileged_context": None}, "{prompt}{privileged_context}")


# ---------------------------------------------------------------------------------------------------------------------
# The teacher's distribution.


@pytest.mark.parametrize("kind, peft", [("base", False), ("base", True), ("live", False), ("ema", False)])
def test_with_an_empty_context_the_teacher_is_the_student_so_every_divergence_and_the_loss_are_zero(
    kind, peft, tokenizer, tmp_path
):
    dataset = with_context(tiny_math_dataset(8, with_answers=True), context=lambda row: "")
    trainer = make_trainer(
        tokenizer,
        tmp_path,
        kind=kind,
        dataset=dataset,
        peft_config=LORA if peft else None,
        teacher_prompt_template="{prompt}{privileged_context}",
        max_steps=1,
        token_selector="all",
    )
    (log,) = loss_logs(trainer)
    assert log["loss"] == pytest.approx(0.0, abs=1e-6)
    assert log["tip/reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert log["tip/forward_kl"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind, peft", [("live", False), ("base", True)])
def test_teacher_hidden_states_at_the_completion_positions_equal_a_separate_copy_fed_teacher_prompt_and_completion(
    kind, peft, tokenizer, tmp_path
):
    student = tiny_causal_lm(tokenizer, seed=0)
    student.save_pretrained(tmp_path / "initial")
    # Contexts of different lengths: the teacher prompts are padded differently from the student's.
    contexts = ["", "The answer is 42.", "Check the units digit first, then the tens.", "9"]
    dataset = with_context(tiny_math_dataset(4, with_answers=True), context=lambda row: contexts[row["answer"] % 4])
    trainer = make_trainer(
        tokenizer,
        tmp_path / "run",
        kind=kind,
        student=student,
        dataset=dataset,
        peft_config=LORA if peft else None,
        max_steps=1,
        per_device_train_batch_size=4,
        token_selector="all",
    )
    seen = {}
    compute_loss, hidden_state = trainer.compute_loss, trainer._get_last_hidden_state

    def record_inputs(model, inputs, *args, **kwargs):
        seen["inputs"] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        return compute_loss(model, inputs, *args, **kwargs)

    def record_hidden_states(model, *args, **kwargs):
        out = hidden_state(model, *args, **kwargs)
        seen.setdefault("hidden", []).append(out.detach().clone())
        return out

    trainer.compute_loss, trainer._get_last_hidden_state = record_inputs, record_hidden_states
    trainer.train()
    student_hidden, teacher_hidden = seen["hidden"]
    inputs = seen["inputs"]

    # The reference: the initial weights loaded anew, fed each row's teacher prompt (composed and tokenized here, from
    # the dataset, not through the trainer) followed by the row's completion, without padding.
    reference = type(student).from_pretrained(tmp_path / "initial").eval()
    rows = inputs["prompt_ids"].shape[0]
    student_prompts = [tokenizer.decode(inputs["prompt_ids"][b][inputs["prompt_mask"][b].bool()]) for b in range(rows)]
    for example in dataset:
        b = student_prompts.index(
            tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=False)
        )
        user = example["prompt"][0]["content"] + "\n\n" + example["privileged_context"]
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
        prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
        completion = inputs["completion_ids"][b][inputs["completion_mask"][b].bool()].tolist()
        with torch.no_grad():
            hidden = reference.model(torch.tensor([prompt_ids + completion])).last_hidden_state[0]
        # Position i predicts completion token i: the states from the last prompt token on.
        expected = hidden[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(completion)]
        torch.testing.assert_close(teacher_hidden[b, : len(completion)], expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(teacher_hidden, student_hidden), "the context changes the teacher's states"


# ---------------------------------------------------------------------------------------------------------------------
# The teacher's weights, and how many there are.


@pytest.mark.slow
def test_after_one_step_live_is_the_student_base_the_initial_weights_and_ema_the_average(tokenizer, tmp_path):
    initial = tiny_causal_lm(tokenizer, seed=0)
    weights = {name: p.detach().clone() for name, p in initial.named_parameters()}
    runs = {}
    for kind in ("live", "base", "ema"):
        extra = {"teacher_update_rate": 0.25} if kind == "ema" else {}
        trainer = make_trainer(
            tokenizer, tmp_path / kind, kind=kind, student=copy.deepcopy(initial), max_steps=1, **extra
        )
        trainer.train()
        runs[kind] = trainer
    for kind, trainer in runs.items():
        student = dict(trainer.model.named_parameters())
        assert any(not torch.equal(student[n], weights[n]) for n in weights), "the step moved the student"
        if kind == "live":
            assert isinstance(trainer.teacher_model, SelfTeacher) and trainer.teacher_model.student is trainer.model
            head = trainer.teacher_model.get_output_embeddings().weight
            assert head.data_ptr() == trainer.model.lm_head.weight.data_ptr() and not head.requires_grad
            continue
        teacher = dict(trainer.accelerator.unwrap_model(trainer.teacher_model).named_parameters())
        for name, start in weights.items():
            expected = start if kind == "base" else 0.75 * start + 0.25 * student[name].detach()
            torch.testing.assert_close(teacher[name], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "kind, peft, copies", [("live", False, 0), ("base", True, 0), ("base", False, 1), ("ema", False, 1)]
)
def test_a_self_teacher_keeps_one_set_of_base_weights_and_at_most_one_copy(kind, peft, copies, tokenizer, tmp_path):
    trainer = make_trainer(tokenizer, tmp_path, kind=kind, peft_config=LORA if peft else None, max_steps=1)
    student = trainer.model
    student_storages = {p.data_ptr() for p in student.parameters()}
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    teacher_params = list(teacher.parameters())
    if copies == 0:
        assert isinstance(teacher, SelfTeacher) and teacher_params == []
        assert teacher.get_output_embeddings().weight.data_ptr() in student_storages
    else:
        base = [p for n, p in student.named_parameters() if "lora_" not in n]
        assert sum(p.numel() for p in teacher_params) == sum(p.numel() for p in base)
        assert not {p.data_ptr() for p in teacher_params} & student_storages, "a copy, not a view of the student"
        assert not any(p.requires_grad for p in teacher_params)
    if peft:
        base_weights = [p for n, p in student.named_parameters() if "lora_" not in n]
        assert not any(p.requires_grad for p in base_weights), "the base is frozen: the teacher it defines stays put"


# ---------------------------------------------------------------------------------------------------------------------
# End to end: accumulation, several rollouts, the off-policy mix, statistics and resume.


@pytest.mark.slow
def test_ema_self_distillation_trains_writes_stats_and_resumes_to_the_same_losses(tokenizer, tmp_path):
    settings = {
        "kind": "ema",
        "max_steps": 4,
        "token_selector": "soft_or",
        "gradient_accumulation_steps": 2,
        "num_rollouts_per_prompt": 2,
        "lmbda": 0.5,
        "teacher_update_rate": 0.5,
        "save_strategy": "steps",
        "save_steps": 2,
    }
    dataset = with_context(tiny_math_dataset(16, with_completions=True, with_answers=True))
    full = make_trainer(tokenizer, tmp_path / "full", dataset=dataset, **settings)
    full_logs = loss_logs(full)
    assert len(full_logs) == 4 and all(torch.isfinite(torch.tensor(log["loss"])) for log in full_logs)
    assert (tmp_path / "full" / "tip_stats" / "steps.jsonl").is_file()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "self_teacher_all.pt").is_file()

    resumed = make_trainer(tokenizer, tmp_path / "resumed", dataset=dataset, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    resumed_logs = [h for h in resumed.state.log_history if "loss" in h][-2:]
    assert [h["step"] for h in resumed_logs] == [3, 4]
    for a, b in zip(full_logs[2:], resumed_logs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["tip/reverse_kl"] == pytest.approx(b["tip/reverse_kl"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"teacher_model_kind": "copy"}, "`teacher_model_kind` must be one of 'base', 'live', 'ema'"),
        ({"teacher_model_kind": "base", "teacher_model_name_or_path": "t"}, "`teacher_model_name_or_path`='t'"),
        ({"teacher_model_kind": "base", "teacher_prompt_template": "{privileged_context}"}, "never uses `{prompt}`"),
        ({"teacher_model_kind": "base", "teacher_prompt_template": "{prompt}{0}"}, "the field {0}"),
        ({"teacher_model_kind": "base", "teacher_prompt_template": "{prompt"}, "not a valid format string"),
        ({"teacher_model_kind": "ema", "teacher_update_rate": 0.0}, "`teacher_update_rate` must be a number in"),
        ({"teacher_model_kind": "ema", "teacher_sync_steps": 0}, "`teacher_sync_steps` must be a positive"),
        ({"teacher_model_kind": "base", "teacher_update_rate": 0.1}, 'only with `teacher_model_kind="ema"`'),
        ({"teacher_prompt_template": "{prompt}"}, "read only with `teacher_model_kind` set"),
        ({"teacher_model_kind": "live", "remove_unused_columns": True}, "`remove_unused_columns=True` drops"),
    ],
)
def test_bad_self_distillation_settings_fail_naming_the_field(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        TIPConfig(output_dir=str(tmp_path), **{**TINY_CPU_RUN, **overrides})


def test_a_dataset_without_the_context_column_fails_naming_it(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="reads the column `privileged_context`, which the train dataset lacks"):
        make_trainer(tokenizer, tmp_path, dataset=tiny_math_dataset(4))
    with pytest.raises(ValueError, match="reads the column `hint`, which the train dataset lacks"):
        make_trainer(tokenizer, tmp_path, teacher_prompt_template="{prompt} {hint}")


def test_a_self_teacher_with_an_explicit_teacher_or_ema_on_peft_is_refused(tokenizer, tmp_path):
    args = TIPConfig(output_dir=str(tmp_path), teacher_model_kind="base", **TINY_CPU_RUN)
    dataset = with_context(tiny_math_dataset(4, with_answers=True))
    student = tiny_causal_lm(tokenizer, seed=0)
    with pytest.raises(ValueError, match="but `teacher_model` was passed too"):
        TIPGKDTrainer(model=student, teacher_model=tiny_causal_lm(tokenizer, seed=1), args=args, train_dataset=dataset)
    with pytest.raises(ValueError, match='`teacher_model_kind="ema"` needs a full-parameter student'):
        make_trainer(tokenizer, tmp_path, kind="ema", peft_config=LORA)
