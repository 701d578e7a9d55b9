"""The README's examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_training_loop_example_runs():
    block = next(b for b in python_blocks() if "for step in range" in b and "DummyHeads" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert all(p.grad is not None for p in namespace["encoder"].parameters())


def test_training_api_example_runs():
    block = next(b for b in python_blocks() if "parse_spec" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert set(namespace["runs"]) == {"ew", "pcgrad+dgr=0.1"}
    assert namespace["runs"]["pcgrad+dgr=0.1"]["dgr_share"] is not None
