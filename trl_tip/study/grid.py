"""The study's arguments: the grid (rules x seeds), the shared training and evaluation knobs, and their validation.

Everything here is checked before any model is loaded, so a typo in the grid fails in a second, naming the option.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

from ..core.schedules import BetaSchedule, short_number
from ..core.selectors import SELECTION_SCOPES, SELECTORS
from ..pair.arguments import PairArguments, check_positive_int
from ..trainer.tip_config import STUDY_RULE_OPTIONS


# `quadrant` keeps named quadrants, not a ratio of tokens, so it has no place on a ratio grid.
STUDY_SELECTORS = tuple(name for name in SELECTORS if name != "quadrant")
DEFAULT_RULES = ("all:1.0", "soft_or:0.5", "soft_or_bottom:0.5", "entropy_sampling:0.5", "q3:0.1", "random:0.5")
DEFAULT_SEEDS = (0, 1, 2)
# Fields that name the grid or where it goes, not how a run trains or is evaluated: a study folder's runs must share
# every other field (see `StudyArguments.settings`).
GRID_FIELDS = ("rules", "seeds", "output_dir", "keep_models", "threads")
# `TIPConfig` fields a rule may set after its ratio (its `STUDY_RULE_OPTIONS`); every other knob is shared by the grid.
RULE_OPTIONS = STUDY_RULE_OPTIONS
_RUN_ID = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Rule:
    """One token-selection rule of the grid: a selector name, the share of each rollout's tokens it keeps, and any
    schedule or weighting options (`RULE_OPTIONS`, as `TIPConfig` keyword arguments)."""

    name: str
    ratio: float
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """`soft_or:0.5` or `soft_or:0.5+selection_ratio_schedule=adaptive`, as written on the command line."""
        return f"{self.name}:{self.ratio:g}" + "".join(f"+{key}={value}" for key, value in self.options)

    def run_id(self, seed: int) -> str:
        """File-name-safe id of one run, e.g. `soft_or-0.5-seed1`."""
        options = "".join(f"+{key}={value}" for key, value in self.options)
        return _RUN_ID.sub("_", f"{self.name}-{self.ratio:g}{options}-seed{seed}")

    def config_options(self) -> dict:
        """The options as `TIPConfig` keyword arguments (numbers as floats)."""
        return {key: _number_or_text(value) for key, value in self.options}


def study_rule_options(rule: Rule) -> dict:
    """A rule's `TIPConfig` options in the study: PACED reads the study's answers as numbers (its prompts ask for the
    final number only), not as `\\boxed{}`, unless the rule says otherwise; a self teacher (the student told the
    answer, in place of the grid's teacher for training; evaluation still scores against the grid's teacher) reads
    the demo's `ANSWER_TEACHER_PROMPT_TEMPLATE` (the problem, then its answer)."""
    options = rule.config_options()
    if options.get("problem_weighting") == "paced":
        options.setdefault("paced_answer_format", "number")
    if "teacher_model_kind" in options:
        from ..pair.problems import ANSWER_TEACHER_PROMPT_TEMPLATE

        options["teacher_prompt_template"] = ANSWER_TEACHER_PROMPT_TEMPLATE
    return options


def _number_or_text(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def parse_rule(text) -> Rule:
    """`name:ratio` (e.g. `soft_or:0.5`), then any `+option=value` (`RULE_OPTIONS`, e.g.
    `soft_or:0.5+selection_ratio_schedule=adaptive`); `all` alone means `all:1.0`. Raises ValueError naming `--rules`.
    """
    allowed = ", ".join(STUDY_SELECTORS)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--rules entries must be `name:ratio` strings such as soft_or:0.5; got {text!r}.")
    # Split at a `+` that starts an option name only, so a value such as `1e+0` stays whole.
    head, *option_texts = re.split(r"\+(?=\s*[A-Za-z_])", text.strip())
    options = [_parse_rule_option(option, text) for option in option_texts]
    if len({key for key, _ in options}) != len(options):
        raise ValueError(f"--rules: {text!r} sets an option twice.")
    # One spelling per setting (sorted keys, `1.0` as `1`), so the same run is never listed twice under two labels.
    options = tuple(sorted(options))
    name, sep, ratio_text = head.partition(":")
    name = name.strip()
    if name not in STUDY_SELECTORS:
        extra = (
            " (`quadrant` keeps named quadrants, not a ratio, and is not a study rule)" if name == "quadrant" else ""
        )
        raise ValueError(f"--rules: unknown rule {name!r} in {text!r}{extra}; the rules are {allowed}.")
    if not sep:
        if name != "all":
            raise ValueError(f"--rules: {text!r} needs a ratio, e.g. {name}:0.5 (the share of tokens kept).")
        ratio_text = "1"
    try:
        ratio = float(ratio_text)
    except ValueError:
        raise ValueError(f"--rules: the ratio in {text!r} is not a number; write e.g. {name}:0.5.") from None
    if not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"--rules: the ratio in {text!r} must be in (0, 1]; got {ratio_text.strip()!r}.")
    if name == "all" and ratio != 1.0:
        raise ValueError(f"--rules: `all` keeps every token, so its ratio is 1.0; got {text!r}. Use random:{ratio:g}.")
    return Rule(name, ratio, options)


def _parse_rule_option(option: str, text: str) -> tuple[str, str]:
    key, sep, value = option.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not value:
        raise ValueError(f"--rules: {option!r} in {text!r} must be `option=value`, e.g. +problem_weighting=paced.")
    if key not in RULE_OPTIONS:
        raise ValueError(
            f"--rules: unknown option {key!r} in {text!r}; a rule may set {', '.join(RULE_OPTIONS)} (the other knobs "
            "are the grid's own flags)."
        )
    if key == "beta_schedule":
        try:
            return key, str(BetaSchedule.parse(value))
        except ValueError as error:
            raise ValueError(f"--rules: {text!r}: {error}") from None
    number = _number_or_text(value)
    return key, short_number(number) if isinstance(number, float) else value


def parse_seeds(value) -> list[int]:
    """Seeds from a list (of ints or digit strings) or one string such as '0 1 2' or '0,1,2'."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if isinstance(items, int) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"--seeds must be a list of non-negative integers such as `0 1 2`; got {value!r}.")
    seeds = []
    for item in items:
        is_int = isinstance(item, int) and not isinstance(item, bool) and item >= 0
        if not (is_int or (isinstance(item, str) and item.strip().isdigit())):
            raise ValueError(f"--seeds must be non-negative integers such as `0 1 2`; {item!r} is not one.")
        seeds.append(int(item))
    if not seeds:
        raise ValueError("--seeds is empty: give at least one seed, e.g. `--seeds 0 1 2`.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {seeds}.")
    return seeds


@dataclass
class StudyArguments(PairArguments):
    """Arguments of `trl-tip study` (each field is a `--flag`, with `_` or `-`, and a key of a `--config` YAML): the
    embedded pair's (`PairArguments`), the grid, and the knobs every run of the grid shares."""

    rules: list[str] = field(
        default_factory=lambda: list(DEFAULT_RULES),
        metadata={
            "help": "The grid's token-selection rules as name:ratio (share of each rollout's tokens kept), e.g. "
            f"`--rules all:1.0 soft_or:0.5 q3:0.1`. Names: {', '.join(STUDY_SELECTORS)}; `all` is always 1.0 and "
            "is the baseline the summary compares against. A rule may add schedule or weighting options of "
            "`TIPConfig` as +option=value, e.g. `soft_or:0.5+selection_ratio_schedule=adaptive` or "
            f"`all:1.0+problem_weighting=paced` (options: {', '.join(RULE_OPTIONS)})."
        },
    )
    seeds: list[int] = field(
        default_factory=lambda: list(DEFAULT_SEEDS),
        metadata={
            "help": "Training seeds, e.g. `--seeds 0 1 2`: every rule runs once per seed. A seed sets the order of "
            "the training prompts, the rollout sampling and the selection generator; the held-out set is shared."
        },
    )
    eval_problems: int = field(
        default=96, metadata={"help": "Held-out problems, the same for every run (one-step arithmetic by default)."}
    )
    problem_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the generated problems (or of the dataset shuffle): fixed across the grid's seeds."
        },
    )
    steps: int = field(default=10, metadata={"help": "Optimizer steps per run."})
    num_rollouts_per_prompt: int = field(
        default=1, metadata={"help": "Rollouts sampled per prompt; must divide --batch-size."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (transformers name)."})
    beta: float = field(default=1.0, metadata={"help": "Loss: 1 reverse KL (the paper), 0 forward KL, else GJSD."})
    temperature: float = field(default=1.0, metadata={"help": "Rollout sampling and loss temperature."})
    selection_scope: str = field(
        default="sequence",
        metadata={
            "help": f"Rank tokens within each rollout or pooled over the micro-batch: {', '.join(SELECTION_SCOPES)}."
        },
    )
    eval_batch_size: int = field(default=48, metadata={"help": "Prompts per batch in the held-out evaluation."})
    output_dir: str = field(
        default="outputs/study",
        metadata={
            "help": "The study folder: results.jsonl, summary.md, study.png, runs/ (one file per finished run) and "
            "the cached baselines. Running again resumes: finished runs are kept, the rest run."
        },
    )
    keep_models: bool = field(
        default=False, metadata={"help": "Also save every trained student under models/<run>/ (about 0.5 GB each)."}
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads (default: torch's choice). Results repeat exactly only with the same count."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.rules, str):
            self.rules = self.rules.split()
        if not self.rules:
            raise ValueError("--rules is empty: the grid needs at least one rule, e.g. `--rules all:1.0 soft_or:0.5`.")
        parsed = [parse_rule(text) for text in self.rules]
        labels = [rule.label for rule in parsed]
        if len(set(labels)) != len(labels):
            raise ValueError(f"--rules lists a rule twice: {labels}.")
        self.rules = labels
        self.seeds = parse_seeds(self.seeds)
        for name in ("num_rollouts_per_prompt", "eval_batch_size"):
            check_positive_int(name, getattr(self, name))
        if self.batch_size % self.num_rollouts_per_prompt:
            raise ValueError(
                f"--num-rollouts-per-prompt ({self.num_rollouts_per_prompt}) must divide --batch-size "
                f"({self.batch_size})."
            )
        if isinstance(self.problem_seed, bool) or not isinstance(self.problem_seed, int) or self.problem_seed < 0:
            raise ValueError(f"--problem-seed must be a non-negative integer; got {self.problem_seed!r}.")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"--beta must be in [0, 1] (0 forward KL, 1 reverse KL); got {self.beta!r}.")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"--temperature must be a positive finite number; got {self.temperature!r}.")
        if self.selection_scope not in SELECTION_SCOPES:
            raise ValueError(
                f"--selection-scope must be one of {', '.join(SELECTION_SCOPES)}; got {self.selection_scope!r}."
            )
        if self.threads is not None:
            check_positive_int("threads", self.threads)
        # Last: a rule's options are checked with the grid's knobs, which must be valid themselves first.
        for rule in parsed:
            self._check_rule_options(rule)
        if not self.output_dir:
            raise ValueError("--output-dir must name a folder.")

    def _check_rule_options(self, rule: Rule) -> None:
        """A rule's options as `TIPConfig` checks them with this grid's knobs, so a bad one fails before any run."""
        if not rule.options:
            return
        from ..trainer.tip_config import TIPConfig

        try:
            TIPConfig(
                output_dir=self.output_dir,
                token_selector=rule.name,
                selection_ratio=rule.ratio,
                per_device_train_batch_size=self.batch_size,
                num_rollouts_per_prompt=self.num_rollouts_per_prompt,
                use_cpu=True,
                report_to="none",
                **study_rule_options(rule),
            )
        except ValueError as error:
            raise ValueError(f"--rules: {rule.label!r}: {error}") from None

    @property
    def grid(self) -> list[tuple[Rule, int]]:
        """Every (rule, seed) pair, seed-major: all rules of seed 0 first, so a stopped grid has whole seeds done."""
        return [(parse_rule(text), seed) for seed in self.seeds for text in self.rules]

    def settings(self) -> dict:
        """Every knob the runs share (all fields but the grid and where it goes): a study folder's runs all match."""
        return {k: v for k, v in asdict(self).items() if k not in GRID_FIELDS}


def make_parser():
    from trl import TrlParser

    from .. import study

    return TrlParser(
        [StudyArguments],
        prog="trl-tip study",
        description=study.__doc__.split("\n\n")[0],
        epilog=(
            "Default grid: " + " ".join(DEFAULT_RULES) + f", seeds {' '.join(map(str, DEFAULT_SEEDS))}. "
            "Example: trl-tip study --rules all:1.0 soft_or:0.5 random:0.5 --seeds 0 1 --steps 10 "
            "--output-dir outputs/study-small; or trl-tip study --config recipes/study/default.yaml. "
            "--config FILE.yaml sets any option from a YAML mapping (keys as above; flags override it). "
            "Running the same command again resumes the grid."
        ),
    )


def parse_args(argv: list[str] | None = None) -> StudyArguments:
    """Flags and `--config FILE.yaml` (flags override the file). Raises ValueError on a bad grid or knob."""
    (args,) = make_parser().parse_args_and_config(args=argv)
    return args
