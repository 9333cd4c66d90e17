"""The `Example:` blocks of the public docstrings run as written, so they cannot rot.

Each ```python block is split into `>>>` statements (doctest's parser); a statement followed by an expected output is
evaluated and its `repr` compared with it, the others are executed. The blocks run in a temporary working directory, so
the output folders they name land there.
"""

import doctest
import inspect
import re

import pytest

from trl_tip import TIPConfig, TIPGKDTrainer


PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
DOCUMENTED = {"TIPConfig": TIPConfig, "TIPGKDTrainer": TIPGKDTrainer}


def python_blocks(obj) -> list[str]:
    return PYTHON_BLOCK.findall(inspect.getdoc(obj) or "")


def run_block(block: str, namespace: dict, name: str) -> None:
    examples = doctest.DocTestParser().get_examples(block, name)
    if not examples:  # a plain code block, without prompts
        exec(compile(block, f"<{name} example>", "exec"), namespace)
        return
    for example in examples:
        where = f"<{name} example, line {example.lineno + 1}>"
        if example.want:
            value = eval(compile(example.source, where, "eval"), namespace)
            assert repr(value) == example.want.strip(), f"{where}: {example.source.strip()}"
        else:
            exec(compile(example.source, where, "exec"), namespace)


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_docstring_example_runs(name, tmp_path, monkeypatch):
    blocks = python_blocks(DOCUMENTED[name])
    assert blocks, f"{name}'s docstring has no ```python example"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"{name}_example"}
    for block in blocks:
        run_block(block, namespace, name)
