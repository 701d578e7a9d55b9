"""Per-task gradients of shared parameters (docs/DESIGN.md section 8), reused by AdaTask, the aggregators and task-SAM."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dgr_fast.distributed import Sync, check_process_group, sync_for

MODES: tuple[str, ...] = ("loop", "batched")


def _check_losses(losses: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(losses, torch.Tensor):
        if losses.dim() != 1:
            raise ValueError(f"losses: a tensor of losses must be 1-D [num_tasks], got shape {list(losses.shape)}")
        out = list(losses.unbind())
    else:
        out = list(losses)
        for i, loss in enumerate(out):
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"losses[{i}] must be a tensor, got {type(loss).__name__}")
            if loss.numel() != 1:
                raise ValueError(f"losses[{i}] must be a scalar, got shape {list(loss.shape)}")
    if not out:
        raise ValueError("losses is empty")
    return [loss.reshape(()) for loss in out]


def _check_params(params: Sequence[torch.Tensor], name: str) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of tensors, got a single tensor")
    out = list(params)
    for i, p in enumerate(out):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"{name}[{i}] does not require grad")
    return out


def _out_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    dtypes = {p.dtype for p in params}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _per_task_grads(
    losses: list[torch.Tensor],
    params: list[torch.Tensor],
    features: torch.Tensor | None,
    mode: str,
    retain_graph: bool,
    chunk_size: int | None,
    extra_params: list[torch.Tensor],
    sync: Sync | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``per_task_grads`` plus, in the same backward passes, the gradient of ``sum(losses)`` w.r.t. ``extra_params``
    (AdaTask's task-specific parameters). Arguments are checked by the caller except ``features``/``mode``.
    With ``sync``, both are averaged over its ranks, as one buffer where their dtypes agree."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if not params:
        raise ValueError("params is empty")
    K = len(losses)
    sizes = [p.numel() for p in params]
    device = params[0].device
    for i, p in enumerate(params):
        if p.device != device:
            raise ValueError(f"params[{i}] is on {p.device}, params[0] on {device}")
    dtype = _out_dtype(params)
    # One buffer for the per-task rows and the extra parameters' gradients: a single all-reduce, no copy.
    together = all(p.dtype == dtype and p.device == device for p in extra_params)
    extra_size = sum(p.numel() for p in extra_params) if together else 0
    flat = torch.empty(K * sum(sizes) + extra_size, dtype=dtype, device=device)
    out = flat[: K * sum(sizes)].view(K, sum(sizes))
    if together:
        extra_sum = [piece.view_as(p) for piece, p in zip(flat[K * sum(sizes) :].split([p.numel() for p in extra_params]),
                                                            extra_params)]
        flat[K * sum(sizes) :].zero_()
    else:
        extra_sum = [torch.zeros_like(p) for p in extra_params]

    def finish() -> tuple[torch.Tensor, list[torch.Tensor]]:
        if sync is not None:
            sync.all_reduce_mean_([flat] if together else [out, *extra_sum])
        return out, extra_sum

    def write(k: int, grads: Sequence[torch.Tensor | None]) -> None:
        for piece, g in zip(out[k].split(sizes), grads):
            if g is None:  # the parameter does not reach this loss: its gradient is zero, as autograd's would be
                piece.zero_()
            else:  # a sparse gradient (an nn.Embedding(sparse=True)) becomes its dense row
                piece.copy_((g.to_dense() if g.is_sparse else g).reshape(-1))

    if mode == "loop":
        inputs = params + extra_params
        for k, loss in enumerate(losses):
            if not loss.requires_grad:
                out[k].zero_()
                continue
            keep = retain_graph or any(later.requires_grad for later in losses[k + 1 :])
            grads = torch.autograd.grad(loss, inputs, retain_graph=keep, allow_unused=True)
            write(k, grads[: len(params)])
            for acc, g in zip(extra_sum, grads[len(params) :]):
                if g is not None:
                    acc.add_(g.to_dense() if g.is_sparse else g)
        return finish()

    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a tensor when mode='batched', got {type(features).__name__}")
    if features.grad_fn is None:
        raise ValueError("features must be computed from params (mode='batched'), but it "
                         + ("is a leaf tensor" if features.requires_grad else "does not require grad"))
    # A loss that reaches params other than through features (a weight penalty on the encoder, a head that reads an
    # earlier layer) has a gradient the batched product cannot give: it takes a backward pass of its own, as in "loop".
    direct = _reaches_around(losses, features, params)
    batched = [k for k, loss in enumerate(losses) if loss.requires_grad and not direct[k]]
    # dL_k/dfeatures for every task: small backward passes through the heads only (the extra parameters ride along).
    dz = torch.empty(len(batched), *features.shape, dtype=features.dtype, device=features.device)
    for k, loss in enumerate(losses):
        if not loss.requires_grad:
            out[k].zero_()
            continue
        inputs = (params if direct[k] else [features]) + extra_params
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        if direct[k]:
            write(k, grads[: len(params)])
        else:
            row = batched.index(k)
            dz[row] = 0 if grads[0] is None else grads[0]
        for acc, g in zip(extra_sum, grads[len(inputs) - len(extra_params) :]):
            if g is not None:
                acc.add_(g.to_dense() if g.is_sparse else g)
    step = max(len(batched), 1) if chunk_size is None else chunk_size
    for start in range(0, len(batched), step):
        rows = batched[start : start + step]
        last = start + step >= len(batched)
        try:
            grads = torch.autograd.grad(
                features,
                params,
                grad_outputs=dz[start : start + len(rows)],
                retain_graph=retain_graph or not last,
                is_grads_batched=True,
                allow_unused=True,
            )
        except NotImplementedError as err:
            if "Sparse" not in str(err):
                raise
            raise ValueError("mode='batched': torch's batched vector-Jacobian product cannot reach a parameter with "
                             "sparse gradients (nn.Embedding(sparse=True)); use mode='loop'") from None
        index = torch.tensor(rows, device=device)
        for piece, g in zip(out.split(sizes, dim=1), grads):
            piece.index_copy_(0, index, torch.zeros_like(piece[: len(rows)]) if g is None
                              else (g.to_dense() if g.is_sparse else g).reshape(len(rows), -1).to(piece.dtype))
    return finish()


def _reaches_around(losses: list[torch.Tensor], features: torch.Tensor, params: list[torch.Tensor]) -> list[bool]:
    """Per loss: whether its graph reaches one of ``params`` by a path that does not pass through ``features``.

    One walk over the graph above ``features`` for all losses (nodes are visited once); it stops at ``features``'
    node, so for heads that read only ``features`` it sees the heads' small graphs alone."""
    leaf_ids = {id(p) for p in params if p.grad_fn is None}
    node_ids = {id(p.grad_fn) for p in params if p.grad_fn is not None}
    stop = features.grad_fn
    reaches: dict[int, bool] = {}
    keep = []  # the nodes whose ids are keys of `reaches`, alive until the walk ends

    def walk(root) -> bool:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            key = id(node)
            if key in reaches and not expanded:
                continue
            if node is stop:
                reaches[key] = False
                continue
            if id(getattr(node, "variable", None)) in leaf_ids or key in node_ids:
                reaches[key] = True
                keep.append(node)
                continue
            children = [child for child, _ in node.next_functions if child is not None]
            if expanded:
                reaches[key] = any(reaches[id(child)] for child in children)
                keep.append(node)
            else:
                reaches.setdefault(key, False)  # a placeholder: the graph is a DAG, so no cycle reads it
                stack.append((node, True))
                stack.extend((child, False) for child in children if id(child) not in reaches)
        return reaches[id(root)]

    return [loss.grad_fn is not None and walk(loss.grad_fn) for loss in losses]


def per_task_grads(
    losses: Sequence[torch.Tensor] | torch.Tensor,
    params: Sequence[torch.Tensor],
    features: torch.Tensor | None = None,
    mode: str = "loop",
    retain_graph: bool = False,
    chunk_size: int | None = None,
    process_group: object = "local",
) -> torch.Tensor:
    """Gradient of every task's loss w.r.t. ``params``, as one ``[K, P]`` tensor.

    Args:
        losses: K scalar losses (a sequence, or a ``[K]`` tensor) sharing one autograd graph.
        params: tensors that require grad; P = their total number of elements. Row k of the result is
            ``cat([dL_k/dp.flatten() for p in params])``; a parameter a loss does not reach gets zeros.
        features: ``mode="batched"`` only: the tensor every task's head reads (e.g. ``[B, D]`` or ``[B, C, H, W]``).
            A loss that also reaches ``params`` another way (a weight penalty on them, a head reading an earlier
            layer) is found by a walk over the graph above ``features`` and gets a backward pass of its own, so the
            result always equals ``mode="loop"``'s.
        mode: ``"loop"``: K backward passes (what the AdaTask authors' code does). ``"batched"``: K small passes from
            each loss to ``features``, then one batched vector-Jacobian product through the encoder with the K
            stacked ``dL_k/dfeatures`` (``torch.autograd.grad(..., is_grads_batched=True)``).
        retain_graph: keep the graph after the last pass (to call backward again).
        chunk_size: ``mode="batched"``: at most this many tasks per batched pass, to bound memory.
        process_group: ``"local"`` (default): this rank's gradients. ``None`` (the default group) or a group:
            averaged over the ranks (one all-reduce of the ``[K, P]`` buffer), the global batch's gradients on every
            rank, as the library's training steps use them (``dgr_fast.distributed``).

    Returns:
        ``[K, P]``, the dtype of ``params`` (fp32 if they differ), on their device.
    """
    loss_list = _check_losses(losses)
    param_list = _check_params(params, "params")
    check_process_group(process_group)
    out, _ = _per_task_grads(loss_list, param_list, features, mode, retain_graph, chunk_size, [],
                             sync_for(process_group))
    return out
