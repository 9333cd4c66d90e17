"""Answer extraction and checking on real benchmark items, and mean@k / pass@k against a hand computation."""

import math

import paths
import pytest

from trl_tip.eval.grading import answers_match, extract_answer, grade, gsm8k_reference, last_boxed, score_samples
from trl_tip.eval.harness import score_results_file
from trl_tip.utils.files import read_jsonl


def test_every_math500_reference_answer_checks_as_correct_when_boxed_in_a_solution(shared_data):
    rows = read_jsonl(shared_data / "math500.jsonl")
    wrong = [
        r["answer"]
        for r in rows
        if not grade(f"Working... so the answer is $\\boxed{{{r['answer']}}}$.", r["answer"], "boxed").correct
    ]
    assert wrong == []


@pytest.mark.parametrize("name", ["aime24", "aime25", "amc2023"])
def test_competition_answers_check_and_off_by_one_fails(shared_data, name):
    for row in read_jsonl(shared_data / f"{name}.jsonl"):
        answer = row["answer"]
        assert grade(f"Thus the result is \\boxed{{{answer}}}.", answer, "boxed").correct, answer
        perturbed = str(int(float(answer)) + 1)
        assert not grade(f"Thus the result is \\boxed{{{perturbed}}}.", answer, "boxed").correct, answer


def test_gsm8k_reference_solutions_score_as_correct_and_a_changed_final_number_does_not(shared_data):
    rows = read_jsonl(shared_data / "gsm8k_test.jsonl")[:200]
    for row in rows:
        reference = gsm8k_reference(row["answer"])
        solution = row["answer"].replace("####", "The answer is")
        assert grade(solution, reference, "number").correct, row["answer"]
        perturbed = solution[: solution.rindex(reference)] + str(int(float(reference)) + 1)
        assert not grade(perturbed, reference, "number").correct, perturbed


# (reference from MATH-500, an equivalent form that string matching misses, a wrong answer that looks alike)
LATEX_FORMS = [
    ("\\frac{14}{3}", "\\dfrac{14}{3}", "\\frac{3}{14}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", "(3, \\pi/3)"),
    ("-\\frac{\\pi}{6}", "-\\pi/6", "\\frac{\\pi}{6}"),
    ("(-\\infty, 0]", "\\left(-\\infty, 0\\right]", "(-\\infty, 0)"),
    ("(0,9) \\cup (9,36)", "(9,36) \\cup (0,9)", "(0,36)"),
    ("1,-2", "-2, 1", "1, 2"),
    ("3\\sqrt{13}", "\\sqrt{117}", "13\\sqrt{3}"),
    ("\\frac{243}{625}", "0.3888", "0.3889"),
    (
        "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}",
        "\\begin{bmatrix} -2 \\\\ -14 \\\\ -7 \\end{bmatrix}",
        "\\begin{pmatrix} -2 \\\\ 14 \\\\ -7 \\end{pmatrix}",
    ),
    ("90^\\circ", "90", "45"),
    ("\\text{Evelyn}", "Evelyn", "Beth"),
]


@pytest.mark.parametrize("reference,equivalent,wrong", LATEX_FORMS)
def test_latex_forms_are_compared_as_math(shared_data, reference, equivalent, wrong):
    assert reference in {r["answer"] for r in read_jsonl(shared_data / "math500.jsonl")}
    assert equivalent.replace(" ", "") != reference.replace(" ", "")  # naive matching would call it wrong
    assert answers_match(equivalent, reference)
    assert not answers_match(wrong, reference)


def test_extraction_takes_the_last_boxed_answer_with_nested_braces():
    text = "First \\boxed{1}, then correcting: \\boxed{\\frac{1}{\\sqrt{2}}} done"
    assert last_boxed(text) == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer(text, "boxed") == "\\frac{1}{\\sqrt{2}}"
    assert extract_answer("no box, 42", "boxed") is None
    assert extract_answer("unclosed \\boxed{12", "boxed") is None


def test_number_format_prefers_a_boxed_answer_then_the_last_number():
    assert extract_answer("Total 1,234 apples, so $\\boxed{1,234}$ and 7 later", "number") == "1,234"
    assert extract_answer("She pays $18.00. Then 5 + 3 = 8 dollars.", "number") == "8"
    assert grade("so she has 1,200 left.", "1200", "number").correct
    assert extract_answer("no digits here", "number") is None
    with pytest.raises(ValueError, match="answer_format.*boxed.*number"):
        extract_answer("1", "latex")


def test_no_answer_is_wrong_not_an_error():
    assert grade("I am not sure.", "5", "boxed") == grade("I am not sure.", "5", "boxed")
    assert not grade("I am not sure.", "5", "boxed").correct
    assert not answers_match("", "5")


def test_mean_at_k_matches_a_hand_computation_on_a_fixed_results_file():
    # Per-problem shares of correct samples: 2/4, 4/4, 0/4, 1/4, 1/4 -> mean 2.0 / 5 = 0.4.
    # Squared deviations 0.01 + 0.36 + 0.16 + 0.0225 + 0.0225 = 0.575; sample variance 0.575 / 4 = 0.14375;
    # standard error sqrt(0.14375 / 5) = sqrt(0.02875). pass@4: 4 of 5 problems have a correct sample.
    # Tokens: (100 + 20 + 400 + 32 + 10) / 20 = 28.1. Truncated: 4 of 20 samples.
    summary = score_results_file(paths.DATA / "eval_results_k4.jsonl")
    assert summary["k"] == 4 and summary["num_problems"] == 5
    assert summary["mean@4"] == pytest.approx(0.4)
    assert summary["mean@4_stderr"] == pytest.approx(math.sqrt(0.02875))
    assert summary["pass@4"] == pytest.approx(0.8)
    assert summary["mean_response_tokens"] == pytest.approx(28.1)
    assert summary["truncated_share"] == pytest.approx(0.2)


def test_score_samples_rejects_ragged_or_empty_input():
    with pytest.raises(ValueError, match="empty"):
        score_samples([], [])
    with pytest.raises(ValueError, match="same number k"):
        score_samples([[True, False], [True]], [[1, 1], [1]])
    single = score_samples([[True, False]], [[3, 5]])
    assert single.mean_at_k == 0.5 and math.isnan(single.mean_at_k_stderr)
