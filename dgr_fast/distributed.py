"""Synchronisation over ``torch.distributed``: what every training object of the library uses to stay exact and in
step on several processes.

Every object that takes ``process_group`` reads it the same way (``sync_for``):

- ``None`` (the default): the default process group, when ``torch.distributed`` is initialised and has more than one
  rank; otherwise no synchronisation (one process).
- a ``ProcessGroup``: that group (no synchronisation if it has one rank).
- ``"local"``: no synchronisation: each rank computes on its own data as a single process would (for a caller who
  reduces gradients itself; for the DGR penalty, the per-rank penalty).

The reductions average, as DDP does: with equal local batches the mean of per-rank mean losses is the mean loss of
the global batch, so a step on W ranks equals one process's step on the concatenated batch. Tensors travel as few
flat buffers as possible (one per dtype and device, cut into buckets of at most ``BUCKET_BYTES``), never one call per
parameter. With NCCL, CPU tensors go through the current CUDA device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

LOCAL = "local"
BUCKET_BYTES = 256 * 2**20  # bounds the temporary buffers of one collective call

__all__ = ["LOCAL", "Sync", "sync_for", "check_process_group", "all_reduce_mean_", "same_random_draws", "run_local"]


def check_process_group(process_group: object, name: str = "process_group") -> None:
    """Refuse anything but ``None``, ``"local"`` or a ``ProcessGroup``, naming the argument."""
    if process_group is None or process_group == LOCAL:
        return
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return
    raise TypeError(f"{name} must be None (the default group), {LOCAL!r} (no synchronisation) or a "
                    f"torch.distributed.ProcessGroup, got {process_group!r}")


@dataclass(frozen=True)
class Sync:
    """A process group with more than one rank, as the collectives below use it."""

    group: dist.ProcessGroup | None  # None: the default group
    world_size: int
    rank: int  # this process's rank in the group

    @property
    def device(self) -> torch.device | None:
        """The device collectives need (NCCL: the current CUDA device), or None where any tensor goes."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return None

    def _collect(self, tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        return groups

    def _run(self, tensors: Sequence[Tensor], op) -> None:
        """``op(buffer)`` on flat buffers holding ``tensors``, written back in place."""
        device = self.device
        for (dtype, where), group in self._collect([t for t in tensors if t.numel() > 0]).items():
            single = len(group) == 1 and group[0].is_contiguous() and (device is None or where == device)
            flat = group[0].view(-1) if single else torch.cat([t.reshape(-1) for t in group]).to(device or where)
            step = max(1, BUCKET_BYTES // flat.element_size())
            for start in range(0, flat.numel(), step):
                op(flat[start : start + step])
            if not single:
                offset = 0
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum every tensor over the ranks, in place."""
        self._run(tensors, lambda buf: dist.all_reduce(buf, group=self.group))

    def all_reduce_mean_(self, tensors: Sequence[Tensor]) -> None:
        """Average every tensor over the ranks, in place (sum, then divide: the same bits on every rank)."""
        def op(buf: Tensor) -> None:
            dist.all_reduce(buf, group=self.group)
            buf.div_(self.world_size)

        self._run(tensors, op)

    def broadcast_(self, tensors: Sequence[Tensor]) -> None:
        """Every rank gets rank 0's values, in place."""
        self._run(tensors, lambda buf: dist.broadcast(buf, group=self.group, group_src=0))


def sync_for(process_group: object) -> Sync | None:
    """The synchronisation ``process_group`` asks for here (see the module docstring), or None for none."""
    check_process_group(process_group)
    if process_group == LOCAL:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError("process_group: a ProcessGroup was given but torch.distributed is not initialised")
        return None
    size = dist.get_world_size(process_group)
    if size == 1:
        return None
    rank = dist.get_rank(process_group)
    if rank < 0:
        raise RuntimeError("process_group: this process is not a member of the given group")
    return Sync(process_group, size, rank)


def all_reduce_mean_(*tensors: Tensor, process_group: object = None) -> None:
    """Average ``tensors`` over the ranks in place (one flat buffer per dtype and device); a no-op on one process.

    The recipe for per-task gradients computed outside the library's steps::

        G = per_task_grads(losses, params)   # [K, P], this rank's
        all_reduce_mean_(G)                   # now the global batch's, the same bits on every rank
    """
    sync = sync_for(process_group)
    if sync is not None:
        sync.all_reduce_mean_(list(tensors))


@contextlib.contextmanager
def same_random_draws(sync: Sync | None, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> Iterator[None]:
    """Within the block, random draws are rank 0's on every rank: from ``generator``, or (None) from the global CPU
    generator and, for a CUDA ``device``, that device's. Rank 0's generator state is broadcast first; rank 0's own
    stream advances as it would in one process, and every other rank gets its own state back on exit, so its stream
    (data augmentation, dropout) is untouched."""
    if sync is None:
        yield
        return
    if generator is not None:
        access = [(generator.get_state, generator.set_state)]
    else:
        access = [(torch.get_rng_state, torch.set_rng_state)]
        where = None if device is None else torch.device(device)
        if where is not None and where.type == "cuda":
            index = where.index if where.index is not None else torch.cuda.current_device()
            access.append((lambda: torch.cuda.get_rng_state(index), lambda s: torch.cuda.set_rng_state(s, index)))
    own = [get() for get, _ in access]
    shared = [state.clone() for state in own]
    sync.broadcast_(shared)
    if sync.rank != 0:
        for (_, put), state in zip(access, shared):
            put(state)
    try:
        yield
    finally:
        if sync.rank != 0:
            for (_, put), state in zip(access, own):
                put(state)


def _local_rank(rank: int, world: int, port: int, backend: str, threads: int, fn, args: tuple, results) -> None:
    import datetime
    import os
    import traceback

    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
        try:
            results.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001  (every failure goes back to the caller, with its traceback)
        results.put((rank, "error", traceback.format_exc()))


def run_local(fn, *args, world: int = 2, backend: str = "gloo", threads: int = 1, timeout: float = 600.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` fresh processes of this machine joined in a default group on
    127.0.0.1 (a free port; NCCL: one GPU per rank), as tests and benchmarks need it: the results in rank order, or
    an error carrying the failing rank's traceback. It never hangs: a rank that dies, or a run past ``timeout``
    seconds, raises, and every process is ended. ``fn`` must be importable by name (defined at a module's top
    level), since the processes are spawned."""
    import queue
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_local_rank, args=(rank, world, port, backend, threads, fn, args, results),
                         daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"run_local: no result after {timeout:.0f} s from ranks "
                                   f"{sorted(set(range(world)) - set(got))}")
            try:
                rank, status, value = results.get(timeout=min(left, 2.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in got]
                if dead:
                    raise RuntimeError(f"run_local: rank(s) {dead} ended without a result (exit codes "
                                       f"{[procs[i].exitcode for i in dead]})") from None
                continue
            if status == "error":
                raise RuntimeError(f"run_local: rank {rank} failed:\n{value}")
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [got[rank] for rank in range(world)]
