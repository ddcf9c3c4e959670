"""Gradient checkpointing that keeps each decoder layer's input in pinned host memory.

`offloaded_checkpoint(function, hidden_states)` runs `function` without saving activations and
copies `hidden_states` to a pinned host buffer on a side stream. The backward copies it back
(the copy for the layer after it in the backward order is already in flight: double buffering),
recomputes the layer with gradients and backpropagates through it. The device then holds, per
layer, nothing but what the running layer needs.

While the backward recomputes a layer, `recomputing(module)` is True for the module the
checkpointed function calls: its output then only carries the gradient, so a forward may skip
computing values nobody reads (the patched Llama layer skips its MLP's down projection).
`checkpoint_memo()` is a dict that a checkpoint's forward and its recompute share, and
`memoized(key, make)` reads it: what a function derives there from the parameters alone (the
LoRA Functions' compute-dtype copies of the adapters) is made once per layer and step.

Pinned host memory comes from a bounded pool (`configure_offload(pool_bytes=...)` or
`UNSLOTH_EXT_OFFLOAD_POOL_GB`, default 16 GiB): when it is exhausted the input stays on the
device for that layer (plain recompute), with one warning; the pool never grows past its bound.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from unsloth_ext._extension import UnslothExtWarning

_DEFAULT_POOL_BYTES = int(float(os.environ.get("UNSLOTH_EXT_OFFLOAD_POOL_GB", "16")) * 2**30)

# The function an offloaded checkpoint's backward is recomputing, while it runs.
_RECOMPUTING: contextvars.ContextVar = contextvars.ContextVar("unsloth_ext_recomputing",
                                                              default=None)


# The memo of the offloaded checkpoint whose forward or recompute is running.
_MEMO: contextvars.ContextVar = contextvars.ContextVar("unsloth_ext_checkpoint_memo", default=None)


def checkpoint_memo() -> dict | None:
    """The dict shared by the running offloaded checkpoint's forward and its recompute in the
    backward (None outside one). A function may keep there what it computed from parameters in
    the forward and reuse it when recomputed: the backward of that call sees the same parameters
    (the optimizer steps after it). Keys should name their owner, e.g. ("adapters", ...). The
    dict is dropped once the checkpoint's backward is done."""
    return _MEMO.get()


def memoized(key, make: Callable):
    """make(), computed once per offloaded checkpoint call and reused by its recompute (kept in
    `checkpoint_memo()` under key); outside an offloaded checkpoint, make() at every call."""
    memo = _MEMO.get()
    if memo is None:
        return make()
    if key not in memo:
        memo[key] = make()
    return memo[key]


def recomputing(module) -> bool:
    """Whether `module` is running as the function of an offloaded checkpoint recomputed in
    backward: the function is `module` itself, one of its bound methods, or a functools.partial
    of either (transformers checkpoints a layer as `partial(layer.__call__, **kwargs)`). The
    backward uses only the graph of that call's output, never its values."""
    function = _RECOMPUTING.get()
    while isinstance(function, functools.partial):
        function = function.func
    return function is not None and (function is module
                                     or getattr(function, "__self__", None) is module)


def _pinned_bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class PinnedPool:
    """Host buffers handed out and taken back by size, never more than `capacity` bytes in all.
    `allocate(nbytes)` makes a new buffer (pinned memory by default)."""

    def __init__(self, capacity: int, allocate: Callable[[int], torch.Tensor] = _pinned_bytes):
        self.capacity = capacity
        self._allocate = allocate
        self.allocated = 0
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> torch.Tensor | None:
        """A uint8 pinned buffer of exactly nbytes, or None when the pool is at its bound."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
            if self.allocated + nbytes > self.capacity:
                return None
            self.allocated += nbytes
        return self._allocate(nbytes)

    def release(self, buffer: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault(buffer.numel(), []).append(buffer)

    def shrink(self) -> None:
        """Drop the buffers not in use (they return to the host allocator)."""
        with self._lock:
            for buffers in self._free.values():
                self.allocated -= sum(b.numel() for b in buffers)
            self._free.clear()


@dataclass(eq=False)
class _Slot:
    """One offloaded layer input."""
    device_tensor: torch.Tensor | None  # set when kept on the device (CPU, or pool exhausted)
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    prefetched: torch.Tensor | None = None
    prefetch_done: torch.cuda.Event | None = None
    previous: "_Slot | None" = field(default=None, repr=False)  # offloaded just before this one
    consumed: bool = False


class _Offloader:
    def __init__(self, pool_bytes: int):
        self.pool = PinnedPool(pool_bytes)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: _Slot | None = None
        self._warned = False

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def offload(self, tensor: torch.Tensor) -> _Slot:
        previous = self._last if self._last is not None and not self._last.consumed else None
        if not tensor.is_cuda:
            slot = _Slot(device_tensor=tensor, previous=previous)
            self._last = slot
            return slot
        nbytes = tensor.numel() * tensor.element_size()
        buffer = self.pool.acquire(nbytes)
        if buffer is None:
            if not self._warned:
                warnings.warn(f"unsloth_ext: the pinned offload pool ({self.pool.capacity / 2**30:.1f}"
                              " GiB) is full; further layer inputs stay on the GPU. Raise it with "
                              "configure_offload(pool_bytes=...).", UnslothExtWarning, stacklevel=4)
                self._warned = True
            slot = _Slot(device_tensor=tensor, previous=previous)
            self._last = slot
            return slot
        stream = self._stream(tensor.device)
        stream.wait_stream(torch.cuda.current_stream(tensor.device))
        host = buffer.view(tensor.dtype).view(tensor.shape)
        with torch.cuda.stream(stream):
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        tensor.record_stream(stream)  # the allocator must not reuse it before the copy is done
        slot = _Slot(device_tensor=None, host=host, copied=copied, previous=previous)
        weakref.finalize(slot, self.pool.release, buffer)
        self._last = slot
        return slot

    def prefetch(self, slot: _Slot | None, device: torch.device) -> None:
        """Start copying slot's input back to `device` on the side stream."""
        if slot is None or slot.host is None or slot.prefetched is not None:
            return
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            stream.wait_event(slot.copied)
            slot.prefetched = torch.empty(slot.host.shape, dtype=slot.host.dtype, device=device)
            slot.prefetched.copy_(slot.host, non_blocking=True)
            slot.prefetch_done = torch.cuda.Event()
            slot.prefetch_done.record(stream)

    def fetch(self, slot: _Slot, device: torch.device) -> torch.Tensor:
        """The slot's input on `device`, ready for use on the current stream; starts bringing back
        the input the backward needs next."""
        slot.consumed = True
        previous, slot.previous = slot.previous, None
        if slot.device_tensor is not None:
            return slot.device_tensor
        self.prefetch(slot, device)
        self.prefetch(previous, device)
        current = torch.cuda.current_stream(device)
        current.wait_event(slot.prefetch_done)
        tensor = slot.prefetched
        tensor.record_stream(current)
        slot.prefetched = None
        return tensor


_OFFLOADER = _Offloader(_DEFAULT_POOL_BYTES)


def configure_offload(pool_bytes: int) -> None:
    """Bound the pinned host memory used for offloaded layer inputs (bytes)."""
    _OFFLOADER.pool.shrink()
    _OFFLOADER.pool.capacity = int(pool_bytes)


def offload_pool() -> PinnedPool:
    return _OFFLOADER.pool


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, hidden_states, *args):
        ctx.function = function
        ctx.args = args
        ctx.device = hidden_states.device
        ctx.rng_cpu = torch.get_rng_state()
        ctx.rng_cuda = torch.cuda.get_rng_state(hidden_states.device) if hidden_states.is_cuda else None
        ctx.autocast = (torch.is_autocast_enabled(hidden_states.device.type),
                        torch.get_autocast_dtype(hidden_states.device.type))
        ctx.memo = {}
        token = _MEMO.set(ctx.memo)
        try:
            with torch.no_grad():
                output = function(hidden_states, *args)
        finally:
            _MEMO.reset(token)
        ctx.slot = _OFFLOADER.offload(hidden_states)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states = _OFFLOADER.fetch(ctx.slot, ctx.device).detach().requires_grad_(True)
        devices = [ctx.device] if ctx.rng_cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.rng_cpu)
            if ctx.rng_cuda is not None:
                torch.cuda.set_rng_state(ctx.rng_cuda, ctx.device)
            tokens = _RECOMPUTING.set(ctx.function), _MEMO.set(ctx.memo)
            try:
                with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=ctx.autocast[1],
                                                         enabled=ctx.autocast[0]):
                    output = ctx.function(hidden_states, *ctx.args)
            finally:
                _MEMO.reset(tokens[1])
                _RECOMPUTING.reset(tokens[0])
        torch.autograd.backward(output, grad_output)
        ctx.slot = ctx.memo = None
        return (None, hidden_states.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(function, hidden_states: torch.Tensor, *args):
    """Checkpoint `function(hidden_states, *args)` with its input held in pinned host memory.

    Gradients flow to hidden_states and to the parameters `function` uses (accumulated into
    their .grad, as reentrant checkpointing does). Other positional arguments get none.
    """
    return _OffloadedCheckpoint.apply(function, hidden_states, *args)
