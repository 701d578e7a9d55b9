"""Backends and how an op picks one (docs/DESIGN.md, backends and dispatch).

Backends, fastest first: ``cuda`` (C++/CUDA extension), ``triton``, ``cpp`` (C++ CPU extension), ``torch`` (closed
form in plain PyTorch ops), ``reference`` (autograd, the ground truth).

- Every op takes ``backend=None | "<name>"``; ``DGR_FAST_BACKEND`` sets the default.
- ``None`` picks the fastest backend that implements the op and supports the inputs. An automatic choice whose
  extension fails to import falls back to the next one, with one warning that names the cause.
- A backend asked for by name (argument or environment) that cannot run raises ``RuntimeError`` saying why;
  it never silently falls back.
- Under ``torch.compile`` the choice is made while tracing, with no graph break: ``backend_status`` (which imports the
  extensions) and an op's probe run as constants (``torch.compiler.assume_constant_result``), the environment
  variable is read in traced code (dynamo guards on it: changing it recompiles), and the rest is plain Python.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpp", "torch", "reference")
ENV_VAR = "DGR_FAST_BACKEND"


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend works in this process, and if not, why."""

    name: str
    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


@functools.cache
def _import_extension(module: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(module), "built"
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{module} could not be imported: {exc}"


@functools.cache
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    return True, f"triton {triton.__version__}"


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# A constant of the process for torch.compile: importing an extension (importlib) cannot be traced.
@torch.compiler.assume_constant_result
def backend_status(name: str) -> BackendStatus:
    """Availability of one backend in this process, independent of any op or input."""
    if name == "cuda":
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "no CUDA device visible to torch")
        ext, why = _import_extension("dgr_fast._C_cuda")
        return BackendStatus(name, ext is not None, why)
    if name == "triton":
        ok, why = _triton_status()
        if not ok:
            return BackendStatus(name, False, why)
        if torch.cuda.is_available():
            return BackendStatus(name, True, why + " on CUDA")
        if triton_interpreting():
            return BackendStatus(name, True, why + " in the CPU interpreter (TRITON_INTERPRET=1): slow, for testing")
        return BackendStatus(name, False, "no CUDA device, and TRITON_INTERPRET=1 is not set")
    if name == "cpp":
        ext, why = _import_extension("dgr_fast._C")
        return BackendStatus(name, ext is not None, why)
    if name in ("torch", "reference"):
        return BackendStatus(name, True, "plain PyTorch")
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def available_backends() -> dict[str, BackendStatus]:
    """Every backend, in dispatch order, with whether it works here and why not."""
    return {name: backend_status(name) for name in BACKENDS}


_warned: set[tuple[str, str, str]] = set()


def _device_supports(name: str, device: torch.device) -> bool:
    if name == "cuda":
        return device.type == "cuda"
    if name == "cpp":
        return device.type == "cpu"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    return True


def _unavailable(name: str, probe: Callable[[str], str | None]) -> str | None:
    status = backend_status(name)
    return probe(name) if status.available else status.reason


def resolve_backend(
    op: str,
    requested: str | None,
    device: torch.device,
    dtype: torch.dtype,
    implemented: Sequence[str],
    dtypes: dict[str, Iterable[torch.dtype]],
    probe: Callable[[str], str | None] = lambda name: None,
) -> str:
    """Pick the backend that runs ``op`` on inputs of ``device``/``dtype``.

    ``implemented`` lists the backends that have the op, fastest first; ``dtypes[name]`` the input dtypes a backend
    takes (absent: all floating types); ``probe(name)`` says why an available backend still lacks this op's kernels
    (an extension built from older sources, say), or None.
    """
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    else:
        source = "backend="
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"{source}: backend must be one of {BACKENDS} or None, got {requested!r}")
        if requested not in implemented:
            raise RuntimeError(f"{op}: backend {requested!r} ({source}) does not implement this op; it has {tuple(implemented)}")
        reason = _unavailable(requested, probe)
        if reason:
            raise RuntimeError(f"{op}: backend {requested!r} ({source}) cannot run here: {reason}")
        if not _device_supports(requested, device):
            raise RuntimeError(f"{op}: backend {requested!r} ({source}) does not run on {device.type} tensors")
        if requested in dtypes and dtype not in tuple(dtypes[requested]):
            raise RuntimeError(f"{op}: backend {requested!r} ({source}) does not take {dtype}; it takes {tuple(dtypes[requested])}")
        return requested
    for name in implemented:
        if name == "reference":
            continue  # the ground truth is only used when asked for
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests, never an automatic choice
        if not _device_supports(name, device) or (name in dtypes and dtype not in tuple(dtypes[name])):
            continue
        reason = _unavailable(name, probe)
        if not reason:
            return name
        if (op, name, reason) not in _warned:
            _warned.add((op, name, reason))
            warnings.warn(f"dgr_fast {op}: backend {name!r} is unavailable ({reason}); falling back", RuntimeWarning, stacklevel=3)
    raise RuntimeError(f"{op}: no backend supports {dtype} tensors on {device}")
