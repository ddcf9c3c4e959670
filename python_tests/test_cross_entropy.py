import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (DTYPES, assert_close, assert_no_worse_than_reference, needs_extension,
                     poison_cuda_allocator)
from unsloth_ext.ops.cross_entropy import (_CrossEntropyGradInLogits, chunk_shape, cross_entropy,
                                           cross_entropy_bwd_reference,
                                           cross_entropy_fwd_bwd_reference_,
                                           cross_entropy_fwd_reference, cross_entropy_reference,
                                           fused_linear_cross_entropy, start_label_check)

IGNORE = -100
VOCABS = [32001, 128256, 256000]
# (logit_scale, softcap, label_smoothing)
SETTINGS = [(1.0, 0.0, 0.0), (1.0, 30.0, 0.0), (0.5, 0.0, 0.1), (2.0, 10.0, 0.2)]
SETTING_IDS = ["plain", "softcap", "scale+smoothing", "all"]
REDUCTIONS = ["mean", "sum", "none"]
OPS = torch.ops.unsloth_ext


def _labels(rows: int, vocab: int, device="cpu", ignored=(1,)) -> torch.Tensor:
    """Random classes, the first and last class among them, and ignored rows."""
    y = torch.randint(0, vocab, (rows,), device=device)
    y[0] = vocab - 1
    if rows > 2:
        y[2] = 0
    for r in ignored:
        if r < rows:
            y[r] = IGNORE
    return y


def _logits(rows: int, vocab: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return (torch.randn(rows, vocab, device=device) * 3 + 0.5).to(dtype)


def _torch_loss(logits, labels, reduction="mean", logit_scale=1.0, softcap=0.0,
                label_smoothing=0.0, num_items_in_batch=None):
    """What transformers computes: F.cross_entropy in fp32 on (scaled, soft-capped) logits."""
    z = logits.float() * logit_scale if logits.dtype != torch.float64 else logits * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if num_items_in_batch is not None:
        return F.cross_entropy(z, labels, ignore_index=IGNORE, reduction="sum",
                               label_smoothing=label_smoothing) / num_items_in_batch
    return F.cross_entropy(z, labels, ignore_index=IGNORE, reduction=reduction,
                           label_smoothing=label_smoothing)


def _check_vjp_numerically(fn, inputs, eps=1e-6, trials=3):
    """gradcheck for backward passes that run once per forward (gradcheck runs several on one
    graph): for random v and u, <vjp(v), u> against the central difference of <v, fn> along u,
    with a fresh forward for each backward. fp64 inputs."""
    for _ in range(trials):
        out = fn(*inputs)
        v = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, v)
        directions = [torch.randn_like(t) for t in inputs]
        with torch.no_grad():
            plus = fn(*(t + eps * u for t, u in zip(inputs, directions)))
            minus = fn(*(t - eps * u for t, u in zip(inputs, directions)))
        numeric = ((plus - minus) * v).sum() / (2 * eps)
        analytic = sum((g * u).sum() for g, u in zip(grads, directions))
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def _op_loss(logits, labels, reduction, logit_scale=1.0, softcap=0.0, label_smoothing=0.0):
    """The loss through the registered op and its autograd formula."""
    lse, target = OPS.cross_entropy_fwd(logits, labels, 0, logits.shape[-1], IGNORE,
                                        logit_scale, softcap, label_smoothing)
    rows = lse - target
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / (labels != IGNORE).sum().clamp_min(1)


# --- reference against PyTorch (CPU) ------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("vocab", VOCABS)
def test_reference_matches_torch(vocab, reduction):
    logits = _logits(4, vocab).requires_grad_(True)
    labels = _labels(4, vocab)
    loss = cross_entropy(logits, labels, reduction=reduction)
    expected = _torch_loss(logits, labels, reduction)
    assert_close(loss, expected)
    grad_out = torch.randn_like(loss)
    grad, = torch.autograd.grad(loss, logits, grad_out)
    expected_grad, = torch.autograd.grad(expected, logits, grad_out)
    assert_close(grad, expected_grad)


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_settings_match_torch(reduction, settings):
    scale, cap, eps = settings
    logits = _logits(6, 1001, torch.float64).requires_grad_(True)
    labels = _labels(6, 1001, ignored=(1, 4))
    loss = cross_entropy(logits, labels, reduction=reduction, logit_scale=scale, softcap=cap,
                         label_smoothing=eps)
    expected = _torch_loss(logits, labels, reduction, scale, cap, eps)
    assert_close(loss, expected)
    grad_out = torch.randn_like(loss)
    assert_close(torch.autograd.grad(loss, logits, grad_out)[0],
                 torch.autograd.grad(expected, logits, grad_out)[0])


@pytest.mark.parametrize("num_items", [7, torch.tensor(11), torch.tensor(5.0)])
def test_num_items_in_batch_divides_the_sum(num_items):
    logits = _logits(5, 64, torch.float64)
    labels = _labels(5, 64)
    loss = cross_entropy(logits, labels, num_items_in_batch=num_items)
    assert_close(loss, _torch_loss(logits, labels, num_items_in_batch=num_items))


def test_zero_denominator_is_one():
    logits = _logits(3, 16, torch.float64)
    labels = _labels(3, 16, ignored=())
    loss = cross_entropy(logits, labels, num_items_in_batch=0)
    assert_close(loss, _torch_loss(logits, labels, "sum"))


@pytest.mark.parametrize("num_items", [None, 0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored_gives_zero_loss_and_gradient(reduction, num_items):
    if num_items is not None and reduction != "mean":
        pytest.skip("num_items_in_batch goes with the mean")
    logits = _logits(4, 50).requires_grad_(True)
    labels = torch.full((4,), IGNORE)
    loss = cross_entropy(logits, labels, reduction=reduction, num_items_in_batch=num_items)
    assert torch.all(loss == 0)
    grad, = torch.autograd.grad(loss.sum(), logits)
    assert torch.all(grad == 0)
    assert torch.isnan(_torch_loss(logits, labels)), "PyTorch's mean of nothing is NaN"


def test_ignore_index_inside_the_vocabulary():
    logits = _logits(5, 40, torch.float64)
    labels = torch.tensor([3, 0, 7, 0, 39])
    loss = cross_entropy(logits, labels, ignore_index=0)
    assert_close(loss, F.cross_entropy(logits, labels, ignore_index=0))


def test_unchecked_invalid_label_gives_nan_row():
    logits = _logits(3, 20)
    labels = torch.tensor([1, 20, IGNORE])
    loss = cross_entropy(logits, labels, reduction="none", check_labels=False)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and loss[2] == 0


def test_window_statistics_merge_to_the_whole_row():
    logits = _logits(5, 300, torch.float64)
    labels = _labels(5, 300)
    settings = (IGNORE, 1.5, 20.0, 0.1)
    lse, target = cross_entropy_fwd_reference(logits, labels, 0, 300, *settings)
    windows = [(0, 128), (128, 256), (256, 300)]
    parts = [cross_entropy_fwd_reference(logits[:, a:b], labels, a, 300, *settings)
             for a, b in windows]
    merged = torch.logsumexp(torch.stack([p[0] for p in parts]), 0)
    valid = labels != IGNORE
    assert_close(merged[valid], lse[valid])
    assert_close(sum(p[1] for p in parts), target)
    g_lse, g_target = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    grad = cross_entropy_bwd_reference(g_lse, g_target, logits, labels, lse, 0, 300, *settings)
    for a, b in windows:
        part = cross_entropy_bwd_reference(g_lse, g_target, logits[:, a:b], labels, lse, a, 300,
                                           *settings)
        assert_close(part, grad[:, a:b])


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_backward_reference_is_the_vjp_of_the_forward(settings):
    logits = _logits(4, 37, torch.float64).requires_grad_(True)
    labels = _labels(4, 37)
    args = (IGNORE, *settings)
    lse, target = cross_entropy_fwd_reference(logits, labels, 5, 60, *args)
    g_lse, g_target = torch.randn_like(lse), torch.randn_like(target)
    expected, = torch.autograd.grad((lse, target), logits, (g_lse, g_target))
    grad = cross_entropy_bwd_reference(g_lse, g_target, logits.detach(), labels, lse.detach(), 5,
                                       60, *args)
    assert_close(grad, expected)


def test_fused_reference_writes_the_scaled_gradient():
    logits = _logits(4, 33, torch.float64)
    labels = _labels(4, 33)
    scale = torch.rand(4, dtype=torch.float64)
    leaf = logits.clone().requires_grad_(True)
    expected = _torch_loss(leaf, labels, "none", 1.0, 5.0, 0.1)
    expected_grad, = torch.autograd.grad(expected, leaf, scale)
    loss = cross_entropy_fwd_bwd_reference_(logits, labels, scale, IGNORE, 1.0, 5.0, 0.1)
    assert_close(loss, expected)
    assert_close(logits, expected_grad)


# --- the ops on CPU (registered reference kernels) -----------------------------------------------

@needs_extension
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_op_matches_torch_cpu(reduction):
    logits = _logits(5, 32001).requires_grad_(True)
    labels = _labels(5, 32001)
    loss = _op_loss(logits, labels, reduction, 1.0, 0.0, 0.1)
    expected = _torch_loss(logits, labels, reduction, label_smoothing=0.1)
    assert_close(loss, expected)
    grad_out = torch.randn_like(loss)
    assert_close(torch.autograd.grad(loss, logits, grad_out)[0],
                 torch.autograd.grad(expected, logits, grad_out)[0])


@needs_extension
@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_op_gradcheck_cpu(settings):
    logits = _logits(4, 9, torch.float64).requires_grad_(True)
    labels = _labels(4, 9)
    fwd = OPS.cross_entropy_fwd
    assert torch.autograd.gradcheck(lambda x: fwd(x, labels, 0, 9, IGNORE, *settings), (logits,))
    # Its backward overwrites the logits, so it runs once per forward.
    _check_vjp_numerically(
        lambda x: torch.stack(_CrossEntropyGradInLogits.apply(x * 1, labels, 0, 9, IGNORE,
                                                              *settings)), (logits,))


def _opcheck_args(device, dtype):
    rows, vocab = 6, 40
    logits = _logits(rows, vocab, dtype, device)
    labels = _labels(rows, vocab, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse = torch.rand(rows, dtype=acc, device=device) + 4
    g_lse, g_target = torch.randn(rows, dtype=acc, device=device), torch.randn(rows, dtype=acc,
                                                                               device=device)
    return logits, labels, lse, g_lse, g_target


def _opcheck_all(device, dtype):
    logits, labels, lse, g_lse, g_target = _opcheck_args(device, dtype)
    settings = (IGNORE, 1.5, 30.0, 0.1)
    torch.library.opcheck(OPS.cross_entropy_fwd.default,
                          (logits.requires_grad_(dtype != torch.bfloat16), labels, 0, 40,
                           *settings))
    logits = logits.detach()
    torch.library.opcheck(OPS.cross_entropy_fwd.default, (logits, labels, 8, 100, *settings))
    torch.library.opcheck(OPS.cross_entropy_bwd.default,
                          (g_lse, g_target, logits, labels, lse, 8, 100, *settings))
    torch.library.opcheck(OPS.cross_entropy_bwd_.default,
                          (g_lse, g_target, logits.clone(), labels, lse, 8, 100, *settings))
    torch.library.opcheck(OPS.cross_entropy_fwd_bwd_.default,
                          (logits.clone(), labels, g_lse, *settings))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_cpu(dtype):
    _opcheck_all("cpu", dtype)


# --- bad inputs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make,err,match", [
    (lambda: (torch.randn(3, 10), torch.tensor([1, 10, 2])), ValueError,
     r"labels\[1\] is 10; expected a class index in \[0, 10\) or ignore_index \(-100\)"),
    (lambda: (torch.randn(3, 10), torch.tensor([1, -1, 2])), ValueError, r"labels\[1\] is -1"),
    (lambda: (torch.randn(3, 10), torch.tensor([1, 2, 3], dtype=torch.int32)), TypeError,
     "labels has dtype torch.int32; expected torch.int64"),
    (lambda: (torch.randn(3, 10), torch.tensor([1, 2])), ValueError,
     r"labels has shape \(2,\), expected \(3,\)"),
    (lambda: (torch.randn(2, 3, 10), torch.zeros(3, 2, dtype=torch.long)), ValueError,
     "leading dimensions of logits"),
    (lambda: (torch.randn(0, 10), torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
    (lambda: (torch.ones(3, 10, dtype=torch.int32), torch.zeros(3, dtype=torch.long)),
     TypeError, "logits has dtype torch.int32"),
    (lambda: (torch.randn(3, 10), [1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(make, err, match):
    logits, labels = make()
    with pytest.raises(err, match=match):
        cross_entropy(logits, labels)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_label_check_started_early_raises_when_finished(device):
    good = torch.tensor([[1, -100], [9, 0]], device=device)
    finish = start_label_check(good, 10)
    assert finish() is None
    finish = start_label_check(torch.tensor([[1, -100], [10, 0]], device=device), 10)
    with pytest.raises(ValueError, match=r"labels\[1, 0\] is 10; expected a class index in "
                                         r"\[0, 10\) or ignore_index \(-100\)"):
        finish()


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction="avg"), "reduction is 'avg'"),
    (dict(reduction="sum", num_items_in_batch=3), "num_items_in_batch"),
    (dict(logit_scale=0.0), "logit_scale is 0.0"),
    (dict(softcap=-1.0), "softcap is -1.0"),
    (dict(label_smoothing=1.5), "label_smoothing is 1.5"),
])
def test_bad_settings_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]), **kwargs)


def test_inplace_backward_refuses_a_leaf():
    logits = torch.randn(2, 5, requires_grad=True)
    with pytest.raises(ValueError, match="not a leaf tensor"):
        cross_entropy(logits, torch.tensor([0, 1]), inplace_backward=True)


@pytest.mark.parametrize("make,err,match", [
    (lambda: (torch.randn(4, 8), torch.randn(10, 7), None), ValueError,
     r"weight has shape \(10, 7\), expected \(V, 8\)"),
    (lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.randn(9)), ValueError,
     r"bias has shape \(9,\), expected \(10,\)"),
    (lambda: (torch.randn(4, 8), torch.randn(10, 8, dtype=torch.float64), None), TypeError,
     "weight has dtype torch.float64 but hidden has dtype torch.float32"),
    (lambda: (torch.randn(0, 8), torch.randn(10, 8), None), ValueError, "hidden is empty"),
])
def test_linear_bad_inputs_raise_clear_errors(make, err, match):
    hidden, weight, bias = make()
    labels = torch.zeros(hidden.shape[:-1], dtype=torch.long)
    with pytest.raises(err, match=match):
        fused_linear_cross_entropy(hidden, weight, labels, bias)


def test_linear_bad_labels_and_chunk_bytes():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"labels\[3\] is 10"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="leading dimensions of hidden"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="chunk_bytes is 0"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 3]), chunk_bytes=0)


# --- fused linear + cross-entropy --------------------------------------------------------------

def test_chunk_shape():
    # 512 MiB of bf16 rows of 128256 logits: 2092 rows.
    assert chunk_shape(8192, 128256, 2, 512 << 20) == (2092, 128256)
    assert chunk_shape(100, 128256, 2, 512 << 20) == (100, 128256)
    # Too little for 128 whole rows: 128 rows of a window, a multiple of 64 columns.
    assert chunk_shape(8192, 128256, 2, 16 << 20) == (128, 65536)
    assert chunk_shape(50, 1000, 4, 4000) == (50, 64)


def _linear_inputs(shape, hidden_size, vocab, dtype, device, bias=False, ignored=(1,)):
    hidden = torch.randn(*shape, hidden_size, dtype=dtype, device=device)
    weight = torch.randn(vocab, hidden_size, dtype=dtype, device=device) / math.sqrt(hidden_size)
    b = torch.randn(vocab, dtype=dtype, device=device) if bias else None
    labels = _labels(math.prod(shape), vocab, device, ignored).view(shape)
    return hidden, weight, b, labels


def _linear_reference(hidden, weight, bias, labels, **kwargs):
    logits = F.linear(hidden, weight, bias)
    return _torch_loss(logits.view(-1, weight.shape[0]), labels.view(-1), **kwargs)


def _check_linear(hidden, weight, bias, labels, chunk_bytes, reduction="mean", grad_dtype=None,
                  **kwargs):
    """fused_linear_cross_entropy against matmul + F.cross_entropy: loss and every gradient."""
    leaves = [t.detach().requires_grad_(True) for t in (hidden, weight)]
    if bias is not None:
        leaves.append(bias.detach().requires_grad_(True))
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    loss = fused_linear_cross_entropy(leaves[0], leaves[1], labels,
                                      leaves[2] if bias is not None else None,
                                      reduction=reduction, chunk_bytes=chunk_bytes, **kwargs)
    expected = _linear_reference(ref_leaves[0], ref_leaves[1],
                                 ref_leaves[2] if bias is not None else None, labels,
                                 reduction=reduction, **kwargs)
    if reduction == "none":
        expected = expected.view(labels.shape)
    assert_close(loss, expected)
    grad_out = torch.rand_like(loss) + 0.5
    grads = torch.autograd.grad(loss, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, ref_leaves, grad_out)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e, dtype=grad_dtype)


def _chunkings(vocab: int, itemsize: int) -> dict:
    """chunk_bytes for more than MIN_CHUNK_ROWS (128) tokens: one chunk; whole rows 130 tokens at
    a time; 128 tokens at a time in windows of 64 columns."""
    return {"one chunk": None, "token chunks": 130 * vocab * itemsize,
            "vocab windows": 128 * 64 * itemsize}


CHUNKINGS = _chunkings(300, 8)
LINEAR_TOKENS = (3, 100)  # 300 tokens: 3 chunks of whole rows, or 3 x 5 windows


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_matches_matmul_and_torch_cpu(reduction, chunking):
    hidden, weight, bias, labels = _linear_inputs(LINEAR_TOKENS, 16, 300, torch.float64, "cpu",
                                                  bias=True, ignored=(1, 6, 140))
    _check_linear(hidden, weight, bias, labels, CHUNKINGS[chunking], reduction)


@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("chunking", ["token chunks", "vocab windows"])
def test_linear_settings_cpu(chunking, settings):
    scale, cap, eps = settings
    hidden, weight, bias, labels = _linear_inputs(LINEAR_TOKENS, 16, 300, torch.float64, "cpu")
    _check_linear(hidden, weight, bias, labels, CHUNKINGS[chunking], logit_scale=scale,
                  softcap=cap, label_smoothing=eps)
    _check_linear(hidden, weight, bias, labels, CHUNKINGS[chunking], num_items_in_batch=17,
                  logit_scale=scale, softcap=cap, label_smoothing=eps)


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_linear_frozen_weight_and_no_grad(chunking):
    hidden, weight, _, labels = _linear_inputs(LINEAR_TOKENS, 16, 300, torch.float64, "cpu")
    h = hidden.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, weight, labels, chunk_bytes=CHUNKINGS[chunking])
    expected = _linear_reference(h, weight, None, labels)
    assert_close(loss, expected)
    assert_close(torch.autograd.grad(loss, h)[0], torch.autograd.grad(expected, h)[0])
    with torch.no_grad():
        assert_close(fused_linear_cross_entropy(hidden, weight, labels,
                                                chunk_bytes=CHUNKINGS[chunking]), expected.detach())


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_linear_all_rows_ignored(chunking):
    hidden, weight, bias, _ = _linear_inputs(LINEAR_TOKENS, 16, 300, torch.float64, "cpu",
                                             bias=True)
    labels = torch.full(LINEAR_TOKENS, IGNORE)
    leaves = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    loss = fused_linear_cross_entropy(*leaves[:2], labels, leaves[2],
                                      chunk_bytes=CHUNKINGS[chunking])
    assert loss == 0
    assert all(torch.all(g == 0) for g in torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_gradcheck_cpu(reduction):
    hidden, weight, bias, labels = _linear_inputs((130,), 2, 70, torch.float64, "cpu",
                                                  bias=True)
    leaves = tuple(t.requires_grad_(True) for t in (hidden, weight, bias))
    # One chunk; chunks of 128 and 2 tokens, whole rows; the same in windows of 64 columns.
    for chunk_bytes in (None, 128 * 70 * 8, 128 * 64 * 8):
        def fn(h, w, b):
            return fused_linear_cross_entropy(h, w, labels, b, reduction=reduction, softcap=3.0,
                                              label_smoothing=0.1, chunk_bytes=chunk_bytes)
        if reduction == "none":
            assert torch.autograd.gradcheck(fn, leaves)
        else:  # the gradients come from the forward, once per forward
            _check_vjp_numerically(lambda *t: fn(*t).unsqueeze(0), leaves)


def test_linear_gradients_are_handed_out_once():
    hidden, weight, _, labels = _linear_inputs((6,), 8, 20, torch.float64, "cpu")
    loss = fused_linear_cross_entropy(hidden.requires_grad_(True), weight, labels)
    torch.autograd.grad(loss, hidden, retain_graph=True)
    with pytest.raises(RuntimeError, match="run the forward again"):
        torch.autograd.grad(loss, hidden)


# --- CUDA kernels --------------------------------------------------------------------------------

# (rows, vocab): one class; odd sizes (unaligned rows, row kernels); the cluster kernel's sizes,
# and more rows than clusters fit on the GPU at once (each cluster then takes several); past its
# capacity (row kernels again).
CUDA_SHAPES = [(3, 1), (7, 7), (5, 769), (9, 32001), (4, 32000), (1000, 32000), (3, 128256),
               (2, 256000), (3, 600000)]


def _cuda_case(rows, vocab, dtype, settings):
    logits = _logits(rows, vocab, dtype, "cuda")
    labels = _labels(rows, vocab, "cuda", ignored=(1,) if rows > 2 else ())
    return logits, labels, (IGNORE, *settings)


def _poison(logits):
    poison_cuda_allocator(4 * logits.numel() * logits.element_size())


@pytest.mark.cuda
@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_kernels_match_reference(shape, dtype, settings):
    logits, labels, args = _cuda_case(*shape, dtype, settings)
    vocab = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    _poison(logits)
    lse, target = OPS.cross_entropy_fwd(logits, labels, 0, vocab, *args)
    ref_lse, ref_target = cross_entropy_fwd_reference(logits, labels, 0, vocab, *args)
    assert_close(lse, ref_lse)
    assert_close(target, ref_target)
    oracle = cross_entropy_fwd_reference(logits.double(), labels, 0, vocab, *args)
    assert_no_worse_than_reference(lse - target, ref_lse - ref_target, oracle[0] - oracle[1])

    g_lse = torch.randn(shape[0], dtype=acc, device="cuda")
    g_target = torch.randn(shape[0], dtype=acc, device="cuda")
    ref_grad = cross_entropy_bwd_reference(g_lse, g_target, logits, labels, ref_lse, 0, vocab,
                                           *args)
    _poison(logits)
    grad = OPS.cross_entropy_bwd(g_lse, g_target, logits, labels, lse, 0, vocab, *args)
    assert_close(grad, ref_grad)
    in_place = logits.clone()
    OPS.cross_entropy_bwd_(g_lse, g_target, in_place, labels, lse, 0, vocab, *args)
    assert torch.equal(in_place, grad)

    scale = torch.rand(shape[0], dtype=acc, device="cuda") + 0.5
    fused = logits.clone()
    _poison(logits)
    loss = OPS.cross_entropy_fwd_bwd_(fused, labels, scale, *args)
    assert_close(loss, ref_lse - ref_target)
    assert_close(fused, cross_entropy_bwd_reference(scale, -scale, logits, labels, ref_lse, 0,
                                                    vocab, *args))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32001, 128256])
def test_kernels_on_vocabulary_windows(vocab, dtype):
    logits, labels, args = _cuda_case(6, vocab, dtype, (1.0, 30.0, 0.1))
    lse, target = OPS.cross_entropy_fwd(logits, labels, 0, vocab, *args)
    cut = [0, 1000, vocab // 2 + 3, vocab]
    parts = [OPS.cross_entropy_fwd(logits[:, a:b].contiguous(), labels, a, vocab, *args)
             for a, b in zip(cut, cut[1:])]
    valid = labels != IGNORE
    merged = torch.logsumexp(torch.stack([p[0] for p in parts]), 0)
    assert_close(merged[valid], lse[valid])
    assert_close(sum(p[1] for p in parts), target)
    ones = torch.ones_like(lse)
    grad = OPS.cross_entropy_bwd(ones, -ones, logits, labels, lse, 0, vocab, *args)
    for a, b in zip(cut, cut[1:]):
        window = logits[:, a:b].contiguous()
        OPS.cross_entropy_bwd_(ones, -ones, window, labels, lse, a, vocab, *args)
        assert_close(window, grad[:, a:b])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32001, 128256])
def test_kernels_strided_and_misaligned_logits(vocab, dtype):
    base = _logits(5, vocab + 24, dtype, "cuda")
    labels = _labels(5, vocab, "cuda")
    args = (IGNORE, 1.0, 0.0, 0.1)
    acc = torch.float32
    for logits in (base[:, :vocab], base[:, 3:vocab + 3]):
        lse, target = OPS.cross_entropy_fwd(logits, labels, 0, vocab, *args)
        ref_lse, ref_target = cross_entropy_fwd_reference(logits, labels, 0, vocab, *args)
        assert_close(lse, ref_lse)
        assert_close(target, ref_target)
        g = torch.randn(5, dtype=acc, device="cuda")
        ref_grad = cross_entropy_bwd_reference(g, -g, logits, labels, lse, 0, vocab, *args)
        assert_close(OPS.cross_entropy_bwd(g, -g, logits, labels, lse, 0, vocab, *args), ref_grad)
        view = base.clone()[:, logits.storage_offset():logits.storage_offset() + vocab]
        loss = OPS.cross_entropy_fwd_bwd_(view, labels, g, *args)
        assert_close(loss, ref_lse - ref_target)
        assert_close(view, cross_entropy_bwd_reference(g, -g, logits, labels, lse, 0, vocab,
                                                       *args))
    logits_3d = _logits(2 * 3, 1000, dtype, "cuda").view(2, 3, 1000)
    labels_3d = _labels(6, 1000, "cuda").view(2, 3)
    assert_close(OPS.cross_entropy_fwd(logits_3d, labels_3d, 0, 1000, *args)[0],
                 cross_entropy_fwd_reference(logits_3d, labels_3d, 0, 1000, *args)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_matches_transformers_loss(dtype, reduction, inplace):
    vocab = 128256
    logits = _logits(16, vocab, dtype, "cuda").requires_grad_(True)
    labels = _labels(16, vocab, "cuda", ignored=(1, 5, 6))
    computed = logits * 1  # the in-place backward writes over a computed tensor
    loss = cross_entropy(computed, labels, reduction=reduction, inplace_backward=inplace)
    expected = _torch_loss(logits, labels, reduction)
    assert_close(loss, expected, dtype=torch.float32)
    grad_out = torch.rand_like(loss) + 0.5
    grad, = torch.autograd.grad(loss, logits, grad_out)
    expected_grad, = torch.autograd.grad(expected, logits, grad_out)
    assert_close(grad, expected_grad)


@pytest.mark.cuda
@pytest.mark.parametrize("settings", SETTINGS, ids=SETTING_IDS)
def test_cross_entropy_gradcheck_cuda(settings):
    scale, cap, eps = settings
    logits = _logits(5, 13, torch.float64, "cuda").requires_grad_(True)
    labels = _labels(5, 13, "cuda")
    def fn(x, inplace):
        return cross_entropy(x * 1, labels, reduction="none", logit_scale=scale, softcap=cap,
                             label_smoothing=eps, inplace_backward=inplace)

    assert torch.autograd.gradcheck(lambda x: fn(x, False), (logits,))
    _check_vjp_numerically(lambda x: fn(x, True), (logits,))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_opcheck_cuda(dtype):
    _opcheck_all("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [32001, 128256])
def test_all_rows_ignored_cuda(vocab):
    logits = _logits(4, vocab, torch.bfloat16, "cuda").requires_grad_(True)
    labels = torch.full((4,), IGNORE, device="cuda")
    loss = cross_entropy(logits * 1, labels)
    assert loss.item() == 0
    assert torch.all(torch.autograd.grad(loss, logits)[0] == 0)
    fused = logits.detach().clone()
    loss = OPS.cross_entropy_fwd_bwd_(fused, labels, torch.ones(4, device="cuda"), IGNORE, 1.0,
                                      0.0, 0.0)
    assert torch.all(loss == 0) and torch.all(fused == 0)


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [32001, 128256])
def test_invalid_labels_cuda(vocab):
    logits = _logits(3, vocab, torch.bfloat16, "cuda")
    labels = torch.tensor([1, vocab, IGNORE], device="cuda")
    with pytest.raises(ValueError, match=f"labels\\[1\\] is {vocab}"):
        cross_entropy(logits, labels)
    loss = cross_entropy(logits, labels, reduction="none", check_labels=False)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1]) and loss[2] == 0
    fused = logits.clone()
    loss = OPS.cross_entropy_fwd_bwd_(fused, labels, torch.ones(3, device="cuda"), IGNORE, 1.0,
                                      0.0, 0.0)
    assert torch.isnan(loss[1]) and torch.isnan(fused[1]).all() and torch.isfinite(fused[0]).all()


@pytest.mark.cuda
def test_kernel_bad_inputs():
    logits = torch.randn(4, 64, device="cuda")
    labels = torch.zeros(4, dtype=torch.long, device="cuda")
    args = (0, 64, IGNORE, 1.0, 0.0, 0.0)
    fwd = OPS.cross_entropy_fwd
    with pytest.raises(ValueError, match="labels is on cpu but logits is on cuda"):
        fwd(logits, labels.cpu(), *args)
    with pytest.raises(ValueError, match="logits is on cpu; this kernel needs a CUDA tensor"):
        fwd(logits.cpu(), labels, *args)
    with pytest.raises(TypeError, match="labels has dtype Int; expected int64"):
        fwd(logits, labels.int(), *args)
    with pytest.raises(ValueError, match=r"labels has shape \[3\], expected \[4\]"):
        fwd(logits, labels[:3], *args)
    with pytest.raises(ValueError, match="empty"):
        fwd(logits[:0], labels[:0], *args)
    with pytest.raises(ValueError, match="logit_scale is 0"):
        fwd(logits, labels, 0, 64, IGNORE, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"columns \[10, 74\) are not inside a vocabulary of 64"):
        fwd(logits, labels, 10, 64, IGNORE, 1.0, 0.0, 0.0)
    lse, _ = fwd(logits, labels, *args)
    with pytest.raises(TypeError, match="grad_lse has dtype Half, expected Float"):
        OPS.cross_entropy_bwd(lse.half(), lse, logits, labels, lse, *args)
    with pytest.raises(ValueError, match="must be at one constant stride"):
        OPS.cross_entropy_bwd_(lse, lse, torch.randn(64, 4, device="cuda").t(), labels, lse,
                               *args)
    with pytest.raises(ValueError, match="grad_scale has shape"):
        OPS.cross_entropy_fwd_bwd_(logits.clone(), labels, lse[:2], IGNORE, 1.0, 0.0, 0.0)


@pytest.mark.cuda
def test_kernels_over_2_pow_31_elements():
    vocab = 128256
    rows = (1 << 31) // vocab + 3
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    labels = _labels(rows, vocab, "cuda")
    args = (IGNORE, 1.0, 0.0, 0.0)
    tail = slice(rows - 4, rows)
    lse, target = OPS.cross_entropy_fwd(logits, labels, 0, vocab, *args)
    ref_lse, ref_target = cross_entropy_fwd_reference(logits[tail], labels[tail], 0, vocab, *args)
    assert_close(lse[tail], ref_lse)
    assert_close(target[tail], ref_target)
    expected_grad = cross_entropy_bwd_reference(torch.ones(4, device="cuda"),
                                                -torch.ones(4, device="cuda"), logits[tail],
                                                labels[tail], ref_lse, 0, vocab, *args)
    loss = OPS.cross_entropy_fwd_bwd_(logits, labels, torch.ones(rows, device="cuda"), *args)
    assert_close(loss[tail], ref_lse - ref_target)
    assert_close(logits[tail], expected_grad)


@pytest.mark.cuda
def test_kernel_runs_and_disable_switch(monkeypatch):
    logits = _logits(8, 1000, torch.bfloat16, "cuda")
    labels = _labels(8, 1000, "cuda")
    with torch.profiler.profile() as prof:
        cross_entropy(logits, labels)
    assert any("unsloth_ext::cross_entropy_fwd" in e.name for e in prof.events())
    monkeypatch.setenv("UNSLOTH_EXT_DISABLE", "cross_entropy")
    with torch.profiler.profile() as prof:
        loss = cross_entropy(logits, labels)
    assert not any("unsloth_ext::" in e.name for e in prof.events())
    assert_close(loss, cross_entropy_reference(logits, labels))


@pytest.mark.cuda
def test_torch_compile_traces_the_op():
    logits = _logits(8, 1000, torch.bfloat16, "cuda")
    labels = _labels(8, 1000, "cuda")
    compiled = torch.compile(lambda x, y: cross_entropy(x, y, check_labels=False) * 2,
                             fullgraph=True)
    assert_close(compiled(logits, labels), cross_entropy_reference(logits, labels) * 2)




@pytest.mark.cuda
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_matches_matmul_and_torch_cuda_fp32(reduction, chunking):
    hidden, weight, bias, labels = _linear_inputs((2, 150), 64, 32001, torch.float32, "cuda",
                                                  bias=True, ignored=(1, 7, 200))
    _check_linear(hidden, weight, bias, labels, _chunkings(32001, 4)[chunking], reduction,
                  softcap=30.0, label_smoothing=0.1)


@pytest.mark.cuda
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("vocab", [32001, 128256])
def test_linear_bf16_no_worse_than_transformers(vocab, chunking):
    hidden, weight, _, labels = _linear_inputs((300,), 256, vocab, torch.bfloat16, "cuda",
                                               ignored=(1, 7, 200))
    h, w = hidden.requires_grad_(True), weight.requires_grad_(True)
    loss = fused_linear_cross_entropy(h, w, labels,
                                      chunk_bytes=_chunkings(vocab, 2)[chunking])
    stock = _linear_reference(h, w, None, labels)
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (h, w))
    oracle = _linear_reference(h64, w64, None, labels)
    assert_no_worse_than_reference(loss, stock, oracle)
    grads = torch.autograd.grad(loss, (h, w))
    stock_grads = torch.autograd.grad(stock, (h, w))
    oracle_grads = torch.autograd.grad(oracle, (h64, w64))
    # dWeight adds one bf16 rounding per chunk.
    for g, s, o in zip(grads, stock_grads, oracle_grads):
        assert_no_worse_than_reference(g, s, o, slack=2e-3)
