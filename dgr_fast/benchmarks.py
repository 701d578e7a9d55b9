"""Run the benchmark scripts of the source checkout (``dgr-fast bench``), and the output helpers they share.

The scripts live in the repository's ``benchmarks/`` folder, not in the package: ``bench_dgr.py`` (the DGR penalty
against its floor), ``bench_adatask.py`` (the AdaTask step against its byte floor, per-task gradients),
``bench_step.py`` (one training step per MTL method, with and without DGR) and ``bench_distributed.py`` (each
method's step at world size 1 and 2 over gloo or NCCL, and the bytes its collectives carry) and ``bench_compile.py`` (a
step with DGR, eager against torch.compile). Each is also a plain script with
``main(argv)``; they take ``--quick``, ``--device`` and ``--out`` alike, print a table, and write CSV files and a PNG
plot to ``--out``.

How they run: :func:`run_benchmarks` starts each script in a child process, ``[sys.executable, script, *argv]``,
rather than importing it and calling ``main``. A benchmark sets process-wide state (torch's thread count, glibc's
mmap threshold, a CUDA context) and ``bench_dgr.py`` reads its CPU peak memory off the process's resident set, so a
fresh process per script keeps one benchmark's allocator and caches out of the next one's figures and out of the
caller; a crash or an out-of-memory kill ends one benchmark, and its exit status says so.

``main(argv)`` also works in-process (the tests call it), so ``bench_dgr.py`` no longer re-executes itself to put
``MALLOC_MMAP_THRESHOLD_=65536`` in its environment (``os.execve`` would replace the calling process with the script).
``main`` makes the same setting with ``mallopt(M_MMAP_THRESHOLD, 65536)``, the call through which glibc applies that
variable, so large freed blocks go back to the system and the resident set follows live memory. A process that did
other work first (a caller's) may hold free heap pages that would take the measured allocations without a rise in the
resident set, so each CPU measurement first hands them back with ``malloc_trim(0)``. Fresh process or not, the
peak-memory column then reads as it did with the variable (checked against it on the ``--quick`` shapes: within a few
hundred KiB). In-process, the threshold stays set for the rest of the caller's life: it costs speed, not correctness.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

BENCHMARKS = ("dgr", "adatask", "step", "distributed", "compile")
DEVICES = ("cpu", "cuda")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
LIBC = ctypes.CDLL(None)  # the C library this process runs on: glibc's mallopt and malloc_trim, when it is glibc


def malloc_mode(measure_memory: bool) -> None:
    """Set glibc's allocator for a memory measurement or for a timing.

    Memory: blocks of 64 KiB and more are served with mmap, so freeing one returns it to the system and the resident
    set follows live memory (the same as ``MALLOC_MMAP_THRESHOLD_=65536``, applied in the running process). Timing:
    blocks of up to 32 MiB stay on the heap and freed memory is kept, which is where glibc's own dynamic threshold
    settles in a training loop once such a block has been freed; with the memory setting every large block would pay
    a fresh mmap and its page faults. A threshold the caller put in the environment is left alone for both.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    mmap_threshold, trim_threshold = (64 << 10, 128 << 10) if measure_memory else (32 << 20, 64 << 20)
    if not hasattr(LIBC, "mallopt") or LIBC.mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
        print("# warning: could not set glibc's mmap threshold (not glibc?): its default stays, and a peak-memory "
              "column may read low")
        return
    LIBC.mallopt(M_TRIM_THRESHOLD, trim_threshold)


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder, next to the ``dgr_fast`` package of a source checkout."""
    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    # Every script, not just the folder: a non-editable install puts the package in site-packages, where some
    # other distribution may have installed a top-level "benchmarks" package.
    if not all((folder / f"bench_{name}.py").is_file() for name in BENCHMARKS):
        raise FileNotFoundError(
            f"no benchmark scripts in {folder}: they ship with the source checkout, not the installed package; "
            "clone the repository and install it editable (git clone ... && pip install -e .), then run them from there")
    return folder


def run_benchmarks(which: str = "all", *, quick: bool = False, device: str | None = None, out: str | None = None,
                   extra: Sequence[str] = ()) -> int:
    """Run ``benchmarks/bench_<which>.py`` (``"all"``: every one, in the order of :data:`BENCHMARKS`), each in its own
    process with ``--quick``, ``--device``, ``--out`` and then ``extra`` as its arguments (with ``"all"``, ``extra`` goes
    to every script, so it should hold options they all take). Every chosen script runs, even after one fails.

    Returns 0, or the first non-zero exit status (128 + N for a script killed by signal N, as a shell reports it).
    Raises ValueError for an unknown ``which`` or ``device``, or ``device="cuda"`` where torch sees no CUDA device, and
    FileNotFoundError outside a source checkout (see :func:`benchmarks_dir`).
    """
    if which not in (*BENCHMARKS, "all"):
        raise ValueError(f"unknown benchmark {which!r}: choose one of {', '.join(BENCHMARKS)} or all")
    if device is not None and device not in DEVICES:
        raise ValueError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': torch sees no CUDA device here (use device 'cpu')")
    folder = benchmarks_dir()
    argv = ["--quick"] if quick else []
    if device is not None:
        argv += ["--device", device]
    if out is not None:
        argv += ["--out", os.fspath(out)]
    argv += extra
    status = 0
    for name in BENCHMARKS if which == "all" else (which,):
        command = [sys.executable, str(folder / f"bench_{name}.py"), *argv]
        print(f"=== benchmark {name}: {shlex.join(command)}", flush=True)  # flushed: the child writes to the same stream
        code = subprocess.run(command).returncode
        if code:
            code = code if code > 0 else 128 - code
            print(f"=== benchmark {name} failed (exit status {code})", flush=True)
            status = status or code
    return status


# Shared by the scripts in benchmarks/.


def bench_parser(doc: str, script: str, quick_help: str) -> argparse.ArgumentParser:
    """An argument parser for the script at path ``script`` (its ``__file__``) with ``doc`` as its help and the
    options every script takes: ``--quick``, ``--device`` and ``--out`` (default: ``out/`` next to the script)."""
    p = argparse.ArgumentParser(prog=Path(script).name, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=DEVICES,
                   help="default: cuda when available")
    p.add_argument("--out", default=str(Path(script).resolve().parent / "out"), metavar="DIR",
                   help="folder for the CSV files and the plot (default: %(default)s)")
    return p


def sync(device: str) -> None:
    """Wait for the device's queued work (a timing's end on a GPU; nothing to wait for on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: dict, device: str, reps: int) -> dict:
    """Median step time of each function, the functions taking turns step by step: a machine whose speed drifts
    (this VM's does, by up to 30% within minutes) then slows all of them alike, and their ratios stay meaningful."""
    for fn in fns.values():
        for _ in range(3):  # until glibc's mmap threshold has risen past the step's large blocks (no more page faults)
            fn()
    sync(device)
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(t) for key, t in times.items()}


def write_csv(path: str | os.PathLike, rows: Sequence[dict], fieldnames: Sequence[str] | None = None) -> None:
    """Write ``rows`` to ``path`` (columns: ``fieldnames``, default the first row's keys), creating its folder. Prints
    a note instead when there are no rows (every case skipped)."""
    if not rows:
        print("(no results: no CSV)")
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"# wrote {path}")


def bar_plot(path: str | os.PathLike, rows: Sequence[dict], group: Callable[[dict], str], series: str, value: str,
             ylabel: str, *, log: bool = False) -> None:
    """Grouped bars saved to ``path``: a group per distinct ``group(row)``, in it a bar of ``row[value]`` per distinct
    ``row[series]``. Prints a note instead when matplotlib is not installed or there is nothing to plot."""
    try:
        # The object-oriented API without pyplot: no GUI backend and no global figure state in an in-process caller.
        from matplotlib.figure import Figure
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    if not rows:
        print("(no results: no plot)")
        return
    groups = list(dict.fromkeys(group(r) for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    fig = Figure(figsize=(max(6, len(groups) * 0.9), 4))
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        vals = [next((r[value] for r in rows if group(r) == g and r[series] == name), 0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=str(name))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"# wrote {path}")
