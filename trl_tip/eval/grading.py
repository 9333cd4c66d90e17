"""Answer extraction and checking for math benchmarks, and the mean@k / pass@k metrics the TIP paper reports.

Checking is `math-verify`'s (symbolic equivalence of LaTeX and plain expressions: fractions, `\\pi`, intervals,
tuples, matrices); this module only decides *which* text is the answer: the `\\boxed{}` content for MATH/AIME-style
problems, the final number for GSM8K-style ones (a `\\boxed{}` number first, since instruct models box it).
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from typing import Literal


AnswerFormat = Literal["boxed", "number"]
ANSWER_FORMATS = ("boxed", "number")
# Last number in a text: optional sign, thousands separators, decimals; `$18.00` and `1,234` count.
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


def _math_verify():
    import math_verify  # imported on first use: it loads sympy and an ANTLR parser

    return math_verify


def gsm8k_reference(answer: str) -> str:
    """The final answer of a GSM8K reference solution (the text after `####`, thousands separators removed)."""
    match = _GSM8K_ANSWER.search(answer)
    return (match.group(1) if match else answer).replace(",", "").strip()


def last_number(text: str) -> str | None:
    """The last number written in `text`, without thousands separators, or None."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "").rstrip(".") or None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[brace + 1 : i]
    return None


def extract_answer(text: str, answer_format: AnswerFormat) -> str | None:
    """
    The answer a completion commits to, as text, or None when it commits to none.

    Args:
        text (`str`): the completion.
        answer_format (`str`): `"boxed"` (the last `\\boxed{}`; MATH-500, AIME, AMC) or `"number"` (the last
            `\\boxed{}` if any, else the last number; GSM8K).
    """
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"`answer_format` must be one of {ANSWER_FORMATS}; got {answer_format!r}.")
    boxed = last_boxed(text)
    if boxed is not None or answer_format == "boxed":
        return boxed
    return last_number(text)


def _timeout_seconds() -> int | None:
    # math-verify bounds sympy with SIGALRM, which only the main thread can use; elsewhere it runs unbounded.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(math_verify, latex: str):
    # Wrapping in \boxed{} makes math-verify read the whole string as one LaTeX answer ("1,-2" as a tuple, "3, 5, 7"
    # as a set of solutions) rather than hunting for the last expression inside it.
    return math_verify.parse(
        "\\boxed{" + latex + "}",
        extraction_config=[
            math_verify.LatexExtractionConfig(boxed_match_priority=0),
            math_verify.ExprExtractionConfig(),
        ],
        parsing_timeout=_timeout_seconds(),
    )


def answers_match(prediction: str | None, reference: str) -> bool:
    """Whether an extracted answer equals the reference answer, by `math-verify` (symbolic, LaTeX-aware)."""
    if prediction is None or not prediction.strip():
        return False
    math_verify = _math_verify()
    gold, predicted = _parse(math_verify, reference), _parse(math_verify, prediction)
    if not gold or not predicted:
        # math-verify could not read one side as math (e.g. `\text{Evelyn}`): compare the normalized text.
        return _plain(prediction) == _plain(reference)
    return bool(math_verify.verify(gold, predicted, timeout_seconds=_timeout_seconds()))


def _plain(text: str) -> str:
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    return re.sub(r"[\s$\\{}]", "", text).lower()


@dataclass(frozen=True)
class Grade:
    """One completion's extracted answer and whether it is right."""

    extracted: str | None
    correct: bool


def grade(text: str, reference: str, answer_format: AnswerFormat) -> Grade:
    """Extracts the answer of `text` and checks it against `reference` (already the bare final answer)."""
    extracted = extract_answer(text, answer_format)
    return Grade(extracted, answers_match(extracted, reference))


@dataclass(frozen=True)
class SampleScores:
    """mean@k with its standard error, pass@k, and mean response length, over problems with k samples each."""

    num_problems: int
    k: int
    mean_at_k: float
    mean_at_k_stderr: float
    pass_at_k: float
    mean_response_tokens: float

    def as_dict(self) -> dict:
        return {
            "num_problems": self.num_problems,
            "k": self.k,
            f"mean@{self.k}": self.mean_at_k,
            f"mean@{self.k}_stderr": self.mean_at_k_stderr,
            f"pass@{self.k}": self.pass_at_k,
            "mean_response_tokens": self.mean_response_tokens,
        }


def score_samples(correct: list[list[bool]], lengths: list[list[int]]) -> SampleScores:
    """
    mean@k, its standard error, pass@k and mean response length.

    mean@k is the mean over problems of the share of a problem's k samples that are correct (the paper's metric);
    its standard error is the sample standard deviation of those per-problem shares over sqrt(number of problems),
    the uncertainty from the finite problem set and finite k together. pass@k is the share of problems with at
    least one correct sample (the unbiased estimator with n = k samples).

    Args:
        correct (`list[list[bool]]`): per problem, whether each of its k samples is correct.
        lengths (`list[list[int]]`): per problem, each sample's response length in tokens.
    """
    if not correct:
        raise ValueError("No problems were scored: `correct` is empty.")
    k = len(correct[0])
    if k == 0 or any(len(row) != k for row in correct) or [len(r) for r in lengths] != [len(r) for r in correct]:
        raise ValueError("Every problem needs the same number k >= 1 of samples, with one length per sample.")
    shares = [sum(row) / k for row in correct]
    n = len(shares)
    mean = sum(shares) / n
    stderr = math.sqrt(sum((s - mean) ** 2 for s in shares) / (n - 1) / n) if n > 1 else float("nan")
    return SampleScores(
        num_problems=n,
        k=k,
        mean_at_k=mean,
        mean_at_k_stderr=stderr,
        pass_at_k=sum(any(row) for row in correct) / n,
        mean_response_tokens=sum(map(sum, lengths)) / (n * k),
    )
