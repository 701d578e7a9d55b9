"""Start-up of the package and the command: ``import dgr_fast`` imports no torch (its names load on first use), so
that Ctrl-C during the slow ``import torch`` of ``dgr-fast`` start-up is one line and exit 130, not a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import dgr_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["train", "--dataset", "synthetic", "--epochs", "50", "--no-plot"]


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_the_package_and_the_command_import_no_torch():
    proc = python("""
        import sys
        import dgr_fast, dgr_fast.cli
        assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
        from dgr_fast import AdaTask, DummyHeads, dgr_penalty  # these load it
        assert "torch" in sys.modules
        print(AdaTask.__name__, DummyHeads.__name__, dgr_penalty.__name__)
    """)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out == "AdaTask DummyHeads dgr_penalty\n"


def test_every_public_name_resolves():
    assert all(getattr(dgr_fast, name) is not None for name in dgr_fast.__all__)
    assert set(dgr_fast.__all__) <= set(dir(dgr_fast))
    namespace: dict = {}
    exec("from dgr_fast import *", namespace)
    assert set(dgr_fast.__all__) <= set(namespace)
    try:
        dgr_fast.no_such_name
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("an unknown attribute of dgr_fast did not raise AttributeError")


# A child that runs `python -m dgr_fast ARGS` with a finder consulted on the first `import torch`: it either raises
# KeyboardInterrupt there (what Ctrl-C during that import does) or says on stdout that the import has started.
CHILD = """
    import runpy, sys
    mode = sys.argv[1]
    class Torch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                if mode == "raise":
                    raise KeyboardInterrupt
                print("importing torch", flush=True)
            return None
    sys.meta_path.insert(0, Torch())
    sys.argv = ["dgr-fast", *sys.argv[2:]]
    runpy.run_module("dgr_fast", run_name="__main__", alter_sys=True)
"""


def test_an_interrupt_inside_import_torch_is_one_line_and_exit_130(tmp_path):
    proc = python(CHILD, "raise", *TRAIN, "--out", str(tmp_path))
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, err) == (130, "dgr-fast train: interrupted\n")


def test_ctrl_c_while_torch_is_being_imported(tmp_path):
    """A real SIGINT, sent as soon as the child starts importing torch (which takes a second or more): whichever
    phase it lands in, one line and exit 130."""
    proc = python(CHILD, "announce", *TRAIN, "--out", str(tmp_path))
    try:
        assert proc.stdout.readline() == "importing torch\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, "dgr-fast train: interrupted\n")
