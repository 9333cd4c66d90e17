"""The datasets of a `TIPGKDTrainer`, checked when it is built, before any model loads: enough rows for one
optimizer step, the columns the run reads, and every row of them (no null or empty prompt, no null privileged context
or PACED answer), each error naming the dataset, the row and the column. Without these checks too few rows train zero
steps and save the untrained student, and a bad row fails steps later inside `generate` or the tokenizer (or, for an
answer, is graded against the text "None")."""

from __future__ import annotations

from ..data import check_rows, prompt_problem, text_problem, value_problem
from .privileged_context import context_columns


PROMPT_COLUMN_FIX = (
    "TRL's distillation trainers read each prompt from a `prompt` column (text, or a list of role/content messages). "
    "Rename the column, or load the data with `trl_tip.data.load_prompt_dataset`, which builds `prompt` from "
    "`question` or `problem`"
)


def prompts_per_step(args) -> int:
    """Distinct prompts one optimizer step draws: the generation batch (per-device batch x processes x accumulation
    steps) over the rollouts per prompt. A map-style train dataset with fewer rows trains zero steps (TRL's
    `RepeatSampler` drops an incomplete batch)."""
    generation_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    return max(1, generation_batch // max(1, args.num_rollouts_per_prompt))


def _needed_text(args) -> str:
    text = f"per_device_train_batch_size={args.per_device_train_batch_size}"
    if args.world_size > 1:
        text += f" x {args.world_size} processes"
    if args.gradient_accumulation_steps > 1:
        text += f" x gradient_accumulation_steps={args.gradient_accumulation_steps}"
    if args.num_rollouts_per_prompt > 1:
        text += f" / num_rollouts_per_prompt={args.num_rollouts_per_prompt}"
    return text


def check_datasets(args, train_dataset, eval_dataset=None, reward_func=None, where: str = "`train_dataset`") -> None:
    """Raises ValueError for a train or eval dataset the run cannot use, naming it (`where`), the row and the column.

    Args:
        args ([`TIPConfig`]): what the run reads (batch sizes, `lmbda`, the self teacher's template, PACED).
        train_dataset, eval_dataset: as given to the trainer (`eval_dataset` may be a dict of datasets).
        reward_func: PACED's grader; without it PACED reads `paced_answer_column`, whose rows are checked too.
        where (`str`): how messages name the train dataset (`trl-tip train` names the file).
    """
    if train_dataset is not None:
        _check_dataset(args, train_dataset, where, prompts_per_step(args), training=True, reward_func=reward_func)
    evals = eval_dataset if isinstance(eval_dataset, dict) else {None: eval_dataset}
    for name, data in evals.items():
        if data is not None:
            label = "`eval_dataset`" if name is None else f"`eval_dataset[{name!r}]`"
            _check_dataset(args, data, label, 1, training=False, reward_func=reward_func)


def _check_dataset(args, dataset, where: str, needed: int, training: bool, reward_func) -> None:
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        raise ValueError(
            f"{where} is a DatasetDict with the splits {list(dataset)}; pass one split, e.g. `dataset['train']`."
        )
    rows = getattr(dataset, "num_rows", None)
    if rows is not None and rows < needed:
        if training:
            raise ValueError(
                f"{where} has {rows} row{'' if rows == 1 else 's'}, fewer than the {needed} distinct prompts one "
                f"optimizer step needs ({_needed_text(args)}), so it would train 0 steps and save the untrained "
                "student. Add rows or lower per_device_train_batch_size."
            )
        raise ValueError(f"{where} has no rows; pass a dataset with rows, or none.")
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # a stream without known features: its rows are read while training
        return
    if "prompt" not in columns:
        raise ValueError(f"{where} has no `prompt` column (columns: {columns}). {PROMPT_COLUMN_FIX}.")
    if rows is None:  # an IterableDataset: reading its rows here would consume the stream
        return
    check_rows(dataset, "prompt", prompt_problem, where, "Give every row a non-empty prompt, or drop the row")
    if args.lmbda < 1.0 and "completion" in columns:
        check_rows(
            dataset, "completion", value_problem, where, "`lmbda` < 1 trains on these completions: give every row one"
        )
    if args.teacher_model_kind is not None:
        for column in context_columns(args.teacher_prompt_template):
            if column in columns:
                check_rows(
                    dataset,
                    column,
                    value_problem,
                    where,
                    "`teacher_prompt_template` reads it for the self teacher's prompt: give every row a value (an "
                    "empty string for no context)",
                )
    answer = args.paced_answer_column
    if training and args.problem_weighting == "paced" and reward_func is None and answer in columns:
        check_rows(
            dataset,
            answer,
            text_problem,
            where,
            "PACED grades each rollout against it (`paced_answer_column`): give every row its final answer, drop the "
            "row, or pass `reward_func=`",
        )
