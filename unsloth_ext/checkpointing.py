"""Gradient checkpointing that keeps each decoder layer's input in pinned host memory.

`offloaded_checkpoint(function, hidden_states)` runs `function` without saving activations and
copies `hidden_states` to a pinned host buffer on a side stream. The backward copies it back
(the copy for the layer after it in the backward order is already in flight: double buffering),
recomputes the layer with gradients and backpropagates through it. The device then holds, per
layer, nothing but what the running layer needs. The last checkpoint's device tensors are kept
until another checkpoint begins: the backward starts with that layer, whose copies back would
make it wait, so it takes them from the device.

While the backward recomputes a layer, `recomputing(module)` is True for the module the
checkpointed function calls: its output then only carries the gradient, so a forward may skip
computing values nobody reads (the patched Llama layer skips its MLP's down projection, and its
residual sum is `gradient_sum`, which runs no kernel).
`checkpoint_memo()` is a dict that a checkpoint's forward and its recompute share, and
`memoized(key, make)` reads it: what a function derives there from the parameters and the
layer's input (the LoRA Functions' compute-dtype copies of the adapters, and their rank-r
products s·D(X)·Aᵀ, 1.8 MB per Llama-3-8B layer at 8192 tokens) is made once per layer and step.
`handover(key, keep, make)` passes what the recompute derives to the backward through it (the
LoRA Functions' dequantized weights), which would otherwise derive it again.

A checkpointed function may also `stash(name, *tensors)` activations in its forward: they go to
pinned host memory behind the layer input and come back with it, and the recompute reads them
with `stashed(name)` instead of computing them again (the patched Llama MLP stashes its gate and
up outputs, so the recompute skips their GEMMs). A call may keep a leading part of its tensors
only, so the recompute computes the rest. Stashing is paid in host-link traffic, and before a
stash copy starts the compute stream waits for the one four stashes back to finish (at most
four are in flight, whatever the link's speed). In the backward a layer's input comes back
first: its recompute starts before its stash is back, and waits for it where it reads it. What
each call stashes is set by `configure_offload(stash=...)` or `UNSLOTH_EXT_STASH`: "auto"
(default) keeps at a call the most leading tensors that the link, at the speed measured on
earlier copies, moves in time: in the forward, with the copies already queued (stashes and layer
inputs), within two layers' compute as measured, so the wait costs nothing; in the backward,
within the backward of the layer after it and its own recompute's lead to the stash. An integer
n stashes all tensors at every n-th call; "off" none.

Pinned host memory comes from a bounded pool (`configure_offload(pool_bytes=...)` or
`UNSLOTH_EXT_OFFLOAD_POOL_GB`; by default a quarter of the host's memory, at most 32 GiB, and
16 GiB where the host's memory is unknown): when it is exhausted the input stays on the
device for that layer (plain recompute), with one warning; the pool never grows past its bound.
A stash never takes the pool past half its bound: the rest stays for layer inputs.
"""

from __future__ import annotations

import collections
import contextvars
import functools
import os
import statistics
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from unsloth_ext._extension import UnslothExtWarning


def _env_setting(name: str, default: str, parse: Callable):
    """parse(the environment variable `name`); parse(default), with a warning, when it is not
    valid (import never fails on a setting)."""
    value = os.environ.get(name, default)
    try:
        return parse(value)
    except ValueError:
        warnings.warn(f"unsloth_ext: {name}={value!r} is not valid; using {default!r}",
                      UnslothExtWarning, stacklevel=2)
        return parse(default)


# The function an offloaded checkpoint's backward is recomputing, while it runs.
_RECOMPUTING: contextvars.ContextVar = contextvars.ContextVar("unsloth_ext_recomputing",
                                                              default=None)


# The memo of the offloaded checkpoint whose forward or recompute is running.
_MEMO: contextvars.ContextVar = contextvars.ContextVar("unsloth_ext_checkpoint_memo", default=None)

# What the recompute of the offloaded checkpoint whose backward is running hands to the backward
# through it (see handover).
_HANDOVER: contextvars.ContextVar = contextvars.ContextVar("unsloth_ext_handover", default=None)

# The slot of the offloaded checkpoint whose forward is running (stash() adds to it), and the
# stashes its recompute has not read yet (stashed() takes them in order).
_STASHING: contextvars.ContextVar = contextvars.ContextVar("unsloth_ext_stashing", default=None)
_RESTORED: contextvars.ContextVar = contextvars.ContextVar("unsloth_ext_restored", default=None)


def checkpoint_memo() -> dict | None:
    """The dict shared by the running offloaded checkpoint's forward and its recompute in the
    backward (None outside one). A function may keep there what it computed in the forward from
    parameters and the checkpoint's inputs, and reuse it when recomputed: the recompute sees the
    same input and parameters (the optimizer steps after it) and draws the same random numbers.
    Keys should name their owner, e.g. ("adapters", ...). The dict is dropped once the
    checkpoint's backward is done."""
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


def handover(key, keep: Callable, make: Callable):
    """In an offloaded checkpoint's recompute: keep(), also held under key for the backward
    through the recompute, whose first call with that key takes it instead of making it again.
    Elsewhere, and for a key the recompute did not hold: make(). (keep must not return what a
    later call overwrites, such as a shared buffer.) What the backward does not take is dropped
    with the checkpoint's backward."""
    held = _HANDOVER.get()
    if held is None:
        return make()
    if _RECOMPUTING.get() is not None:
        value = held[key] = keep()
        return value
    value = held.pop(key, None)
    return make() if value is None else value


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


class _GradientCarrier(torch.autograd.Function):
    """Forward: `first`'s values, unchanged; backward: the output's gradient to every input, as
    if the output were their sum."""

    @staticmethod
    def forward(ctx, first, *others):
        ctx.dtypes = [t.dtype for t in (first, *others)]
        return first.detach()

    @staticmethod
    def backward(ctx, grad):
        return tuple(grad.to(dtype) for dtype in ctx.dtypes)


def gradient_sum(*tensors: torch.Tensor) -> torch.Tensor:
    """Stands for the sum of same-shaped tensors in a recompute (see `recomputing`), whose
    output only carries the gradient: the graph is that of the sum, the values are those of the
    first tensor, and no kernel runs."""
    return _GradientCarrier.apply(*tensors)


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

    def acquire(self, nbytes: int, bound: int | None = None) -> torch.Tensor | None:
        """A uint8 pinned buffer of exactly nbytes, or None when a new one would take the pool
        past `bound` bytes (default: its capacity)."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                return free.pop()
            limit = self.capacity if bound is None else min(bound, self.capacity)
            if self.allocated + nbytes > limit:
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
    """What one offloaded checkpoint keeps for its backward: the activations its forward stashed,
    then its layer input, in pinned host memory (the input stays on the device on CPU or when the
    pool is full)."""
    previous: "_Slot | None" = field(default=None, repr=False)  # offloaded just before this one
    device_tensor: torch.Tensor | None = None  # the input, when kept on the device
    host: list[torch.Tensor] = field(default_factory=list)  # stashed tensors, then the input
    stashes: list[tuple[str, int]] = field(default_factory=list)  # per stash() call: name, count
    copied: torch.cuda.Event | None = None  # after the last copy to the host
    # While no later checkpoint has begun: the tensors of each stash() call, kept or not, and the
    # input, on the device. The backward of the last layer, which follows its forward with no
    # layer between, takes them instead of waiting for copies back, and recomputes none of them.
    resident_stashes: list[tuple[torch.Tensor, ...]] | None = field(default_factory=list)
    resident_input: torch.Tensor | None = None
    prefetched: list[torch.Tensor] | None = None
    input_ready: torch.cuda.Event | None = None  # the input is back (it comes first)
    prefetch_done: torch.cuda.Event | None = None
    consumed: bool = False


def _stash_setting(stash) -> int | None:
    """"auto" -> None, "off" -> 0, n -> n (every n-th call)."""
    if stash == "auto":
        return None
    if stash == "off":
        return 0
    try:
        every = int(stash)
    except (TypeError, ValueError):
        every = 0
    if every < 1 or isinstance(stash, bool):
        raise ValueError(f"stash is {stash!r}; expected 'auto', 'off' or a positive integer")
    return every


def _timed_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


class _StashPlanner:
    """How many of a stash() call's tensors stash: all at every n-th call (n = `every`), none
    (0) or, with `every` None, the most leading tensors that the host link serves without
    making the compute wait. Forward: the link's backlog (the copies queued and not done: each
    adds its bytes at the link's speed, and the compute between calls drains it) stays within
    DEPTH - 1 calls of compute once this stash and its layer's input are queued, so the stash
    DEPTH calls back, which the compute waits for before queueing another, is done a call before
    then: a link that falls behind the plan costs a stash of device memory before it costs a
    wait. Backward: a layer's input and its stash come back (input first) while the layer after
    it runs its backward and its own recompute reaches the stash. Link speed (ms per byte, from
    the offload copies), the compute per call (ms between stash() calls in the forward, between
    fetches in the backward, waits left out) and the recompute's lead (from a fetch to its
    stash's read) are medians of recent samples, read from timing events once the GPU has passed
    them; until there are some (the first step), nothing is stashed."""

    # Stash copies in flight. On the H200 at the Llama-3.1-8B shape, 4 stashed more up outputs
    # than 3 at the same peak memory: a plain timing loop of the training step (mean of 10 steps
    # after 4, one process each) took 577.5 and 580.5 ms against 587.1 and 593.6.
    DEPTH = 4
    _SAMPLES = 16

    def __init__(self, every: int | None):
        self.every = every
        self.reset()

    def reset(self) -> None:
        self.since = 0  # stash() calls since the last that stashed
        self._link: collections.deque = collections.deque(maxlen=self._SAMPLES)
        self._forward: collections.deque = collections.deque(maxlen=self._SAMPLES)
        self._backward: collections.deque = collections.deque(maxlen=self._SAMPLES)
        self._lead: collections.deque = collections.deque(maxlen=self._SAMPLES)
        self._input_bytes = 0  # the latest layer input copied to the host
        self._backlog_ms = 0.0  # link work queued and not done, at the latest call
        self._new_forward = True  # no call since the last backward
        self._pending: collections.deque = collections.deque()  # (samples, start, end, bytes)
        self._mark: torch.cuda.Event | None = None  # the compute stream at the previous call
        self._fetch_mark: torch.cuda.Event | None = None  # ... at the previous fetch
        self.in_flight: collections.deque = collections.deque(maxlen=self.DEPTH)  # copy ends

    def copy(self, start: torch.cuda.Event, end: torch.cuda.Event, nbytes: int, input: bool):
        self._read()
        self._pending.append((self._link, start, end, nbytes))
        if input:
            self._input_bytes = nbytes
        if self._link:
            self._backlog_ms += nbytes * statistics.median(self._link)

    def _read(self) -> None:
        while self._pending and self._pending[0][2].query():
            samples, start, end, nbytes = self._pending.popleft()
            samples.append(start.elapsed_time(end) / nbytes)

    def due(self, stream: torch.cuda.Stream, sizes: list[int]) -> int:
        """How many leading tensors, of the given sizes in bytes, the call now made on `stream`
        stashes (with every n, the first call after a reset stashes)."""
        self._read()
        self.since += 1
        if self._new_forward:  # the time since the previous call or fetch is no layer's
            self._new_forward, self._mark, self._fetch_mark = False, None, None
            self._backlog_ms = 0.0
        elif self._forward:
            self._backlog_ms = max(0.0, self._backlog_ms - statistics.median(self._forward))
        mark = _timed_event(stream)
        if self._mark is not None:
            self._pending.append((self._forward, self._mark, mark, 1))
        self._mark = mark
        if self.every is not None:
            due = self.every > 0 and (not self.in_flight or self.since >= self.every)
            return len(sizes) if due else 0
        if not (self._link and self._forward and self._backward):
            return 0
        return self.affordable(sizes, statistics.median(self._link),
                               statistics.median(self._forward),
                               statistics.median(self._backward),
                               statistics.median(self._lead) if self._lead else 0.0)

    def affordable(self, sizes: list[int], ms_per_byte: float, forward_ms: float,
                   backward_ms: float, lead_ms: float) -> int:
        """The most leading tensors whose copies, with the layer input's, the link serves in time:
        on top of the backlog within DEPTH - 1 calls of forward compute, and back within a
        layer's backward and the recompute's lead."""
        count, nbytes = 0, 0
        for size in sizes:
            nbytes += size
            link = (nbytes + self._input_bytes) * ms_per_byte
            if (self._backlog_ms + link > (self.DEPTH - 1) * forward_ms
                    or link > backward_ms + lead_ms):
                break
            count += 1
        return count

    def fetching(self, stream: torch.cuda.Stream) -> None:
        """The backward is about to wait on `stream` for a layer's input."""
        self._new_forward = True
        if self._fetch_mark is not None:
            self._pending.append((self._backward, self._fetch_mark, _timed_event(stream), 1))

    def fetched(self, stream: torch.cuda.Stream) -> None:
        """... and has it: that layer's recompute and backward start."""
        self._fetch_mark = _timed_event(stream)

    def reading(self, stream: torch.cuda.Stream) -> None:
        """The recompute is about to wait on `stream` for its layer's stash."""
        if self._fetch_mark is not None:
            self._pending.append((self._lead, self._fetch_mark, _timed_event(stream), 1))

    def stashed(self, stream: torch.cuda.Stream, copied: torch.cuda.Event) -> None:
        """A stash was queued; the compute stream may have waited for an earlier one."""
        self.since = 0
        self.in_flight.append(copied)
        self._mark = _timed_event(stream)  # the next layer's compute starts after the wait


class _Offloader:
    def __init__(self, pool_bytes: int, stash_every: int | None):
        self.pool = PinnedPool(pool_bytes)
        self.planner = _StashPlanner(stash_every)
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._last: _Slot | None = None
        self._warned = False

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def begin(self) -> _Slot:
        """The slot of a checkpoint whose forward starts now."""
        previous = self._last if self._last is not None and not self._last.consumed else None
        if self._last is not None:
            self._last.resident_stashes = self._last.resident_input = None
        self._last = _Slot(previous=previous)
        return self._last

    def _to_host(self, slot: _Slot, tensors: list[torch.Tensor], buffers: list[torch.Tensor],
                 input: bool) -> torch.cuda.Event:
        """Copy CUDA tensors into pinned buffers on the side stream, after the work queued so far
        on the current stream; the slot owns the buffers. Returns the event after the copies."""
        device = tensors[0].device
        stream = self._stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        start = _timed_event(stream)
        with torch.cuda.stream(stream):
            for tensor, buffer in zip(tensors, buffers):
                host = buffer.view(tensor.dtype).view(tensor.shape)
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(stream)  # not reused by the allocator before the copy is done
                slot.host.append(host)
                weakref.finalize(slot, self.pool.release, buffer)
        slot.copied = _timed_event(stream)
        self.planner.copy(start, slot.copied, sum(b.numel() for b in buffers), input)
        return slot.copied

    def stash(self, slot: _Slot, name: str, tensors: tuple[torch.Tensor, ...]) -> int:
        if not tensors or not all(t.is_cuda for t in tensors):
            return 0
        current = torch.cuda.current_stream(tensors[0].device)
        sizes = [t.numel() * t.element_size() for t in tensors]
        buffers = []
        for nbytes in sizes[:self.planner.due(current, sizes)]:
            buffer = self.pool.acquire(nbytes, bound=self.pool.capacity // 2)
            if buffer is None:
                break
            buffers.append(buffer)
        # Recorded even when nothing is kept: the recompute's calls match the forward's in order.
        slot.stashes.append((name, len(buffers)))
        if slot.resident_stashes is not None:
            slot.resident_stashes.append(tensors)
        if buffers:
            if len(self.planner.in_flight) == self.planner.DEPTH:  # at most DEPTH in flight
                current.wait_event(self.planner.in_flight[0])
            kept = list(tensors[:len(buffers)])
            self.planner.stashed(current, self._to_host(slot, kept, buffers, input=False))
        return len(buffers)

    def offload(self, slot: _Slot, tensor: torch.Tensor) -> None:
        """The layer input, after the forward: to the host, or kept on the device."""
        slot.resident_input = tensor
        buffer = None
        if tensor.is_cuda:
            buffer = self.pool.acquire(tensor.numel() * tensor.element_size())
            if buffer is None and not self._warned:
                warnings.warn(f"unsloth_ext: the pinned offload pool ({self.pool.capacity / 2**30:.1f}"
                              " GiB) is full; further layer inputs stay on the GPU. Raise it with "
                              "configure_offload(pool_bytes=...).", UnslothExtWarning, stacklevel=4)
                self._warned = True
        if buffer is None:
            slot.device_tensor = tensor
        else:
            self._to_host(slot, [tensor], [buffer], input=True)

    def prefetch(self, slot: _Slot | None, device: torch.device) -> None:
        """Start copying slot's host tensors back to `device` on the side stream, the input
        first."""
        if slot is None or not slot.host or slot.prefetched is not None:
            return
        stream = self._stream(device)
        with torch.cuda.stream(stream):
            stream.wait_event(slot.copied)
            slot.prefetched = [torch.empty(h.shape, dtype=h.dtype, device=device)
                               for h in slot.host]
            order = list(range(len(slot.host)))
            if slot.device_tensor is None:  # the input is the last host tensor
                order.insert(0, order.pop())
            for i in order:
                slot.prefetched[i].copy_(slot.host[i], non_blocking=True)
                if i == len(slot.host) - 1 and slot.device_tensor is None:
                    slot.input_ready = _timed_event(stream)
            slot.prefetch_done = torch.cuda.Event()
            slot.prefetch_done.record(stream)

    def fetch(self, slot: _Slot, device: torch.device) -> tuple[torch.Tensor, "_Restored"]:
        """The slot's input, ready for use on the current stream, and its stashes (ready once
        `_Restored.take` has made the stream wait for them); starts bringing back what the
        backward needs next."""
        slot.consumed = True
        previous, slot.previous = slot.previous, None
        if slot.resident_input is not None:
            stashes = [(name, tensors) for (name, _), tensors in zip(slot.stashes,
                                                                     slot.resident_stashes)]
            inputs, slot.resident_input, slot.resident_stashes = slot.resident_input, None, None
            if inputs.is_cuda:
                current = torch.cuda.current_stream(device)
                self.planner.fetching(current)
                self.planner.fetched(current)
            self.prefetch(previous, device)
            return inputs, _Restored(stashes, None, self.planner)
        tensors: list[torch.Tensor] = []
        ready = None
        if slot.host:
            self.prefetch(slot, device)
            current = torch.cuda.current_stream(device)
            self.planner.fetching(current)
            current.wait_event(slot.input_ready or slot.prefetch_done)
            self.planner.fetched(current)
            tensors, slot.prefetched = slot.prefetched, None
            for tensor in tensors:
                tensor.record_stream(current)
            ready = slot.prefetch_done
        self.prefetch(previous, device)
        stashes, at = [], 0
        for name, count in slot.stashes:
            stashes.append((name, tuple(tensors[at:at + count])))
            at += count
        inputs = slot.device_tensor if slot.device_tensor is not None else tensors[-1]
        return inputs, _Restored(stashes, ready, self.planner)


class _Restored:
    """The stashes a recompute gets back, in order, and the event after their copies back."""

    def __init__(self, stashes: list, ready: torch.cuda.Event | None, planner: _StashPlanner):
        self.stashes, self.ready, self.planner = stashes, ready, planner

    def take(self, name: str) -> tuple[torch.Tensor, ...]:
        if self.stashes[0][0] != name:
            raise RuntimeError(f"unsloth_ext: the recompute asked for stash {name!r} where its "
                               f"forward stashed {self.stashes[0][0]!r}; the checkpointed "
                               "function must make the same stash calls each time it runs")
        tensors = self.stashes.pop(0)[1]
        if tensors and self.ready is not None:
            stream = torch.cuda.current_stream(tensors[0].device)
            self.planner.reading(stream)
            stream.wait_event(self.ready)
            self.ready = None
        return tensors


def _default_pool_gib() -> float:
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 16.0
    return min(32.0, host / 4 / 2**30)


_OFFLOADER = _Offloader(
    _env_setting("UNSLOTH_EXT_OFFLOAD_POOL_GB", f"{_default_pool_gib():.2f}",
                 lambda gb: int(float(gb) * 2**30)),
    _env_setting("UNSLOTH_EXT_STASH", "auto", _stash_setting))


def configure_offload(pool_bytes: int | None = None, stash=None) -> dict:
    """Bound the pinned host memory used for offloaded layer inputs and stashes (bytes), and set
    which stash() calls stash: "auto", "off", or n (every n-th call, counted from the next).
    Returns the settings before the call, as keyword arguments that restore them."""
    planner = _OFFLOADER.planner
    every = planner.every if stash is None else _stash_setting(stash)
    before = dict(pool_bytes=_OFFLOADER.pool.capacity,
                  stash={None: "auto", 0: "off"}.get(planner.every, planner.every))
    if pool_bytes is not None:
        _OFFLOADER.pool.shrink()
        _OFFLOADER.pool.capacity = int(pool_bytes)
    if stash is not None:
        planner.every = every
        planner.reset()
    return before


def stash(name: str, *tensors: torch.Tensor) -> int:
    """In an offloaded checkpoint's forward: keep `tensors` (CUDA), or the first ones of them, in
    pinned host memory for the recompute, which gets them back from `stashed(name)`. Returns how
    many were stashed (none outside such a forward, on CPU, at calls the stash setting skips, or
    when the pool has no room): a function that stashes must compute itself the tensors that
    `stashed` does not give back, so list them by how much their recompute costs, costliest
    first. The tensors must not change after the call. They come back without autograd history:
    stash what a custom autograd Function saves for its own backward (as the LoRA MLP does), or
    values no gradient flows through."""
    slot = _STASHING.get()
    return 0 if slot is None else _OFFLOADER.stash(slot, name, tensors)


def stashed(name: str) -> tuple[torch.Tensor, ...]:
    """In an offloaded checkpoint's recompute: the tensors the forward's matching stash(name)
    call kept (on the device, the recompute's to modify), its leading ones; empty where it kept
    none. Calls match in order: the recompute makes the same stash calls as the forward did."""
    restored = _RESTORED.get()
    return restored.take(name) if restored is not None and restored.stashes else ()


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
        ctx.slot = _OFFLOADER.begin()
        tokens = _MEMO.set(ctx.memo), _STASHING.set(ctx.slot)
        try:
            with torch.no_grad():
                output = function(hidden_states, *args)
        finally:
            _STASHING.reset(tokens[1])
            _MEMO.reset(tokens[0])
        _OFFLOADER.offload(ctx.slot, hidden_states)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        hidden_states, restored = _OFFLOADER.fetch(ctx.slot, ctx.device)
        hidden_states = hidden_states.detach().requires_grad_(True)
        devices = [ctx.device] if ctx.rng_cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type=ctx.device.type):
            torch.set_rng_state(ctx.rng_cpu)
            if ctx.rng_cuda is not None:
                torch.cuda.set_rng_state(ctx.rng_cuda, ctx.device)
            handed = _HANDOVER.set({})
            tokens = (_RECOMPUTING.set(ctx.function), _MEMO.set(ctx.memo),
                      _RESTORED.set(restored))
            try:
                with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=ctx.autocast[1],
                                                         enabled=ctx.autocast[0]):
                    output = ctx.function(hidden_states, *ctx.args)
            finally:
                _RESTORED.reset(tokens[2])
                _MEMO.reset(tokens[1])
                _RECOMPUTING.reset(tokens[0])
        try:
            torch.autograd.backward(output, grad_output)
        finally:
            _HANDOVER.reset(handed)
        ctx.slot = ctx.memo = None
        return (None, hidden_states.grad) + (None,) * len(ctx.args)


def offloaded_checkpoint(function, hidden_states: torch.Tensor, *args):
    """Checkpoint `function(hidden_states, *args)` with its input held in pinned host memory.

    Gradients flow to hidden_states and to the parameters `function` uses (accumulated into
    their .grad, as reentrant checkpointing does). Other positional arguments get none.
    """
    return _OffloadedCheckpoint.apply(function, hidden_states, *args)
