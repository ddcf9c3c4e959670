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


def test_gradient_sum_has_the_graph_of_the_sum():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float32, requires_grad=True)
    out = checkpointing.gradient_sum(a, b)
    assert torch.equal(out, a) and out.data_ptr() == a.data_ptr()  # no kernel, a's values
    grad = torch.randn(3, 4, dtype=torch.float64)
    out.backward(grad)
    assert torch.equal(a.grad, grad) and b.grad.dtype == torch.float32
    assert torch.equal(b.grad, grad.float())


def test_handover_gives_the_backward_what_the_recompute_kept():
    calls = []

    def three(x, how):
        calls.append(how)
        return torch.full_like(x, 3.0)

    class Times3(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * checkpointing.handover("w", lambda: three(x, "keep"), lambda: three(x, "make"))

        @staticmethod
        def backward(ctx, grad):
            return grad * checkpointing.handover("w", lambda: three(grad, "keep"),
                                                 lambda: three(grad, "make"))

    x = torch.randn(4, requires_grad=True)
    offloaded_checkpoint(Times3.apply, x).sum().backward()
    assert calls == ["make", "keep"]  # forward, recompute; the backward took the recompute's
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0), rtol=0, atol=0)
    calls.clear()
    Times3.apply(x).sum().backward()
    assert calls == ["make", "make"]  # outside an offloaded checkpoint


def test_stash_keeps_nothing_on_cpu_or_outside_an_offloaded_checkpoint():
    seen = []

    def function(x):
        y = x * 2
        seen.append((checkpointing.stash("y", y), checkpointing.stashed("y")))
        return y + 1

    assert checkpointing.stash("y", torch.ones(2)) == 0 and checkpointing.stashed("y") == ()
    offloaded_checkpoint(function, torch.randn(3, requires_grad=True)).sum().backward()
    assert seen == [(0, ()), (0, ())]  # forward, recompute: both compute y


@pytest.mark.parametrize("stash", [-1, 0, "sometimes", True])
def test_stash_setting_is_auto_off_or_a_positive_integer(stash):
    with pytest.raises(ValueError, match="expected 'auto', 'off' or a positive integer"):
        checkpointing.configure_offload(stash=stash)


def test_configure_offload_returns_the_settings_it_replaced():
    before = checkpointing.configure_offload(stash=3)
    try:
        assert checkpointing.configure_offload(stash="off")["stash"] == 3
        assert checkpointing.configure_offload()["stash"] == "off"
    finally:
        checkpointing.configure_offload(**before)


@pytest.mark.parametrize("backlog_ms, backward_ms, lead_ms, expected", [
    (0.0, 10.0, 0.0, 2), (3.0, 10.0, 0.0, 2), (4.0, 10.0, 0.0, 1), (7.0, 10.0, 0.0, 0),
    (0.0, 5.0, 0.0, 1), (0.0, 5.0, 0.5, 2), (0.0, 2.0, 0.0, 0)])
def test_planner_stashes_the_leading_tensors_the_link_serves_in_time(backlog_ms, backward_ms,
                                                                      lead_ms, expected):
    # Two 235-byte tensors and a 50-byte layer input at 0.01 ms a byte, 3 ms of compute a layer:
    # forward, one tensor and the input add 2.85 ms to the backlog, both 5.2 ms, within the 9 ms
    # of three layers (DEPTH - 1); backward, they come back in as long, within a layer's backward
    # and the lead.
    planner = checkpointing._StashPlanner(None)
    assert planner.DEPTH == 4
    planner._backlog_ms, planner._input_bytes = backlog_ms, 50
    assert planner.affordable([235, 235], 0.01, 3.0, backward_ms, lead_ms) == expected


def test_pool_is_bounded_and_reused():
    pool = PinnedPool(capacity=3 * 1024, allocate=lambda n: torch.empty(n, dtype=torch.uint8))
    first = pool.acquire(1024)
    assert pool.acquire(1024) is not None and pool.acquire(1024) is not None
    assert pool.acquire(1024) is None  # at the bound
    assert pool.acquire(1024, bound=8 * 1024) is None  # a bound never raises the capacity
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


class Noisy(torch.nn.Module):
    """x * noise: the noise (no gradient flows through it) is stashed by the forward; records what
    each run drew or got back."""

    def __init__(self):
        super().__init__()
        self.runs = []  # (stashed by this run, got back from the stash, noise)

    def forward(self, x):
        kept = checkpointing.stashed("noise")
        restored = bool(kept)
        noise = kept[0] if restored else torch.randn_like(x)
        self.runs.append((not restored and checkpointing.stash("noise", noise), restored,
                          noise.clone()))
        return x * noise


def _noisy_run(blocks: int, **settings):
    before = checkpointing.configure_offload(**settings)
    try:
        modules = [Noisy() for _ in range(blocks)]
        x = torch.randn(64, 32, device="cuda", requires_grad=True)
        h = x
        for module in modules:
            h = offloaded_checkpoint(module, h)
        h.sum().backward()
        return modules, x.grad, checkpointing.offload_pool().allocated
    finally:
        checkpointing.configure_offload(**before)


@pytest.mark.cuda
@pytest.mark.parametrize("stash", ["off", 1, 2, "auto"])
def test_recompute_gets_back_what_the_forward_stashed(stash):
    modules, grad, _ = _noisy_run(4, stash=stash)
    for i, module in enumerate(modules):
        (stashed, _, drawn), (stashed_again, restored, used) = module.runs
        if stash == "auto":  # nothing before the link and the layers are measured
            assert not stashed
        else:
            assert stashed == int(stash != "off" and i % stash == 0)
        assert not stashed_again
        # The last block's recompute, right after its forward, gets its tensors from the device.
        assert restored == bool(stashed or i == len(modules) - 1)
        assert torch.equal(used, drawn)  # stashed or redrawn from the replayed RNG state
    expected = torch.ones_like(grad)
    for module in reversed(modules):  # the backward's order of products
        expected = expected * module.runs[0][2]
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@pytest.mark.cuda
def test_recompute_computes_what_a_partial_stash_left_out(monkeypatch):
    # The planner keeps the first of the two tensors: the first checkpoint's recompute gets it
    # back and computes the second; the last checkpoint's gets both from the device. The gradient
    # is that of computing both.
    runs = []

    def function(x):
        kept = checkpointing.stashed("sin, cos")
        sin, cos = (*kept, *(f(x.detach()) for f in (torch.sin, torch.cos)[len(kept):]))
        runs.append((len(kept), checkpointing.stash("sin, cos", sin, cos)))
        return x * sin * cos

    monkeypatch.setattr(checkpointing._OFFLOADER.planner, "due", lambda stream, sizes: 1)
    x = torch.randn(64, 32, device="cuda", requires_grad=True)
    offloaded_checkpoint(function, offloaded_checkpoint(torch.mul, x, 1.0)).sum().backward()
    assert runs == [(0, 1), (2, 0)]  # forward: stashed sin; last layer's recompute: both back
    torch.testing.assert_close(x.grad, x.detach().sin() * x.detach().cos(), rtol=0, atol=0)
    runs.clear()
    offloaded_checkpoint(torch.mul, offloaded_checkpoint(function, x), 1.0).sum().backward()
    assert runs == [(0, 1), (1, 0)]  # not the last layer: sin back from the host, cos computed


@pytest.mark.cuda
def test_backward_takes_the_last_checkpoints_tensors_from_the_device():
    """The backward starts with the last checkpoint, just after its forward: its recompute gets
    the forward's own tensor, not a copy back from the host; the others get copies."""
    forward, recompute = [], []

    def function(x):
        kept = checkpointing.stashed("y")
        y = kept[0] if kept else torch.full_like(x, 2.0)
        if not kept:
            checkpointing.stash("y", y)
        (recompute if kept else forward).append(y)
        return x * y

    before = checkpointing.configure_offload(stash=1)
    try:
        x = torch.randn(64, 32, device="cuda", requires_grad=True)
        h = x
        for _ in range(3):
            h = offloaded_checkpoint(function, h)
        h.sum().backward()
    finally:
        checkpointing.configure_offload(**before)
    assert [r is f for r, f in zip(recompute, reversed(forward))] == [True, False, False]
    for r, f in zip(recompute, reversed(forward)):
        assert torch.equal(r, f)
    torch.testing.assert_close(x.grad, torch.full_like(x, 8.0), rtol=0, atol=0)


@pytest.mark.cuda
def test_stashes_leave_half_the_pool_to_layer_inputs():
    # Room for six [64, 32] fp32 tensors: a stash may not take the pool past three, so the first
    # two blocks stash (each followed by its input) and all four inputs are offloaded.
    nbytes = 64 * 32 * 4
    modules, _, allocated = _noisy_run(4, stash=1, pool_bytes=6 * nbytes)
    assert [m.runs[0][0] for m in modules] == [1, 1, 0, 0]
    assert allocated == 6 * nbytes


@pytest.mark.cuda
def test_recompute_that_asks_for_another_stash_is_an_error():
    names = iter(["first", "second"])

    def function(x):
        name = next(names)
        if not checkpointing.stashed(name):
            checkpointing.stash(name, x * 2)
        return x * 3

    before = checkpointing.configure_offload(stash=1)
    try:
        y = offloaded_checkpoint(function, torch.randn(8, device="cuda", requires_grad=True))
        with pytest.raises(RuntimeError, match="asked for stash 'second' where its forward "
                                               "stashed 'first'"):
            y.sum().backward()
    finally:
        checkpointing.configure_offload(**before)
