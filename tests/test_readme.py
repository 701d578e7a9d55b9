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


def test_every_markdown_file_the_repository_cites_is_in_it():
    """Code, tests, benchmarks and docs cite design notes by path: each must exist in the repository (a bare
    file name is looked up at the top level and in docs/)."""
    root = README.parent
    sources = [p for folder in ("dgr_fast", "tests", "benchmarks", "csrc", "docs", "scripts") for p in
               (root / folder).rglob("*") if p.suffix in (".py", ".md", ".cpp", ".cu", ".h", ".sh")]
    missing = []
    for path in [*sources, README]:
        for cited in re.findall(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Za-z][\w-]*\.md)\b", path.read_text()):
            where = [root / cited] if "/" in cited else [root / cited, root / "docs" / cited]
            if not any(w.is_file() for w in where) and not (path.parent / cited).is_file():
                missing.append(f"{path.relative_to(root)}: {cited}")
    assert not missing, "cited files that are not in the repository:\n" + "\n".join(missing)
