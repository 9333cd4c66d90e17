"""How every `trl-tip` command reports an error it detects itself: one line, `trl-tip <command>: <message>`, exit
status 2 (argparse's status for a usage error), no traceback; `trl-tip --debug <command> ...` (or `TRL_TIP_DEBUG=1`)
shows the traceback instead. Failures after the work started (a Hub push that failed after its retries) keep status 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator


DEBUG_ENV = "TRL_TIP_DEBUG"
USAGE_STATUS = 2


class UsageExit(SystemExit):
    """A command refused its input: `code` is the one-line message `trl-tip <command>: <message>` (as with
    `sys.exit(message)`, so callers of a command's `main` read it from the exception); run as a program, the
    message goes to stderr and the status is 2 (`exit_with_usage_status`)."""


def debugging() -> bool:
    """Whether errors should show their traceback (`trl-tip --debug ...` sets `TRL_TIP_DEBUG=1`)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (an `OSError` or `KeyError` keeps its own wording)."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(error).__name__


def usage_exit(command: str, error: BaseException | str) -> UsageExit:
    message = error if isinstance(error, str) else one_line(error)
    return UsageExit(f"trl-tip {command}: {message}")


@contextlib.contextmanager
def usage_errors(command: str, *errors: type[BaseException]) -> Iterator[None]:
    """Turns the `errors` raised inside into `UsageExit("trl-tip <command>: <message>")`, unless debugging."""
    try:
        yield
    except UsageExit:
        raise
    except errors as error:
        if debugging():
            raise
        raise usage_exit(command, error) from None


def check_config_file(argv: list[str], option: str = "--config") -> None:
    """Raises FileNotFoundError naming the file when `--config FILE` (or `--config=FILE`) names no file."""
    for i, arg in enumerate(argv):
        if arg == option:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"{option} needs a file: {option} RECIPE.yaml.")
            path = argv[i + 1]
        elif arg.startswith(option + "="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if not os.path.isfile(path):
            kind = "a folder, not a file" if os.path.isdir(path) else "no such file"
            raise FileNotFoundError(f"{option} {path!r}: {kind}. Give the path of a YAML recipe.")


def explicit_bool_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """`argv` with `true` after each bare boolean `flags` entry (e.g. `--private`) followed by a word that is no
    boolean: `HfArgumentParser` lets a boolean flag take an optional value, so `--private RUN` would read the folder
    RUN as the flag's value."""
    literals = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in flags and following is not None and not following.startswith("-"):
            if following.lower() not in literals:
                out.append("true")
    return out


def exit_with_usage_status(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Runs a command's `main` as a program: a `UsageExit` prints its message to stderr and exits with status 2."""
    try:
        main(argv)
    except UsageExit as error:
        print(error.code, file=sys.stderr)
        sys.exit(USAGE_STATUS)
