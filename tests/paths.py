"""Where the test suite's files are, for tests in any subfolder."""

from pathlib import Path


TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DATA = TESTS / "data"
