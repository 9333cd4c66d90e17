"""The embedded teacher/student pair that `trl-tip demo` and `trl-tip study` share: their common arguments
(`PairArguments`), loading the two models (`load_models`: SmolLM2 from the pinned PyPI wheel, and the student made
by removing decoder layers), the training pool and held-out problems (`pair_problems`), and one scorer of held-out
completions (`scoring.token_kls`) that returns every metric the two commands report."""

from .arguments import PairArguments
from .loading import load_models, public_model_names
from .problems import pair_problems
from .scoring import Rollouts, answer_accuracy, greedy_rollouts, token_kls


__all__ = [
    "PairArguments",
    "Rollouts",
    "answer_accuracy",
    "greedy_rollouts",
    "load_models",
    "pair_problems",
    "public_model_names",
    "token_kls",
]
