"""`trl-tip study`: train the same student from the same start under several token-selection rules and seeds, and
compare them on one held-out set.

Every run of the grid shares the teacher, the untrained student, the training prompts, the steps, batch, learning
rate and completion length; only the rule (selector and ratio) and the seed change. Outputs land in the study folder:
`results.jsonl` (one row per run), `summary.md` (mean ± standard error across seeds, paired differences to `all`)
and `study.png`. Running the same command again resumes an interrupted grid.
"""

from .grid import DEFAULT_RULES, DEFAULT_SEEDS, STUDY_SELECTORS, Rule, StudyArguments, parse_args, parse_rule
from .report import aggregate, mean_se, paired_difference, summary_markdown
from .runner import StudyFolderError, run_study


__all__ = [
    "DEFAULT_RULES",
    "DEFAULT_SEEDS",
    "STUDY_SELECTORS",
    "Rule",
    "StudyArguments",
    "StudyFolderError",
    "aggregate",
    "main",
    "mean_se",
    "paired_difference",
    "parse_args",
    "parse_rule",
    "run_study",
    "summary_markdown",
]


def main(argv: list[str] | None = None) -> None:
    """`trl-tip study ...`: errors in the arguments or the folder exit with one line naming the option."""
    import sys

    import yaml

    from ..models import ModelSourceError
    from ..utils.command_errors import check_config_file, usage_errors

    with usage_errors("study", ValueError, ModelSourceError, FileNotFoundError, yaml.YAMLError):
        check_config_file(sys.argv[1:] if argv is None else argv)
        args = parse_args(argv)
        run_study(args)
