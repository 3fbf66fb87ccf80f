"""One SimCLR gradient computation: plain, or with a gradient cache for batches larger than memory.

Gradient cache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): the contrastive loss couples every embedding in the batch, but its gradient with
respect to the parameters factors through the embeddings. So:

1. shuffle the 2B views, then embed them in chunks without autograd (no activations kept);
2. un-shuffle the embeddings, compute NT-Xent on all of them and its gradient ``g``;
3. recompute each chunk with autograd and backpropagate its rows of ``g``.

Without batch norm in training mode (or with it in eval mode) the parameter gradient equals the
full-batch one. With batch norm in training mode, batch statistics are per chunk - the one
difference from a full batch, and why the views are shuffled across chunks (MoCo's shuffle-BN):
unshuffled, with four or more chunks chunk ``k`` and chunk ``k + n/2`` would hold the two views of
the same patches, and the chunk's statistics would be a signature shared by positives, a shortcut
for the loss. Running statistics are updated once per chunk by the recompute pass (the first
pass's updates are undone). The RNG state of each chunk is replayed so dropout and stochastic depth
draw the same masks in both passes. Under DDP, gradients are all-reduced once, on the last chunk.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from simclr_path.losses import at_least_fp32


def _autocast(device: torch.device, amp):
    """Autocast to ``amp``: a dtype, True (bf16), or False/None (off)."""
    dtype = torch.bfloat16 if amp is True else amp
    return torch.autocast(device_type=device.type, dtype=dtype or torch.bfloat16, enabled=bool(amp))


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def loss_and_backward(model: nn.Module, views: torch.Tensor, loss_fn, use_amp, scaler=None) -> torch.Tensor:
    """Forward all 2B views at once, NT-Xent, backward. Returns the detached loss.

    ``use_amp``: the autocast dtype (True: bf16; False/None: fp32). ``scaler``: a
    ``torch.amp.GradScaler`` for fp16, which scales the loss before the backward pass.
    """
    with _autocast(views.device, use_amp):
        z = model(views)
    z0, z1 = at_least_fp32(z).chunk(2)
    loss = loss_fn(z0, z1)
    _backward(loss, scaler)
    return loss.detach()


def _bn_buffers(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    saved = []
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats and module.training:
            saved.append((module, {k: v.clone() for k, v in module.named_buffers(recurse=False)}))
    return saved


def _restore_bn(saved) -> None:
    for module, buffers in saved:
        for name, value in buffers.items():
            getattr(module, name).copy_(value)


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def shuffled_order(num_views: int, seed: int) -> torch.Tensor:
    """The order views are embedded in: a permutation drawn from ``seed`` (never the global RNG)."""
    return torch.randperm(num_views, generator=torch.Generator().manual_seed(seed))


def cached_loss_and_backward(model: nn.Module, views: torch.Tensor, loss_fn, use_amp,
                             chunk: int, shuffle_seed: int | None = 0, scaler=None) -> torch.Tensor:
    """Gradient-cache version of :func:`loss_and_backward` over chunks of ``chunk`` views.

    ``views`` is [first views; second views]. They are embedded in the order
    :func:`shuffled_order` gives for ``shuffle_seed`` (the training loop passes a seed that changes
    every step), or in their own order when it is None.
    """
    device = views.device
    order = None
    if shuffle_seed is not None:
        order = shuffled_order(views.shape[0], shuffle_seed)
        order = order.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else order
    pieces = (views if order is None else views[order]).split(chunk)
    rng_states, embeddings = [], []
    bn_saved = _bn_buffers(model)
    with torch.no_grad():
        for piece in pieces:
            rng_states.append(_rng_state(device))
            with _autocast(device, use_amp):
                embeddings.append(at_least_fp32(model(piece)))
    _restore_bn(bn_saved)  # running stats: only the recompute pass below updates them
    after_first_pass = _rng_state(device)

    z = torch.cat(embeddings).requires_grad_(True)  # in embedding order
    z_views = z if order is None else z[torch.argsort(order)]  # back to [first views; second views]
    z0, z1 = z_views.chunk(2)
    loss = loss_fn(z0, z1)
    _backward(loss, scaler)  # a scaled loss scales z.grad, so every chunk's parameter gradients
    grads = z.grad.split(chunk)

    no_sync = getattr(model, "no_sync", None)
    for i, (piece, grad) in enumerate(zip(pieces, grads)):
        last = i == len(pieces) - 1
        context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with context:
            _set_rng_state(rng_states[i], device)
            with _autocast(device, use_amp):
                out = at_least_fp32(model(piece))
            out.backward(grad)
    _set_rng_state(after_first_pass, device)
    return loss.detach()


def choose_chunk(model: nn.Module, image_size: int, views_per_rank: int, device: torch.device,
                 use_amp, memory_fraction: float = 0.7) -> int | None:
    """Largest chunk (in views) whose activations fit in ``memory_fraction`` of free GPU memory.

    Probes one forward+backward of 16 views to measure memory per view. Returns None when the
    whole batch fits (no cache needed) or on the CPU.
    """
    if device.type != "cuda":
        return None
    probe = 16
    bn_saved, rng = _bn_buffers(model), _rng_state(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.randn(probe, 3, image_size, image_size, device=device)
    with _autocast(device, use_amp):
        out = model(x).float()
    out.pow(2).mean().backward()
    per_view = (torch.cuda.max_memory_allocated(device) - base) / probe
    model.zero_grad(set_to_none=True)
    _restore_bn(bn_saved)
    _set_rng_state(rng, device)
    del x, out
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    chunk = max(1, int(free * memory_fraction / max(per_view, 1)))
    return None if chunk >= views_per_rank else chunk
