"""dgr_fast.benchmarks (the runner behind ``dgr-fast bench``) and the scripts in benchmarks/: argument checks, the
scripts' ``--help``, and one end-to-end run of each script in its cheapest configuration (seconds; its figures mean
nothing) that must print the table and write the CSV and, with matplotlib, the plot."""

from __future__ import annotations

import csv
import functools
import importlib.util
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import dgr_fast.benchmarks as benchmarks
from dgr_fast.benchmarks import BENCHMARKS, benchmarks_dir, run_benchmarks

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# --threads: the scripts set torch's thread count for the whole process; keep this test process's own.
THREADS = ["--threads", str(torch.get_num_threads())]
# The cheapest run of each script: one small case, one repetition, the cheap providers.
TINY = {
    "dgr": ["--device", "cpu", "--shapes", "sweep N=1024 C=4", "--providers", "torch,cpp", "--max-reps", "1",
            "--min-time", "0", *THREADS],
    "adatask": ["--device", "cpu", "--parts", "synthetic", "--sizes", "0.0625", "--tasks", "2", "--reps", "1"],
    "step": ["--device", "cpu", "--quick", "--batch", "1", "--height", "8", "--width", "8", *THREADS],
    "distributed": ["--device", "cpu", "--steps", "1", "--methods", "ddp,pcgrad+dgr", *THREADS],
    "compile": ["--device", "cpu", "--quick", "--rows", "8", "--width", "16", "--backends", "torch", "--reps", "1",
                *THREADS],
}
# Per script and tiny run: the CSV file it writes (a glob: adatask stamps its file names with the time; the plot has
# the same name, .png), columns the CSV must have (the floor and ratio columns among them), and the table's header.
OUTPUTS = {
    "dgr": ("dgr_cpu.csv", ["floor_ms", "of_floor", "speedup_vs_torch"], "| shape | provider | ms | floor_ms | of_floor |"),
    "adatask": ("adatask_step_cpu_*.csv", ["floor_ms", "x_floor", "speedup_vs_loop"], "x floor  x inpl  vs loop"),
    "step": ("step_cpu.csv", ["ms", "overhead_pct"], "ms/step  overhead"),
    "distributed": ("distributed_cpu.csv", ["step_ms_1", "step_ms_2", "bytes_vs_ddp"], "bytes/step x DDP bytes"),
    "compile": ("compile_cpu.csv", ["eager_ms", "compiled_ms", "speedup"], "eager ms  compiled ms  speedup"),
}


@functools.cache
def script(name: str) -> ModuleType:
    """benchmarks/bench_<name>.py, imported as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", benchmarks_dir() / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their class's module up there
    spec.loader.exec_module(module)
    return module


def test_bad_benchmark_name_lists_the_choices(capfd):
    with pytest.raises(ValueError, match="dgr, adatask, step, distributed, compile or all"):
        run_benchmarks("dgr_penalty")
    assert capfd.readouterr().out == ""  # raised before any script started


def test_bad_device_lists_the_choices():
    with pytest.raises(ValueError, match="cpu, cuda"):
        run_benchmarks("dgr", device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ValueError, match="no CUDA device"):
        run_benchmarks("all", device="cuda")


def test_benchmarks_dir_is_the_checkouts_folder():
    folder = benchmarks_dir()
    assert folder == Path(__file__).resolve().parent.parent / "benchmarks"
    assert {p.name for p in folder.glob("bench_*.py")} >= {f"bench_{name}.py" for name in BENCHMARKS}


def test_installed_package_without_the_scripts_says_where_they_are(tmp_path, monkeypatch):
    # What a non-editable install looks like: the package in site-packages, no benchmarks/ next to it.
    monkeypatch.setattr(benchmarks, "__file__", str(tmp_path / "site-packages" / "dgr_fast" / "benchmarks.py"))
    with pytest.raises(FileNotFoundError, match="source checkout.*pip install -e"):
        benchmarks_dir()
    with pytest.raises(FileNotFoundError):
        run_benchmarks("step")


def test_runner_runs_each_script_in_a_child_and_returns_the_first_failure(monkeypatch, capfd):
    # The scripts themselves are replaced by exit statuses here: this checks the order, the arguments and the
    # status; test_runner_end_to_end runs a real one.
    calls, statuses = [], iter([0, 3, -signal.SIGKILL, 0, 0])

    def fake_run(command: list[str]) -> subprocess.CompletedProcess:
        calls.append(command)
        return subprocess.CompletedProcess(command, next(statuses))

    monkeypatch.setattr(benchmarks.subprocess, "run", fake_run)
    assert run_benchmarks("all", quick=True, device="cpu", out="some/dir", extra=["--reps", "1"]) == 3
    assert [Path(c[1]).name for c in calls] == ["bench_dgr.py", "bench_adatask.py", "bench_step.py",
                                                "bench_distributed.py", "bench_compile.py"]
    assert all(c[0] == sys.executable and c[2:] == ["--quick", "--device", "cpu", "--out", "some/dir", "--reps", "1"]
               for c in calls)
    out = capfd.readouterr().out
    assert out.index("=== benchmark dgr: ") < out.index("=== benchmark adatask: ") < out.index("=== benchmark step: ")
    assert "benchmark adatask failed (exit status 3)" in out
    assert f"benchmark step failed (exit status {128 + signal.SIGKILL})" in out


def test_plot_without_matplotlib_prints_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail, as when it is not installed
    benchmarks.bar_plot(tmp_path / "x.png", [{"case": "a", "provider": "cpp", "ms": 1.0}], lambda r: r["case"],
                        "provider", "ms", "ms")
    assert "matplotlib is not installed: no plot" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", BENCHMARKS)
def test_script_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        script(name).main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(option in out for option in ("--quick", "--device", "--out"))


def check_outputs(name: str, out_dir: Path, printed: str) -> None:
    """The table was printed, and the CSV (with the floor and ratio columns) and the plot are in ``out_dir``."""
    pattern, columns, header = OUTPUTS[name]
    assert header in printed
    (path,) = out_dir.glob(pattern)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(columns) <= set(rows[0])
    assert path.with_suffix(".png").is_file() == HAS_MATPLOTLIB
    if not HAS_MATPLOTLIB:
        assert "matplotlib is not installed: no plot" in printed


@pytest.mark.parametrize("name", BENCHMARKS)
def test_script_end_to_end_in_process(name, tmp_path, capsys):
    script(name).main([*TINY[name], "--out", str(tmp_path)])
    check_outputs(name, tmp_path, capsys.readouterr().out)


def test_runner_end_to_end(tmp_path, capfd):
    # One real child process (the cheapest script): its output reaches the caller's stdout after the header.
    assert run_benchmarks("step", device="cpu", out=str(tmp_path), extra=TINY["step"][2:]) == 0
    out = capfd.readouterr().out
    assert out.startswith("=== benchmark step: ")
    check_outputs("step", tmp_path, out)



def test_dgr_module_heads_rows(tmp_path, capsys):
    script("dgr").main(["--device", "cpu", "--module-heads", "mlp,deeplab", "--quick", "--min-time", "0",
                        "--max-reps", "1", *THREADS, "--out", str(tmp_path)])
    assert "| shape | provider | ms | fd_over_this | generic_over_this | penalty | grad_rel_err |" in capsys.readouterr().out
    with open(tmp_path / "dgr_heads_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["shape"].split()[0], r["provider"]) for r in rows} == {
        ("mlp", "closed"), ("mlp", "gemms"), ("mlp", "generic"), ("mlp", "fd"), ("mlp", "linear"),
        ("deeplab", "exact"), ("deeplab", "generic"), ("deeplab", "fd"), ("deeplab", "linear")}
    assert all(float(r["ms"]) > 0 for r in rows)
    assert all(float(r["penalty"]) > 0 for r in rows if r["provider"] != "gemms")  # gemms: products, no penalty
    fd = [r for r in rows if r["provider"] == "fd"]
    assert all(float(r["fd_over_this"]) == 1.0 and float(r["grad_rel_err"]) >= 0 for r in fd)
    for heads, default in (("mlp", "closed"), ("deeplab", "exact")):  # the same penalty, another route
        mine, generic = (next(r for r in rows if r["shape"].startswith(heads) and r["provider"] == p)
                         for p in (default, "generic"))
        assert float(mine["penalty"]) == pytest.approx(float(generic["penalty"]), rel=1e-5)
