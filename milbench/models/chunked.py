"""Chunked encoder passes: the gradient of a whole bag with the activation
memory of one chunk (Andersson et al., 2022).

The attention-MIL gradient factorises at the features H = encoder(X) (N × D):
the head and the loss need all of H at once, but every row of H depends on
one instance only. So

1. encode X chunk by chunk *without* autograd → H (only N × D floats stay);
2. make H a leaf that requires grad, run the head and the loss once and call
   ``backward`` → the head's parameter gradients and dL/dH in a single
   attention backward;
3. for each chunk, recompute its features *with* autograd and back-propagate
   its slice of dL/dH (``features.backward(dL/dH[chunk])``).

One refinement: the last chunk is encoded *with* autograd in step 1 and its
graph kept, so step 2 back-propagates through it directly and step 3 skips
it. Peak memory is unchanged (one chunk's graph is alive at any time) and a
bag that fits in one chunk costs exactly what abmil does.

The encoder's parameter gradients are then the sum over chunks of
``J_chunk^T dL/dH_chunk`` — exactly the whole-bag gradient, up to the order of
float additions. That needs an encoder whose output for an instance does not
depend on the other instances of the batch (no training-mode batch norm; see
:mod:`milbench.models.norms`) and a recomputation that sees the same random
numbers as the first pass (this module replays the RNG state for that).

Peak activation memory is one chunk's encoder graph plus O(N·D) for H, dL/dH
and the head — independent of N for the encoder, which is what dominates.
The cost is one extra encoder forward per bag minus one chunk's (≈ 4/3 of
abmil's compute for many chunks, 1 for a single chunk).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def chunk_slices(n: int, chunk_size: int) -> list[slice]:
    """Consecutive slices of at most ``chunk_size`` covering ``range(n)`` (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def encode_chunks(encoder: nn.Module, x: torch.Tensor, chunk_size: int, stop: int | None = None) -> torch.Tensor:
    """Encode ``x[:stop]`` (N, ...) chunk by chunk without autograd and return H (N, D).

    Only H outlives a chunk, so memory is one chunk's forward plus N × D
    (each chunk is written into a preallocated H, not concatenated at the
    end, which would hold H twice). ``x`` is only ever indexed one chunk at a
    time, so it may be a lazy stand-in (:class:`milbench.api.LazyInstances`)
    that reads the chunk from disk; ``stop`` limits the pass without slicing
    ``x`` as a whole.
    """
    n = int(x.shape[0]) if stop is None else int(stop)
    slices = chunk_slices(n, chunk_size)
    if not slices:
        raise ValueError("cannot encode an empty bag")
    with torch.no_grad():
        first = encoder(x[slices[0]])
        h = first.new_empty((n, *first.shape[1:]))
        h[slices[0]] = first
        del first
        for s in slices[1:]:
            h[s] = encoder(x[s])
    return h


class _RngState:
    """A snapshot of the CPU generator and, for a CUDA tensor, its device's generator.

    One snapshot before the no-grad pass is enough: the recomputation visits
    the chunks in the same order, so replaying from the snapshot gives every
    chunk the random numbers it saw the first time (as
    ``torch.utils.checkpoint`` does per segment), at constant memory.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)


@contextmanager
def _replayed_rng(start: _RngState) -> Iterator[None]:
    """Run the body from the ``start`` RNG state, then put back the state it found,
    so the recomputation neither changes nor depends on later random draws."""
    after = _RngState(start.device)
    start.restore()
    try:
        yield
    finally:
        after.restore()


def chunked_backward(
    encoder: nn.Module,
    head: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(head(encoder(x))[0])``
    with one chunk of encoder activations alive at a time.

    ``head(H)`` returns ``(logit, attention)`` and is run once, over all of H;
    ``loss_fn(logit)`` gives the scalar loss. Returns the detached
    ``(loss, logit, attention)``. Gradients are *added* to existing ``.grad``
    (the harness sums several bags before an optimizer step).
    """
    slices = chunk_slices(int(x.shape[0]), chunk_size)
    if not slices:
        raise ValueError("cannot back-propagate an empty bag")
    rng = _RngState(x.device)
    # All chunks but the last without autograd; the last one keeps its graph,
    # so the head's backward goes straight through it and it needs no
    # recomputation (a bag of at most one chunk costs exactly what abmil does).
    rest = encode_chunks(encoder, x, chunk_size, stop=slices[-1].start) if len(slices) > 1 else None
    last = encoder(x[slices[-1]])
    if rest is not None:
        rest.requires_grad_(True)
        h = torch.cat([rest, last], dim=0)
    else:
        h = last
    logit, a = head(h)
    loss = loss_fn(logit)
    loss.backward()  # head grads, the last chunk's encoder grads, and dL/dH of the rest: one attention backward
    del h, last
    trainable = any(p.requires_grad for p in encoder.parameters())
    if rest is None or rest.grad is None or not trainable:  # one chunk, or nothing in the encoder to train
        return loss.detach(), logit.detach(), a.detach()
    grad_rest = rest.grad
    del rest
    with _replayed_rng(rng):
        for s in slices[:-1]:
            encoder(x[s]).backward(grad_rest[s])
    return loss.detach(), logit.detach(), a.detach()


def random_layers(module: nn.Module) -> list[str]:
    """Names of sub-modules that draw random numbers in training mode (dropout
    with p > 0, stochastic depth). Chunking them is still a correct gradient
    of the chunked forward (the RNG is replayed), but their random masks are
    laid out per chunk, so the result no longer equals a whole-bag pass."""
    names = []
    for name, m in module.named_modules():
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
        if p and p > 0:
            names.append(name)
    return names
