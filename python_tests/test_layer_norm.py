import pytest
import torch
import torch.nn.functional as F

from helpers import (DTYPES, DTYPES_16, assert_close, assert_no_worse_than_reference,
                     ROW_SHAPES, needs_extension, poison_cuda_allocator)
from unsloth_ext.ops.layer_norm import (layer_norm, layer_norm_bwd_reference,
                                        layer_norm_fwd_reference, layer_norm_reference)

EPS = 1e-5
SHAPES = ROW_SHAPES


def _inputs(shape, dtype, device, w_dtype=None):
    # An offset mean, so that a naive E[x^2] - E[x]^2 variance would lose digits.
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 4.0
    w = torch.randn(shape[-1], dtype=w_dtype or dtype, device=device)
    b = torch.randn(shape[-1], dtype=w_dtype or dtype, device=device)
    return x, w, b


# --- reference (CPU, always) -------------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_reference_matches_torch(dtype, with_bias):
    x, w, b = _inputs((4, 5, 96), dtype, "cpu")
    b = b if with_bias else None
    assert_close(layer_norm(x, w, b, EPS), F.layer_norm(x, (96,), w, b, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_torch_module(dtype):
    module = torch.nn.LayerNorm(64, eps=EPS).to(dtype)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x = torch.randn(3, 7, 64, dtype=dtype)
    assert_close(layer_norm(x, module.weight, module.bias, EPS), module(x))
    no_bias = torch.nn.LayerNorm(64, eps=EPS, bias=False).to(dtype)
    assert_close(layer_norm(x, no_bias.weight, None, EPS), no_bias(x))


def test_reference_with_fp32_params_beside_bf16():
    x, w, b = _inputs((3, 64), torch.bfloat16, "cpu", w_dtype=torch.float32)
    out = layer_norm(x, w, b, EPS)
    assert out.dtype == torch.bfloat16
    assert_close(out, F.layer_norm(x, (64,), w, b, EPS))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_reference_matches_autograd(dtype, with_bias):
    x, w, b = _inputs((4, 3, 33), dtype, "cpu")
    leaves = [x.requires_grad_(True), w.requires_grad_(True)]
    if with_bias:
        leaves.append(b.requires_grad_(True))
    y = F.layer_norm(x, (33,), w, b if with_bias else None, EPS)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    _, mean, rstd = layer_norm_fwd_reference(x.detach(), w.detach(), None, EPS)
    rx, rw, rb = layer_norm_bwd_reference(dy, x.detach(), w.detach(), mean, rstd, with_bias)
    assert_close(rx, grads[0])
    assert_close(rw, grads[1])
    if with_bias:
        assert_close(rb, grads[2])
    else:
        assert rb is None


@needs_extension
@pytest.mark.parametrize("with_bias", [True, False])
def test_op_gradcheck_cpu(with_bias):
    x, w, b = _inputs((3, 7), torch.float64, "cpu")
    inputs = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    fwd = torch.ops.unsloth_ext.layer_norm_fwd
    if with_bias:
        assert torch.autograd.gradcheck(lambda a, c, d: fwd(a, c, d, EPS)[0], inputs)
    else:
        assert torch.autograd.gradcheck(lambda a, c: fwd(a, c, None, EPS)[0], inputs[:2])


def _opcheck_args(device, dtype, w_dtype=None):
    x, w, b = _inputs((3, 5, 40), dtype, device, w_dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dy = torch.randn(x.shape, dtype=dtype, device=device)
    mean = torch.randn(x.shape[:-1], dtype=acc, device=device)
    rstd = torch.rand(x.shape[:-1], dtype=acc, device=device) + 0.5
    return x, w, b, dy, mean, rstd


@needs_extension
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_cpu(dtype, with_bias):
    x, w, b, dy, mean, rstd = _opcheck_args("cpu", dtype)
    torch.library.opcheck(torch.ops.unsloth_ext.layer_norm_fwd.default,
                          (x.requires_grad_(dtype != torch.bfloat16), w,
                           b if with_bias else None, EPS))
    torch.library.opcheck(torch.ops.unsloth_ext.layer_norm_bwd.default,
                          (dy, x.detach(), w, mean, rstd, with_bias))


@pytest.mark.parametrize("make,err,match", [
    (lambda: (torch.randn(4, 8), torch.randn(7), None), ValueError, "weight has shape"),
    (lambda: (torch.randn(4, 8), torch.randn(8), torch.randn(2, 4)), ValueError,
     "bias has shape"),
    (lambda: (torch.randn(4, 8, dtype=torch.float16), torch.randn(8, dtype=torch.bfloat16), None),
     TypeError, "float16"),
    (lambda: (torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8),
              torch.randn(8, dtype=torch.bfloat16)), TypeError, "bias has dtype"),
    (lambda: (torch.randn(4, 8), torch.randn(8), torch.randn(8, device="meta")), ValueError,
     "bias is on meta"),
    (lambda: (torch.randn(0, 8), torch.randn(8), None), ValueError, "empty"),
    (lambda: (torch.randn(4, 0), torch.randn(0), None), ValueError, "empty"),
    (lambda: (torch.ones(4, 8, dtype=torch.int32), torch.randn(8), None), TypeError, "int32"),
    (lambda: (torch.randn(4, 8), [1.0] * 8, None), TypeError, "weight must be a torch.Tensor"),
])
def test_bad_inputs_raise_clear_errors(make, err, match):
    x, w, b = make()
    with pytest.raises(err, match=match):
        layer_norm(x, w, b)


def test_negative_eps_rejected():
    with pytest.raises(ValueError, match="eps"):
        layer_norm(torch.randn(2, 4), torch.randn(4), eps=-1.0)


# --- CUDA kernels ------------------------------------------------------------------------------

def _run_fwd(x, w, b):
    poison_cuda_allocator(4 * x.numel() * 4)
    return torch.ops.unsloth_ext.layer_norm_fwd(x, w, b, EPS)


def _run_bwd(dy, x, w, mean, rstd, with_bias):
    poison_cuda_allocator(4 * x.numel() * 4)
    return torch.ops.unsloth_ext.layer_norm_bwd(dy, x, w, mean, rstd, with_bias)


def _check_bwd(dx, dw, db, ref, dtype=None):
    rdx, rdw, rdb = ref
    assert_close(dx, rdx)
    # dW and db sum over every row: allow for the longer fp32 sums.
    assert_close(dw, rdw, dtype=dtype, scale=4.0)
    if rdb is None:
        assert db is None
    else:
        assert_close(db, rdb, dtype=dtype, scale=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype, with_bias):
    x, w, b = _inputs(shape, dtype, "cuda")
    b = b if with_bias else None
    y, mean, rstd = _run_fwd(x, w, b)
    ry, rmean, rrstd = layer_norm_fwd_reference(x, w, b, EPS)
    assert_close(y, ry)
    assert_close(mean, rmean, dtype=torch.float32)
    assert_close(rstd, rrstd, dtype=torch.float32)
    # Against fp64: no worse than PyTorch at the kernel's precision.
    oy, _, _ = layer_norm_fwd_reference(x.double(), w.double(),
                                        None if b is None else b.double(), EPS)
    assert_no_worse_than_reference(y, ry, oy)

    dy = torch.randn(y.shape, dtype=y.dtype, device="cuda")
    dx, dw, db = _run_bwd(dy, x, w, mean, rstd, with_bias)
    _check_bwd(dx, dw, db, layer_norm_bwd_reference(dy, x, w, rmean, rrstd, with_bias))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [769, 4096, 65537])
def test_kernel_rows_far_from_zero_mean(dtype, cols):
    # A row whose mean dwarfs its spread (odd rows, offset 1000) or that is constant (row 2)
    # loses its variance to cancellation in E[x^2] - mean^2: the kernel must take the exact pass
    # for those rows, beside rows of the same block that take the one-pass moments.
    # PyTorch's own fp32 statistics lose digits on such rows too: both are judged against fp64.
    x, w, b = _inputs((8, cols), dtype, "cuda")
    x[1::2] += 996.0
    x[2] = 5.0
    y, mean, rstd = _run_fwd(x, w, b)
    ry, _, _ = layer_norm_fwd_reference(x, w, b, EPS)
    oy, omean, orstd = layer_norm_fwd_reference(x.double(), w.double(), b.double(), EPS)
    assert_close(mean, omean.float(), dtype=torch.float32)
    assert_close(rstd, orstd.float(), dtype=torch.float32)
    assert_no_worse_than_reference(y, ry, oy)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("shape", [(5, 769), (8, 4096), (4, 5120), (2, 65537)], ids=str)
def test_kernel_fp32_params(shape, dtype):
    x, w, b = _inputs(shape, dtype, "cuda", w_dtype=torch.float32)
    y, mean, rstd = _run_fwd(x, w, b)
    ry, rmean, rrstd = layer_norm_fwd_reference(x, w, b, EPS)
    assert y.dtype == dtype
    assert_close(y, ry)
    dy = torch.randn(y.shape, dtype=y.dtype, device="cuda")
    dx, dw, db = _run_bwd(dy, x, w, mean, rstd, True)
    _check_bwd(dx, dw, db, layer_norm_bwd_reference(dy, x, w, rmean, rrstd, True), dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("hidden", [768, 4096, 5120])
def test_kernel_matches_torch_module(hidden):
    module = torch.nn.LayerNorm(hidden, eps=EPS).cuda().bfloat16()
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    x = torch.randn(2, 64, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer_norm(x, module.weight, module.bias, EPS)
    ref = module(x)
    assert_close(y, ref)
    dy = torch.randn_like(y)
    params = (x, module.weight, module.bias)
    grads = torch.autograd.grad(y, params, dy)
    ref_grads = torch.autograd.grad(ref, params, dy)
    assert_close(grads[0], ref_grads[0])
    # Judge the bf16 parameter gradients (long sums) against fp64, beside torch's own.
    leaves = [t.detach().double().requires_grad_(True) for t in params]
    oracle = torch.autograd.grad(F.layer_norm(leaves[0], (hidden,), leaves[1], leaves[2], EPS),
                                 leaves, dy.double())
    for ours, theirs, exact in zip(grads[1:], ref_grads[1:], oracle[1:]):
        assert_no_worse_than_reference(ours, theirs, exact)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_strided_inputs(dtype):
    base = torch.randn(6, 5, 3 * 1024, dtype=dtype, device="cuda") + 2.0
    x = base[..., 1024:2048]  # rows 3072 elements apart
    w = torch.randn(1024, dtype=dtype, device="cuda")
    b = torch.randn(1024, dtype=dtype, device="cuda")
    y, mean, rstd = _run_fwd(x, w, b)
    assert_close(y, layer_norm_fwd_reference(x, w, b, EPS)[0])
    dy = torch.randn(6, 5, 2048, dtype=dtype, device="cuda")[..., ::2]  # non-unit last stride
    dx, dw, db = _run_bwd(dy, x, w, mean, rstd, True)
    _check_bwd(dx, dw, db, layer_norm_bwd_reference(dy, x, w, mean, rstd, True))
    xt = torch.randn(1024, 12, dtype=dtype, device="cuda").t()  # transposed
    assert_close(_run_fwd(xt, w, None)[0], layer_norm_fwd_reference(xt, w, None, EPS)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 7), (4, 769), (2, 3, 64)], ids=str)
def test_kernel_gradcheck_fp64(shape, with_bias):
    x, w, b = _inputs(shape, torch.float64, "cuda")
    inputs = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))
    if with_bias:
        assert torch.autograd.gradcheck(lambda a, c, d: layer_norm(a, c, d, EPS), inputs)
    else:
        assert torch.autograd.gradcheck(lambda a, c: layer_norm(a, c, None, EPS), inputs[:2])


@pytest.mark.cuda
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                           (torch.float16, torch.float32), (torch.float64, None)])
def test_opcheck_cuda(dtype, w_dtype, with_bias):
    x, w, b, dy, mean, rstd = _opcheck_args("cuda", dtype, w_dtype)
    torch.library.opcheck(torch.ops.unsloth_ext.layer_norm_fwd.default,
                          (x.requires_grad_(dtype in (torch.float32, torch.float64)), w,
                           b if with_bias else None, EPS))
    torch.library.opcheck(torch.ops.unsloth_ext.layer_norm_bwd.default,
                          (dy, x.detach(), w, mean, rstd, with_bias))


@pytest.mark.cuda
def test_kernel_runs_and_disable_switch(monkeypatch):
    x, w, b = _inputs((16, 256), torch.bfloat16, "cuda")
    with torch.profiler.profile() as prof:
        layer_norm(x, w, b)
    assert any("unsloth_ext::layer_norm_fwd" in e.name for e in prof.events())
    monkeypatch.setenv("UNSLOTH_EXT_DISABLE", "layer_norm")
    with torch.profiler.profile() as prof:
        y = layer_norm(x, w, b)
    assert not any("unsloth_ext::" in e.name for e in prof.events())
    assert_close(y, layer_norm_reference(x, w, b))


@pytest.mark.cuda
def test_torch_compile_traces_the_op():
    x, w, b = _inputs((8, 512), torch.bfloat16, "cuda")
    compiled = torch.compile(lambda a, c, d: layer_norm(a, c, d) * 2, fullgraph=True)
    assert_close(compiled(x, w, b), layer_norm_reference(x, w, b) * 2)


@pytest.mark.cuda
def test_kernel_bad_inputs():
    fwd = torch.ops.unsloth_ext.layer_norm_fwd
    x = torch.randn(4, 64, device="cuda")
    w = torch.randn(64, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu"):
        fwd(x, torch.randn(64), None, EPS)
    with pytest.raises(ValueError, match="bias is on cpu"):
        fwd(x, w, torch.randn(64), EPS)
    with pytest.raises(ValueError, match="x is on cpu; this kernel needs a CUDA tensor"):
        fwd(torch.randn(4, 64), w, None, EPS)
    with pytest.raises(ValueError, match="expected \\[64\\]"):
        fwd(x, w, torch.randn(63, device="cuda"), EPS)
    with pytest.raises(TypeError, match="bias has dtype"):
        fwd(x.bfloat16(), w, w.bfloat16(), EPS)
    with pytest.raises(ValueError, match="empty"):
        fwd(torch.randn(0, 64, device="cuda"), w, None, EPS)
    with pytest.raises(ValueError, match="eps"):
        fwd(x, w, None, -1.0)
    y, mean, rstd = fwd(x, w, None, EPS)
    bwd = torch.ops.unsloth_ext.layer_norm_bwd
    with pytest.raises(TypeError, match="grad_y has dtype"):
        bwd(y.half(), x, w, mean, rstd, False)
    with pytest.raises(ValueError, match="grad_y has shape"):
        bwd(y[:2], x, w, mean, rstd, False)
    with pytest.raises(ValueError, match="mean has 3 elements"):
        bwd(y, x, w, mean[:3], rstd, False)
    with pytest.raises(TypeError, match="rstd has dtype"):
        bwd(y, x, w, mean, rstd.double(), False)


@pytest.mark.cuda
def test_kernel_over_2_pow_31_elements():
    cols = 4096
    rows = (1 << 31) // cols + 3
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    y, mean, rstd = torch.ops.unsloth_ext.layer_norm_fwd(x, w, b, EPS)
    tail = slice(rows - 5, rows)
    assert_close(y[tail], layer_norm_fwd_reference(x[tail], w, b, EPS)[0])
    dx, _, _ = torch.ops.unsloth_ext.layer_norm_bwd(y, x, w, mean, rstd, True)
    ref_dx = layer_norm_bwd_reference(y[tail], x[tail], w, mean[tail], rstd[tail], True)[0]
    assert_close(dx[tail], ref_dx)
