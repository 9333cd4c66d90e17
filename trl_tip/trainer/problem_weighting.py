"""PACED's problem weighting in `TIPGKDTrainer`: each problem's rollouts weighted by the student's pass rate on it.

The pass rate of a problem is the share of its rollouts in the generation batch whose answer is right: graded with
`trl-tip eval`'s math-verify check against the dataset's answer column (`paced_answer_column`), or by a TRL reward
function. Rollouts of one problem may sit on several processes, so correctness is gathered and grouped by problem
before the weights are set.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable

import torch
from accelerate.utils import gather_object
from trl.data_utils import is_conversational

from ..core.schedules import group_pass_rates, paced_weights
from ..core.selectors import kept_per_sequence
from ..eval.grading import grade, gsm8k_reference
from .rollouts import rollout_loss_mask
from .tip_config import field_default


ROLLOUT_WEIGHTS_KEY = "rollout_weights"
logger = logging.getLogger(__name__)


def check_problem_weighting(args, train_dataset, reward_func: Callable | None) -> None:
    """Raises ValueError at construction when `problem_weighting="paced"` has no way to grade a rollout."""
    if args.problem_weighting != "paced":
        if reward_func is not None:
            raise ValueError(
                '`reward_func` grades rollouts for `problem_weighting="paced"` only; it would be ignored with '
                f'`problem_weighting="{args.problem_weighting}"`. Set `problem_weighting="paced"` or drop it.'
            )
        return
    if reward_func is not None:
        if not callable(reward_func):
            raise TypeError(f"`reward_func` must be callable (TRL's reward-function signature); got {reward_func!r}.")
        for name in ("paced_answer_column", "paced_answer_format"):
            default = field_default(name)
            if getattr(args, name) != default:
                raise ValueError(
                    f"`{name}`={getattr(args, name)!r} has no effect with `reward_func`, which grades the rollouts "
                    f"itself. Leave `{name}` at its default ({default!r}) or drop `reward_func`."
                )
        if inspect.iscoroutinefunction(reward_func):
            raise TypeError(
                "`reward_func` is an async function; PACED grades rollouts synchronously. Pass a plain function, e.g. "
                "`lambda **kwargs: asyncio.run(reward_func(**kwargs))`."
            )
        return
    columns = getattr(train_dataset, "column_names", None)
    answer = args.paced_answer_column
    if columns is not None and answer not in columns:
        raise ValueError(
            f'`problem_weighting="paced"` grades each rollout against the train dataset\'s `{answer}` column '
            f"(`paced_answer_column`), which it lacks (columns: {columns}). Set `paced_answer_column` to the column "
            "holding the final answer, or pass `reward_func=`, a TRL reward function `fn(prompts, completions, "
            "completion_ids, **columns) -> list[float]` returning 1.0 for a correct rollout and 0.0 otherwise."
        )


class ProblemWeightingMixin:
    """PACED weights of [`TIPGKDTrainer`]; a mixin over TRL's `DistillationTrainer`."""

    reward_func: Callable | None = None
    _warned_no_paced_weight = False

    def _grade_rollouts(self, inputs: list[dict], output: dict) -> list[float]:
        """Each local rollout's correctness in [0, 1], or NaN where a reward function could not grade it."""
        completion_ids = [
            ids[mask.bool()].tolist() for ids, mask in zip(output["completion_ids"], output["completion_mask"])
        ]
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if self.reward_func is None:
            answer, answer_format = self.args.paced_answer_column, self.args.paced_answer_format
            return [float(grade(text, _reference(x[answer]), answer_format).correct) for text, x in zip(texts, inputs)]
        prompts = [x["prompt"] for x in inputs]
        completions = (
            [[{"role": "assistant", "content": text}] for text in texts] if is_conversational(inputs[0]) else texts
        )
        # Called as GRPOTrainer calls reward functions: the other dataset columns as keyword lists, the trainer state,
        # and `log_extra` / `log_metric` (metrics land under `paced/`; there is no completions table to extend).
        skip = ("prompt", "completion", "completion_ids")
        columns = {key: [x[key] for x in inputs] for key in inputs[0] if key not in skip}
        rewards = self.reward_func(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            trainer_state=self.state,
            log_extra=lambda column, values: None,
            log_metric=lambda name, value: self._metrics["train"][f"paced/{name}"].append(value),
            **columns,
        )
        # `None` is TRL's "cannot grade this one" (e.g. `accuracy_reward` on an unparsable reference): left out.
        # A list of None (nothing gradable) is allowed: those problems weigh 0, and `_add_rollout_weights` warns.
        return checked_rewards(rewards, len(texts))

    def _normalizer_share(self, loss_mask):
        """Each rollout's tokens in the loss's denominator: its kept count when `loss_normalization="selected"` and
        the selector's count follows from the masks, else its valid tokens. The weights keep these counts' total, so
        the weighted loss is a per-token average of exactly the tokens the normalizer counts."""
        if self.args.loss_normalization == "selected" and self._count_follows_from_masks:
            return kept_per_sequence(loss_mask, self._ratio_kept())
        return loss_mask.sum(dim=1)

    def _add_rollout_weights(self, inputs: list[dict], output: dict) -> None:
        """Sets `output["rollout_weights"]` (this process's rollouts) and logs the pass rates and the mean weight."""
        correct = self._grade_rollouts(inputs, output)
        keys = [repr((x["prompt"], x.get(self.args.paced_answer_column))) for x in inputs]
        tokens = self._normalizer_share(rollout_loss_mask(output)).tolist()
        # Every process needs the whole generation batch: a problem's rollouts may sit on several processes.
        rows = gather_object([(self.accelerator.process_index, k, c, n) for k, c, n in zip(keys, correct, tokens)])
        pass_rates = group_pass_rates([row[1] for row in rows], [row[2] for row in rows])
        weights = paced_weights(
            torch.tensor(pass_rates),
            torch.tensor([row[3] for row in rows], dtype=torch.float64),
            self.args.paced_alpha,
            self.args.paced_beta,
        )
        rank = self.accelerator.process_index
        local = torch.stack([w for w, row in zip(weights, rows) if row[0] == rank])
        output[ROLLOUT_WEIGHTS_KEY] = local.to(self.accelerator.device)
        metrics = self._metrics["train"]
        problem_rates = torch.tensor(list(dict(zip((row[1] for row in rows), pass_rates)).values()))
        problem_rates = problem_rates[~problem_rates.isnan()]
        metrics["tip/pass_rate_mean"].append(problem_rates.mean().item())
        metrics["tip/pass_rate_zero_share"].append((problem_rates == 0).float().mean().item())
        metrics["tip/pass_rate_one_share"].append((problem_rates == 1).float().mean().item())
        metrics["tip/paced_mean_weight"].append(weights.mean().item())
        metrics["tip/paced_weighted_share"].append((weights > 0).float().mean().item())
        if not bool((weights > 0).any()) and not self._warned_no_paced_weight:
            self._warned_no_paced_weight = True
            logger.warning(
                "PACED: every problem of this generation batch was answered right by all of its rollouts or by none "
                "(pass-rate mean %.2f), so the batch trains on nothing; `tip/paced_weighted_share` shows how often. "
                "If the student never gets one right, check how answers are read: `paced_answer_format` (%r), "
                "`paced_answer_column` (%r), or pass `reward_func=`.",
                problem_rates.mean().item(),
                self.args.paced_answer_format,
                self.args.paced_answer_column,
            )


REWARD_CONTRACT = (
    "`reward_func` must return one reward in [0, 1] (1.0 correct, 0.0 wrong) or None (not gradable) per completion "
    "for PACED's pass rate, as a list"
)


def checked_rewards(rewards, num_completions: int) -> list[float]:
    """A reward function's output as floats (None -> NaN, "not gradable"); raises ValueError naming `reward_func`
    and the first bad value: a string, a NaN (say None instead), a number outside [0, 1], or the wrong count."""
    if hasattr(rewards, "tolist") and not isinstance(rewards, (list, tuple)):
        rewards = rewards.tolist()  # a tensor or array of rewards
    if not isinstance(rewards, (list, tuple)):
        raise ValueError(f"{REWARD_CONTRACT}; got a {type(rewards).__name__}: {rewards!r}.")
    if len(rewards) != num_completions:
        raise ValueError(f"{REWARD_CONTRACT}; got {len(rewards)} rewards for {num_completions} completions.")
    values = []
    for position, reward in enumerate(rewards):
        if hasattr(reward, "item") and not isinstance(reward, (str, bytes)):
            reward = reward.item()  # a 0-d tensor or a numpy scalar
        if reward is None:
            values.append(math.nan)
            continue
        if isinstance(reward, (str, bytes)) or not isinstance(reward, (int, float)):
            raise ValueError(
                f"{REWARD_CONTRACT}; completion {position} got {reward!r} ({type(reward).__name__}). Convert it to a "
                "number, e.g. `float(correct)`."
            )
        if math.isnan(reward):
            raise ValueError(
                f"{REWARD_CONTRACT}; completion {position} got NaN. Return None for a completion it cannot grade."
            )
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"{REWARD_CONTRACT}; completion {position} got {reward!r}, outside [0, 1].")
        values.append(float(reward))
    return values


def _reference(answer) -> str:
    """The bare final answer of an `answer` cell: a number, a LaTeX answer, or a GSM8K solution ending `#### 42`."""
    text = str(answer)
    return gsm8k_reference(text) if "####" in text else text


def weighted_by_problem(keep: torch.Tensor, weights: torch.Tensor | None, rollout_weights: torch.Tensor | None):
    """The loss's tokens and weights under PACED: each rollout's kept tokens times its problem weight; rollouts of
    weight 0 leave the mask, so they cost no loss compute (their tokens still count in the normalizer, which the
    weights' rescaling accounts for: `paced_weights`)."""
    if rollout_weights is None:
        return keep, weights
    per_token = rollout_weights.to(keep.device, torch.float32).unsqueeze(-1).expand(keep.shape)
    if weights is not None:
        per_token = per_token * weights
    return keep & (per_token > 0), per_token
