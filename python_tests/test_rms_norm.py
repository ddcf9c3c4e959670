import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from helpers import (DTYPES, DTYPES_16, assert_close, assert_no_worse_than_reference,
                     ROW_SHAPES, needs_extension, poison_cuda_allocator)
from unsloth_ext import rms_norm
from unsloth_ext._extension import STATE
from unsloth_ext.ops.rms_norm import (rms_norm_bwd_reference, rms_norm_fwd_reference,
                                      rms_norm_reference)

EPS = 1e-6
SHAPES = ROW_SHAPES + [(2, 32776)]


def _inputs(shape, dtype, device, w_dtype=None):
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 0.5
    w = torch.randn(shape[-1], dtype=w_dtype or dtype, device=device)
    return x, w


# --- reference (CPU, always) -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("module_cls,gemma", [(LlamaRMSNorm, False), (GemmaRMSNorm, True),
                                               (Gemma2RMSNorm, True)])
def test_reference_matches_transformers(module_cls, gemma, dtype):
    module = module_cls(96, eps=EPS).to(dtype)
    with torch.no_grad():
        module.weight.normal_()
    x = torch.randn(4, 5, 96, dtype=dtype)
    torch.testing.assert_close(rms_norm(x, module.weight, EPS, gemma), module(x), atol=0, rtol=0)


@pytest.mark.parametrize("gemma", [False, True])
def test_reference_matches_transformers_with_fp32_weight(gemma):
    module = (GemmaRMSNorm if gemma else LlamaRMSNorm)(64, eps=EPS)
    with torch.no_grad():
        module.weight.normal_()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = rms_norm(x, module.weight, EPS, gemma)
    assert out.dtype == module(x).dtype
    torch.testing.assert_close(out, module(x), atol=0, rtol=0)


@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_reference_matches_autograd(gemma, dtype):
    x, w = _inputs((4, 3, 33), dtype, "cpu")
    x.requires_grad_(True)
    w.requires_grad_(True)
    y, rstd = rms_norm_fwd_reference(x, w, EPS, gemma)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    rx, rw = rms_norm_bwd_reference(dy, x.detach(), w.detach(), rstd.detach(), gemma)
    assert_close(rx, gx)
    assert_close(rw, gw)


@needs_extension
@pytest.mark.parametrize("gemma", [False, True])
def test_op_gradcheck_cpu(gemma):
    x, w = _inputs((3, 7), torch.float64, "cpu")
    x.requires_grad_(True)
    w.requires_grad_(True)
    fwd = torch.ops.unsloth_ext.rms_norm_fwd
    assert torch.autograd.gradcheck(lambda a, b: fwd(a, b, EPS, gemma)[0], (x, w))


def _opcheck_args(device, dtype, gemma, w_dtype=None):
    x, w = _inputs((3, 5, 40), dtype, device, w_dtype)
    y_dtype = dtype if gemma else torch.promote_types(dtype, w.dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dy = torch.randn(x.shape, dtype=y_dtype, device=device)
    rstd = torch.rand(x.shape[:-1], dtype=acc, device=device) + 0.5
    return x, w, dy, rstd


@needs_extension
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_cpu(dtype, gemma):
    x, w, dy, rstd = _opcheck_args("cpu", dtype, gemma)
    torch.library.opcheck(torch.ops.unsloth_ext.rms_norm_fwd.default,
                          (x.requires_grad_(dtype != torch.bfloat16), w, EPS, gemma))
    torch.library.opcheck(torch.ops.unsloth_ext.rms_norm_bwd.default, (dy, x.detach(), w, rstd, gemma))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_y_pad_leaves_room_after_each_row(device, dtype):
    """y_pad: the same values, in the first columns of a wider allocation whose extra columns
    nothing writes; the op and its gradients pass opcheck with the padded layout."""
    x, w = _inputs((3, 5, 40), dtype, device)
    expected = rms_norm(x, w, EPS)
    y = rms_norm(x, w, EPS, y_pad=24)
    assert y.stride() == (5 * 64, 64, 1)
    assert torch.equal(y, expected)
    padded = y.as_strided((3, 5, 64), y.stride())
    padded[..., 40:] = 7.0
    assert torch.equal(y, expected)
    if STATE.loaded:
        torch.library.opcheck(torch.ops.unsloth_ext.rms_norm_fwd.default,
                              (x.float().requires_grad_(), w.float(), EPS, False, 8))
    with pytest.raises(ValueError, match="y_pad is -1"):
        rms_norm(x, w, EPS, y_pad=-1)


@pytest.mark.parametrize("make,err,match", [
    (lambda: (torch.randn(4, 8), torch.randn(7)), ValueError, "expected \\(8,\\)"),
    (lambda: (torch.randn(4, 8), torch.randn(2, 4)), ValueError, "hidden size"),
    (lambda: (torch.randn(4, 8, dtype=torch.float16), torch.randn(8, dtype=torch.bfloat16)),
     TypeError, "float16"),
    (lambda: (torch.randn(0, 8), torch.randn(8)), ValueError, "empty"),
    (lambda: (torch.randn(4, 0), torch.randn(0)), ValueError, "empty"),
    (lambda: (torch.ones(4, 8, dtype=torch.int32), torch.randn(8)), TypeError, "int32"),
])
def test_bad_inputs_raise_clear_errors(make, err, match):
    x, w = make()
    with pytest.raises(err, match=match):
        rms_norm(x, w)


def test_negative_eps_rejected():
    with pytest.raises(ValueError, match="eps"):
        rms_norm(torch.randn(2, 4), torch.randn(4), eps=-1.0)


# --- CUDA kernels ------------------------------------------------------------------------------

def _run_fwd(x, w, gemma):
    poison_cuda_allocator(4 * x.numel() * 4)
    return torch.ops.unsloth_ext.rms_norm_fwd(x, w, EPS, gemma)


def _run_bwd(dy, x, w, rstd, gemma):
    poison_cuda_allocator(4 * x.numel() * 4)
    return torch.ops.unsloth_ext.rms_norm_bwd(dy, x, w, rstd, gemma)


@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype, gemma):
    x, w = _inputs(shape, dtype, "cuda")
    y, rstd = _run_fwd(x, w, gemma)
    ry, rrstd = rms_norm_fwd_reference(x, w, EPS, gemma)
    assert_close(y, ry)
    assert_close(rstd, rrstd, dtype=torch.float32)
    # Against fp64: no worse than PyTorch at the kernel's precision.
    oy, _ = rms_norm_fwd_reference(x.double(), w.double(), EPS, gemma)
    assert_no_worse_than_reference(y, ry, oy)

    dy = torch.randn(y.shape, dtype=y.dtype, device="cuda")
    dx, dw = _run_bwd(dy, x, w, rstd, gemma)
    rdx, rdw = rms_norm_bwd_reference(dy, x, w, rrstd, gemma)
    assert_close(dx, rdx)
    # dW sums over every row: allow for the longer fp32 sum.
    assert_close(dw, rdw, scale=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("shape", [(5, 769), (8, 4096), (2, 65537)], ids=str)
def test_kernel_fp32_weight(shape, dtype, gemma):
    x, w = _inputs(shape, dtype, "cuda", w_dtype=torch.float32)
    y, rstd = _run_fwd(x, w, gemma)
    ry, rrstd = rms_norm_fwd_reference(x, w, EPS, gemma)
    assert y.dtype == ry.dtype
    assert_close(y, ry, dtype=dtype)
    dy = torch.randn(y.shape, dtype=y.dtype, device="cuda")
    dx, dw = _run_bwd(dy, x, w, rstd, gemma)
    rdx, rdw = rms_norm_bwd_reference(dy, x, w, rrstd, gemma)
    assert_close(dx, rdx)
    # fp32 dW, but summed from values rounded to x's dtype (as transformers does).
    assert_close(dw, rdw, dtype=dtype, scale=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
def test_kernel_matches_transformers_modules(gemma):
    module = (GemmaRMSNorm if gemma else LlamaRMSNorm)(4096, eps=EPS).cuda().bfloat16()
    with torch.no_grad():
        module.weight.normal_()
    x = torch.randn(2, 64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = rms_norm(x, module.weight, EPS, gemma)
    ref = module(x)
    assert_close(y, ref)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, module.weight), dy)
    rgx, rgw = torch.autograd.grad(ref, (x, module.weight), dy)
    assert_close(gx, rgx)
    # transformers' dW rounds each product to bf16 before summing; judge both against fp64.
    x64 = x.detach().double().requires_grad_(True)
    w64 = module.weight.detach().double().requires_grad_(True)
    ogw, = torch.autograd.grad(rms_norm_reference(x64, w64, EPS, gemma), (w64,), dy.double())
    assert_no_worse_than_reference(gw, rgw, ogw)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_strided_inputs(dtype):
    base = torch.randn(6, 5, 3 * 1024, dtype=dtype, device="cuda")
    x = base[..., 1024:2048]  # rows 3072 elements apart
    w = torch.randn(1024, dtype=dtype, device="cuda")
    y, rstd = _run_fwd(x, w, False)
    assert_close(y, rms_norm_fwd_reference(x, w, EPS, False)[0])
    dy = torch.randn(6, 5, 2048, dtype=dtype, device="cuda")[..., ::2]  # non-unit last stride
    dx, dw = _run_bwd(dy, x, w, rstd, False)
    rdx, rdw = rms_norm_bwd_reference(dy, x, w, rstd, False)
    assert_close(dx, rdx)
    assert_close(dw, rdw, scale=4.0)
    xt = torch.randn(1024, 12, dtype=dtype, device="cuda").t()  # transposed
    assert_close(_run_fwd(xt, w, True)[0], rms_norm_fwd_reference(xt, w, EPS, True)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("shape", [(3, 7), (4, 769), (2, 3, 64)], ids=str)
def test_kernel_gradcheck_fp64(shape, gemma):
    x, w = _inputs(shape, torch.float64, "cuda")
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, EPS, gemma), (x, w))


@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                           (torch.float16, torch.float32), (torch.float64, None)])
def test_opcheck_cuda(dtype, w_dtype, gemma):
    x, w, dy, rstd = _opcheck_args("cuda", dtype, gemma, w_dtype)
    torch.library.opcheck(torch.ops.unsloth_ext.rms_norm_fwd.default,
                          (x.requires_grad_(dtype in (torch.float32, torch.float64)), w, EPS, gemma))
    torch.library.opcheck(torch.ops.unsloth_ext.rms_norm_bwd.default,
                          (dy, x.detach(), w, rstd, gemma))


@pytest.mark.cuda
def test_kernel_runs_and_disable_switch(monkeypatch):
    x, w = _inputs((16, 256), torch.bfloat16, "cuda")
    with torch.profiler.profile() as prof:
        rms_norm(x, w)
    assert any("unsloth_ext::rms_norm_fwd" in e.name for e in prof.events())
    monkeypatch.setenv("UNSLOTH_EXT_DISABLE", "rms_norm")
    with torch.profiler.profile() as prof:
        y = rms_norm(x, w)
    assert not any("unsloth_ext::" in e.name for e in prof.events())
    assert_close(y, rms_norm_reference(x, w))


@pytest.mark.cuda
def test_torch_compile_traces_the_op():
    x, w = _inputs((8, 512), torch.bfloat16, "cuda")
    compiled = torch.compile(lambda a, b: rms_norm(a, b) * 2, fullgraph=True)
    assert_close(compiled(x, w), rms_norm_reference(x, w) * 2)


@pytest.mark.cuda
def test_kernel_bad_inputs():
    fwd = torch.ops.unsloth_ext.rms_norm_fwd
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="weight is on cpu"):
        fwd(x, torch.randn(64), EPS, False)
    with pytest.raises(ValueError, match="x is on cpu; this kernel needs a CUDA tensor"):
        fwd(torch.randn(4, 64), torch.randn(64, device="cuda"), EPS, False)
    with pytest.raises(ValueError, match="expected \\[64\\]"):
        fwd(x, torch.randn(63, device="cuda"), EPS, False)
    with pytest.raises(TypeError, match="dtype"):
        fwd(x.half(), torch.randn(64, device="cuda", dtype=torch.bfloat16), EPS, False)
    with pytest.raises(ValueError, match="empty"):
        fwd(torch.randn(0, 64, device="cuda"), torch.randn(64, device="cuda"), EPS, False)
    y, rstd = fwd(x, torch.randn(64, device="cuda"), EPS, False)
    with pytest.raises(TypeError, match="grad_y has dtype"):
        torch.ops.unsloth_ext.rms_norm_bwd(y.half(), x, torch.randn(64, device="cuda"), rstd, False)


@pytest.mark.cuda
def test_kernel_over_2_pow_31_elements():
    cols = 4096
    rows = (1 << 31) // cols + 3
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    y, rstd = torch.ops.unsloth_ext.rms_norm_fwd(x, w, EPS, False)
    tail = slice(rows - 5, rows)
    assert_close(y[tail], rms_norm_fwd_reference(x[tail], w, EPS, False)[0])
    dx, _ = torch.ops.unsloth_ext.rms_norm_bwd(y, x, w, rstd, False)
    assert_close(dx[tail], rms_norm_bwd_reference(y[tail], x[tail], w, rstd[tail], False)[0])
