"""The embedded pair's problems: grade-school arithmetic word problems with exact integer answers, generated
procedurally (no third-party text), or a dataset's rows with integer answers.

Each problem starts from a quantity and applies `steps` operations, each phrased as a sentence; the answer is the
final quantity. `digits` bounds the operands. The result is a `datasets.Dataset` in TRL's conversational prompt
format, with a reference `completion` and the integer `answer`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass


NAMES = [
    "Ava",
    "Ben",
    "Chloe",
    "Diego",
    "Emma",
    "Farah",
    "Gus",
    "Hana",
    "Ivan",
    "Jade",
    "Kofi",
    "Lena",
    "Milo",
    "Nora",
]
PRONOUNS = {
    "Ava": "She",
    "Ben": "He",
    "Chloe": "She",
    "Diego": "He",
    "Emma": "She",
    "Farah": "She",
    "Gus": "He",
    "Hana": "She",
    "Ivan": "He",
    "Jade": "She",
    "Kofi": "He",
    "Lena": "She",
    "Milo": "He",
    "Nora": "She",
}
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards"]
INSTRUCTION = "Answer with the final number only."
# Self-distillation's teacher prompt in the demo and the study: the problem, then its answer (the `answer` column).
ANSWER_TEACHER_PROMPT_TEMPLATE = "{prompt}\n\nThe correct final answer is {answer}."
_INTEGER = re.compile(r"-?\d[\d,]*")


@dataclass
class Problem:
    question: str
    answer: int


def _operand(rng: random.Random, digits: int, low: int = 1) -> int:
    return rng.randint(low, 10**digits - 1)


def make_problem(rng: random.Random, steps: int = 1, digits: int = 1) -> Problem:
    """One problem with `steps` operations on `digits`-digit operands; every intermediate value stays non-negative."""
    if steps < 1 or digits < 1:
        raise ValueError(f"`steps` and `digits` must be positive; got steps={steps}, digits={digits}.")
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    pronoun = PRONOUNS[name]
    total = _operand(rng, digits, low=2)
    sentences = [f"{name} has {total} {item}."]
    for step in range(steps):
        then = "Then " + pronoun.lower() if step else pronoun
        kind = rng.choice(["add", "sub", "mul", "div"] if digits == 1 or total < 100 else ["add", "sub", "div"])
        if kind == "add":
            b = _operand(rng, digits)
            sentences.append(f"{then} gets {b} more {item}.")
            total += b
        elif kind == "sub" and total > 1:
            b = rng.randint(1, min(total - 1, 10**digits - 1))
            sentences.append(f"{then} gives away {b} {item}.")
            total -= b
        elif kind == "mul" and total <= 50:
            b = rng.randint(2, 4)
            sentences.append(f"{then} ends up with {b} times as many {item}.")
            total *= b
        else:
            divisors = [d for d in range(2, 6) if total % d == 0]
            if divisors:
                b = rng.choice(divisors)
                sentences.append(f"{then} splits them into {b} equal piles and keeps one pile.")
                total //= b
            else:
                b = _operand(rng, digits)
                sentences.append(f"{then} finds {b} more {item}.")
                total += b
    sentences.append(f"How many {item} does {name} have now?")
    return Problem(question=" ".join(sentences), answer=total)


def make_problems(n: int, seed: int = 0, steps: int | tuple[int, int] = (1, 2), digits: int | tuple[int, int] = 1):
    """`n` problems; `steps` and `digits` are fixed numbers or inclusive (low, high) ranges drawn per problem."""
    if n < 1:
        raise ValueError(f"`n` must be positive; got {n}.")
    rng = random.Random(seed)

    def draw(value):
        return rng.randint(*value) if isinstance(value, tuple) else value

    return [make_problem(rng, draw(steps), draw(digits)) for _ in range(n)]


def to_dataset(problems: list[Problem]):
    """Conversational `prompt`, reference `completion` and integer `answer` columns."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": f"{p.question} {INSTRUCTION}"}],
                "completion": [{"role": "assistant", "content": str(p.answer)}],
                "answer": p.answer,
            }
            for p in problems
        ]
    )


def extract_integer(text: str) -> int | None:
    """The last integer in `text` (thousands separators allowed), or None."""
    matches = _INTEGER.findall(text)
    if not matches:
        return None
    try:
        return int(matches[-1].replace(",", ""))
    except ValueError:
        return None


def pair_problems(args, seed: int, drop_held_out_from_train: bool = True):
    """(training prompts with their `answer`, held-out problems) for the embedded pair's `args` (`PairArguments`).

    Generated problems: training ones of 1-2 steps drawn with `seed`, held-out ones of one step (which the 135M
    teacher gets right a third of the time) drawn with `seed + 10_000`; `drop_held_out_from_train` removes held-out
    questions from the training pool (the study does; the demo's published runs did not). With `args.dataset`, rows
    with an integer answer (GSM8K's `#### n` included), shuffled with `seed`: the first `eval_problems` are held out,
    the next `train_problems` train."""
    if args.dataset:
        train, held_out = _dataset_problems(args.dataset, args.train_problems, args.eval_problems, seed)
        # Fewer prompts than one batch would train zero steps (TRL's sampler drops an incomplete batch).
        needed = args.batch_size // getattr(args, "num_rollouts_per_prompt", 1)
        if train.num_rows < needed:
            raise ValueError(
                f"--dataset {args.dataset!r} leaves {train.num_rows} training rows after the {args.eval_problems} "
                f"held-out problems (--eval-problems); one optimizer step needs {needed} "
                f"(--batch-size {args.batch_size}"
                + (f" / --num-rollouts-per-prompt {args.num_rollouts_per_prompt}" if needed != args.batch_size else "")
                + "). Use a larger dataset, or lower --eval-problems or --batch-size."
            )
        return train, held_out
    held_out = make_problems(args.eval_problems, seed=seed + 10_000, steps=1, digits=1)
    train = make_problems(args.train_problems, seed=seed, steps=(1, 2), digits=1)
    if drop_held_out_from_train:
        seen = {p.question for p in held_out}
        train = [p for p in train if p.question not in seen] or train
    return to_dataset(train).select_columns(["prompt", "answer"]), to_dataset(held_out)


def _dataset_problems(name: str, n_train: int, n_eval: int, seed: int):
    from ..data import check_rows, load_prompt_dataset, prompt_problem

    data = load_prompt_dataset(name)["train"]
    check_rows(data, "prompt", prompt_problem, f"--dataset {name!r}", "Give every row its problem")
    data = data.shuffle(seed=seed)
    if "answer" not in data.column_names:
        raise ValueError(
            f"--dataset {name!r} needs an `answer` column for the evaluation; it has {data.column_names}."
        )
    data = data.map(lambda row: {"answer": extract_integer(str(row["answer"]).split("####")[-1])})
    data = data.filter(lambda row: row["answer"] is not None)
    if data.num_rows < n_eval + 1:
        raise ValueError(
            f"--dataset {name!r} has {data.num_rows} usable rows; need more than --eval-problems={n_eval}."
        )
    held_out = data.select(range(n_eval))
    train = data.select(range(n_eval, min(data.num_rows, n_eval + n_train)))
    return train.select_columns(["prompt", "answer"]), held_out
