import functools

import pytest
import torch

from unsloth_ext import checkpointing
from unsloth_ext.checkpointing import PinnedPool, offloaded_checkpoint


class Block(torch.nn.Module):
    """A layer with a parameter and dropout (the recompute must replay the same mask)."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.dropout = torch.nn.Dropout(0.3)

    def forward(self, x, scale):
        return x + self.dropout(torch.tanh(self.linear(x))) * scale


def _grads(device, checkpointed: bool, seed: int = 0):
    torch.manual_seed(seed)
    blocks = torch.nn.ModuleList(Block(16) for _ in range(3)).to(device)
    x = torch.randn(4, 16, device=device, requires_grad=True)
    torch.manual_seed(1)
    h = x
    for block in blocks:
        h = offloaded_checkpoint(block, h, 0.5) if checkpointed else block(h, 0.5)
    h.square().sum().backward()
    return [x.grad] + [p.grad for p in blocks.parameters()]


def _check_same_gradients(device):
    for plain, ckpt in zip(_grads(device, False), _grads(device, True)):
        torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)


def test_gradients_match_without_checkpointing_cpu():
    _check_same_gradients("cpu")


class Recorder(torch.nn.Module):
    """Records `recomputing(self)` and `recomputing(child)` at each forward."""

    def __init__(self):
        super().__init__()
        self.child = torch.nn.Linear(4, 4)
        self.seen = []

    def forward(self, x, scale=1.0):
        self.seen.append((checkpointing.recomputing(self), checkpointing.recomputing(self.child)))
        return self.child(x) * scale


@pytest.mark.parametrize("wrap", ["module", "partial"])
def test_recomputing_names_the_recomputed_module_only(wrap):
    module = Recorder()
    function = module if wrap == "module" else functools.partial(module.__call__, scale=2.0)
    x = torch.randn(3, 4, requires_grad=True)
    y = offloaded_checkpoint(function, x)
    assert module.seen == [(False, False)]  # the first forward is not a recompute
    y.sum().backward()
    assert module.seen == [(False, False), (True, False)]
    assert not checkpointing.recomputing(module)  # reset after the backward


def test_memo_is_shared_by_the_forward_and_its_recompute_only():
    memos = []

    def function(x):
        memos.append(checkpointing.checkpoint_memo())
        memos[-1].setdefault("calls", []).append(len(memos))
        return x * 2

    assert checkpointing.checkpoint_memo() is None
    x = torch.randn(3, requires_grad=True)
    first, second = offloaded_checkpoint(function, x), offloaded_checkpoint(function, x)
    assert checkpointing.checkpoint_memo() is None
    (first + second).sum().backward()
    assert len(memos) == 4 and memos[0] is not memos[1]  # one memo per checkpoint call
    assert memos[2] is memos[1] and memos[3] is memos[0]  # the backward runs them in reverse
    assert memos[0]["calls"] == [1, 4] and memos[1]["calls"] == [2, 3]
    assert checkpointing.checkpoint_memo() is None


def test_pool_is_bounded_and_reused():
    pool = PinnedPool(capacity=3 * 1024, allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    first = pool.acquire(1024)
    assert pool.acquire(1024) is not None and pool.acquire(1024) is not None
    assert pool.acquire(1024) is None  # at the bound
    pool.release(first)
    assert pool.acquire(1024) is first  # reused, not grown
    assert pool.allocated == 3 * 1024
    pool.release(first)
    pool.shrink()  # drops free buffers only
    assert pool.allocated == 2 * 1024


@pytest.mark.cuda
def test_gradients_match_without_checkpointing_cuda():
    _check_same_gradients("cuda")


@pytest.mark.cuda
def test_default_pool_is_pinned():
    buffer = checkpointing.offload_pool().acquire(1024)
    assert buffer.is_pinned()
    checkpointing.offload_pool().release(buffer)


@pytest.mark.cuda
def test_exhausted_pool_keeps_inputs_on_the_gpu():
    capacity = checkpointing.offload_pool().capacity
    try:
        checkpointing.configure_offload(4 * 16 * 4)  # room for one [4, 16] fp32 input of three
        with pytest.warns(UserWarning, match="offload pool"):
            _check_same_gradients("cuda")
        assert checkpointing.offload_pool().allocated <= 4 * 16 * 4
    finally:
        checkpointing.configure_offload(capacity)
