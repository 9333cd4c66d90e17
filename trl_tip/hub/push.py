"""Publishing a TIP run on the Hub: the student with its card, and the quadrant statistics as a dataset beside it.

Every Hub call goes through `huggingface_hub` (`create_repo`, `create_branch`, `upload_folder`, `create_commit`,
`hf_hub_download`) or `datasets.Dataset.push_to_hub`, so `HF_TOKEN`, `HF_ENDPOINT` and the stored login apply as
usual. Calls are retried with exponential backoff on 5xx, 429 and network timeouts; each step is idempotent (an
unchanged file is not re-uploaded), so rerunning `trl-tip push` after a failure completes the push. Nothing in the
local run folder is removed or changed by a push, except that the model card is re-rendered with the dataset link.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from ..utils.command_errors import debugging, explicit_bool_flags, usage_exit
from ..utils.files import STAGING_SUFFIX


logger = logging.getLogger(__name__)
T = TypeVar("T")

STATS_SUFFIX = "-tip-stats"
STATS_CONFIGS = ("steps", "histogram")
STATS_TAGS = ["trl-tip", "tip", "distillation", "quadrant-statistics"]
# What a run folder holds that does not belong in the model repo: transformers' own exclusions (checkpoints, "_*"),
# plus staging files and folders of interrupted writes and the lock file of a `trl-tip study` (fnmatch's `*` crosses
# `/`, so each pattern also covers nested paths).
IGNORED_IN_MODEL_REPO = [
    "checkpoint-*",
    "_*",
    f"*{STAGING_SUFFIX}",
    f"**/*{STAGING_SUFFIX}",
    f"*{STAGING_SUFFIX}/*",
    ".lock",
    "*/.lock",
]


class HubPushError(RuntimeError):
    """A push that cannot start (no token, incomplete run folder) or that failed after its retries."""


def require_token(token: str | None = None) -> str:
    """The token to push with: `token`, else `HF_TOKEN`, else the stored login; fails with the fix when none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubPushError(
            "Pushing to the Hub needs a token with write access, and none was found. Run `hf auth login`, or set "
            "the HF_TOKEN environment variable (or `hub_token` in the config), then start again."
        )
    return token


def default_stats_id(model_id: str) -> str:
    """`<model_id>-tip-stats`: the statistics dataset's default id, next to the model."""
    return model_id + STATS_SUFFIX


def _same_namespace(repo_id: str, model_id: str) -> str:
    return repo_id if "/" in repo_id or "/" not in model_id else f"{model_id.split('/')[0]}/{repo_id}"


def is_transient(error: BaseException) -> bool:
    """Whether a failed Hub call is worth retrying: server errors, rate limits, timeouts, dropped connections."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        return status is not None and (status >= 500 or status == 429)
    return isinstance(error, (httpx.TimeoutException, httpx.NetworkError, ConnectionError, TimeoutError))


def with_retries(call: Callable[[], T], what: str, attempts: int = 5, wait: float = 2.0) -> T:
    """
    Runs `call`, retrying transient failures (see `is_transient`) with exponential backoff.

    Args:
        call: the Hub operation; it must be safe to repeat.
        what (`str`): what it does, for the log line of each retry.
        attempts (`int`): tries in all.
        wait (`float`): seconds before the first retry; doubled each time.
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
            delay = wait * 2 ** (attempt - 1)
            logger.warning(
                f"{what} failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
                f"retry {attempt} of {attempts - 1} in {delay:g} s"
            )
            time.sleep(delay)
    raise AssertionError("unreachable")


def ensure_branch(
    api, repo_id: str, revision: str | None, repo_type: str = "model", attempts: int = 5, wait: float = 2.0
) -> None:
    """Creates the branch `revision` of a repo from `main` when it is missing (uploads to a missing branch fail)."""
    if revision:
        with_retries(
            lambda: api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True),
            f"Creating the {repo_type} branch {revision!r}",
            attempts,
            wait,
        )


def check_run_folder(run_dir: str) -> None:
    """A pushable run folder holds a saved model (or adapter) and `tip_stats/tracker.json`."""
    missing = []
    if not any(os.path.isfile(os.path.join(run_dir, f)) for f in ("config.json", "adapter_config.json")):
        missing.append("a saved model (config.json or adapter_config.json)")
    if not os.path.isfile(os.path.join(run_dir, "tip_stats", "tracker.json")):
        missing.append("the quadrant statistics (tip_stats/tracker.json)")
    if missing:
        raise HubPushError(f"{run_dir!r} is not a finished trl-tip run: it lacks {' and '.join(missing)}.")


def render_stats_card(card_data, tracker, dataset_id: str, model_id: str, plot: str | None, run: dict) -> str:
    """The statistics dataset's card: `datasets`' own metadata (configs, features) plus trl-tip's description."""
    from .model_card import quadrant_rows, render_template

    quadrants, summary = quadrant_rows(tracker)
    # The statistics describe the student's run: they carry the student card's licence, when it states one, and no
    # licence is claimed otherwise.
    license = run.get("license") or card_data.get("license")
    if license:
        card_data["license"] = license
    card_data["tags"] = sorted(set(card_data.get("tags") or []) | set(STATS_TAGS))
    entropy, divergence = tracker.entropy_threshold, tracker.divergence_threshold
    split_text = (
        "each micro-batch's medians"
        if entropy == "median" and divergence == "median"
        else f"entropy {entropy} and reverse KL {divergence}"
    )
    return render_template(
        "stats_dataset.md.j2",
        card_data=card_data.to_yaml(),
        dataset_id=dataset_id,
        model_id=model_id,
        split_text=split_text,
        selector=run.get("selector", "unknown"),
        ratio_text=run.get("ratio_text", "unknown"),
        num_steps=len(tracker.steps),
        num_bins=len(tracker.histogram_rows()),
        quadrants=quadrants,
        selected_fraction=summary["selected_fraction"],
        num_tokens=int(summary["num_tokens"]),
        plot=plot,
    )


def push_stats_dataset(
    run_dir: str,
    dataset_id: str,
    model_id: str,
    *,
    token: str,
    private: bool = False,
    revision: str | None = None,
    attempts: int = 5,
    wait: float = 2.0,
) -> str:
    """
    Pushes `<run_dir>/tip_stats` as the dataset `dataset_id`: configs `steps` and `histogram` (each a `train` split;
    their columns differ, so they cannot be splits of one configuration), the quadrant plot, and a card linking to
    `model_id`. Returns the dataset id.
    """
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi

    from ..core.quadrants import QuadrantTracker
    from .model_card import load_card_context
    from .plots import plot_quadrants

    api = HfApi(token=token)
    tracker = QuadrantTracker.load(os.path.join(run_dir, "tip_stats"))
    data = tracker.to_dataset_dict()
    dataset_id = with_retries(
        lambda: api.create_repo(dataset_id, repo_type="dataset", private=private, exist_ok=True),
        "Creating the dataset repo",
        attempts,
        wait,
    ).repo_id
    ensure_branch(api, dataset_id, revision, repo_type="dataset", attempts=attempts, wait=wait)
    for config in STATS_CONFIGS:
        with_retries(
            lambda config=config: data[config].push_to_hub(
                dataset_id,
                config_name=config,
                split="train",
                private=private,
                token=token,
                revision=revision,
                commit_message=f"Upload the `{config}` quadrant statistics (trl-tip)",
            ),
            f"Pushing the `{config}` statistics",
            attempts,
            wait,
        )
    readme = with_retries(
        lambda: api.hf_hub_download(dataset_id, "README.md", repo_type="dataset", revision=revision),
        "Reading the dataset card",
        attempts,
        wait,
    )
    plot = os.path.join(run_dir, "quadrants.png")
    if not os.path.isfile(plot) and tracker.steps:
        plot_quadrants(tracker, plot)
    card = render_stats_card(
        DatasetCard.load(readme).data,
        tracker,
        dataset_id,
        model_id,
        "quadrants.png" if os.path.isfile(plot) else None,
        load_card_context(run_dir) or {},
    )
    operations = [CommitOperationAdd("README.md", card.encode())]
    if os.path.isfile(plot):
        operations.append(CommitOperationAdd("quadrants.png", plot))
    with_retries(
        lambda: api.create_commit(
            dataset_id,
            operations,
            repo_type="dataset",
            revision=revision,
            commit_message="Dataset card and quadrant plot (trl-tip)",
        ),
        "Uploading the dataset card",
        attempts,
        wait,
    )
    return dataset_id


@dataclass
class PushResult:
    model_id: str
    stats_id: str
    model_url: str
    stats_url: str


def push_run(
    run_dir: str,
    model_id: str,
    stats_id: str | None = None,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    attempts: int = 5,
    wait: float = 2.0,
) -> PushResult:
    """
    Pushes a finished run folder: the student (with its model card re-rendered to link the statistics dataset) to
    `model_id`, then the statistics to `stats_id` (default `<model_id>-tip-stats`).

    Args:
        run_dir (`str`): the trainer's `output_dir` (or any folder with a saved model and `tip_stats/`).
        model_id (`str`): the model repo, `name` (your namespace) or `org/name`.
        stats_id (`str`, *optional*): the dataset repo; a bare name goes to the model's namespace.
        private (`bool`): create both repos private (existing repos keep their visibility).
        revision (`str`, *optional*): a branch to push to (created from `main` when missing).
        token (`str`, *optional*): defaults to `HF_TOKEN` or the stored login.
        attempts, wait: retry policy of every Hub call (see `with_retries`).
    """
    from huggingface_hub import HfApi

    from .model_card import rerender_student_card

    token = require_token(token)
    check_run_folder(run_dir)
    api = HfApi(token=token)
    model_id = with_retries(
        lambda: api.create_repo(model_id, private=private, exist_ok=True), "Creating the model repo", attempts, wait
    ).repo_id
    stats_id = _same_namespace(stats_id or default_stats_id(model_id), model_id)
    ensure_branch(api, model_id, revision, attempts=attempts, wait=wait)
    rerender_student_card(run_dir, stats_dataset=stats_id)
    print(f"Pushing the student in {run_dir} to {api.endpoint}/{model_id} ...")
    with_retries(
        lambda: api.upload_folder(
            repo_id=model_id,
            folder_path=run_dir,
            revision=revision,
            ignore_patterns=IGNORED_IN_MODEL_REPO,
            commit_message="Upload the TIP-distilled student (trl-tip)",
        ),
        "Uploading the student",
        attempts,
        wait,
    )
    print(f"Pushing the quadrant statistics to {api.endpoint}/datasets/{stats_id} ...")
    stats_id = push_stats_dataset(
        run_dir, stats_id, model_id, token=token, private=private, revision=revision, attempts=attempts, wait=wait
    )
    return PushResult(model_id, stats_id, f"{api.endpoint}/{model_id}", f"{api.endpoint}/datasets/{stats_id}")


@dataclass
class PushArguments:
    """Options of `trl-tip push`; each is a `--flag`, spelled with `_` or `-` (transformers' `HfArgumentParser`)."""

    model_id: str = field(metadata={"help": "Model repo: name (your namespace) or org/name."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "The run folder (the trainer's output_dir), when not given as the first argument."},
    )
    stats_id: str | None = field(
        default=None, metadata={"help": "Dataset repo for the statistics; default <model-id>-tip-stats."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repos private."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch to push to (created from main when missing)."}
    )
    retries: int = field(default=4, metadata={"help": "Retries of each Hub call on 5xx/429/timeouts."})
    retry_wait: float = field(default=2.0, metadata={"help": "Seconds before the first retry (doubles)."})


def make_parser():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        PushArguments,
        prog="trl-tip push",
        description="Push a finished run: the student and its model card, then the quadrant statistics as a dataset. "
        "Uses HF_TOKEN or the stored login; rerun it to complete a push that failed midway.",
    )
    # The documented spelling, `trl-tip push outputs/my-run --model-id ...`, names the run folder first.
    parser.add_argument("run_dir", nargs="?", metavar="output_dir", help="The run folder (the trainer's output_dir).")
    return parser


def parse_args(argv: list[str] | None = None) -> PushArguments:
    """The options of `trl-tip push`, the run folder given first or as `--output_dir`; argparse's errors exit."""
    parser = make_parser()
    if argv is None:
        import sys

        argv = sys.argv[1:]
    argv = explicit_bool_flags(list(argv), ("--private",))
    args, positional = parser.parse_args_into_dataclasses(argv, return_remaining_strings=False)
    if positional.run_dir and args.output_dir and positional.run_dir != args.output_dir:
        parser.error(
            f"the run folder is given twice ({positional.run_dir!r} and --output_dir {args.output_dir!r}); "
            "give it once"
        )
    args.output_dir = positional.run_dir or args.output_dir
    if not args.output_dir:
        parser.error(
            "the run folder is required: trl-tip push OUTPUT_DIR --model-id NAME (or --output_dir OUTPUT_DIR)"
        )
    if args.retries < 0 or args.retry_wait < 0:
        parser.error("--retries and --retry-wait must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    import sys

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        result = push_run(
            args.output_dir,
            args.model_id,
            args.stats_id,
            private=args.private,
            revision=args.revision,
            attempts=args.retries + 1,
            wait=args.retry_wait,
        )
    except HubPushError as error:
        if debugging():
            raise
        raise usage_exit("push", error) from None
    except Exception as error:
        if debugging():
            raise
        sys.exit(
            f"trl-tip push: {type(error).__name__}: {error}\nThe run folder {args.output_dir} is intact; run the "
            "same command again to complete the push."
        )
    print(f"Pushed {result.model_url} and {result.stats_url}")
