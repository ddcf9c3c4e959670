import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from helpers import (DTYPES, DTYPES_16, assert_close, assert_no_worse_than_reference,
                     ROW_SHAPES, needs_extension, poison_cuda_allocator)
from unsloth_ext._extension import STATE
from unsloth_ext.ops.add_rms_norm import (add_rms_norm, add_rms_norm_bwd_reference,
                                          add_rms_norm_fwd_reference, add_rms_norm_reference,
                                          rms_norm_and_residual)
from unsloth_ext.ops.rms_norm import rms_norm_reference

EPS = 1e-6
SHAPES = ROW_SHAPES


def _inputs(shape, dtype, device, w_dtype=None):
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 0.5
    r = torch.randn(shape, dtype=dtype, device=device) * 5
    w = torch.randn(shape[-1], dtype=w_dtype or dtype, device=device)
    return x, r, w


def _out_dtype(x, w, gemma):
    return x.dtype if gemma else torch.promote_types(x.dtype, w.dtype)


# --- reference (CPU, always) -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("module_cls,gemma", [(LlamaRMSNorm, False), (GemmaRMSNorm, True),
                                               (Gemma2RMSNorm, True)])
def test_reference_matches_transformers(module_cls, gemma, dtype):
    module = module_cls(96, eps=EPS).to(dtype)
    with torch.no_grad():
        module.weight.normal_()
    x, r, _ = _inputs((4, 5, 96), dtype, "cpu")
    # A decoder layer: residual = residual + sublayer_out; hidden = norm(residual).
    expected_residual = r + x
    y, residual_out = add_rms_norm(x, r, module.weight, EPS, gemma)
    torch.testing.assert_close(residual_out, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(y, module(expected_residual), atol=0, rtol=0)


@pytest.mark.parametrize("gemma", [False, True])
def test_reference_matches_transformers_with_fp32_weight(gemma):
    module = (GemmaRMSNorm if gemma else LlamaRMSNorm)(64, eps=EPS)
    with torch.no_grad():
        module.weight.normal_()
    x, r, _ = _inputs((3, 64), torch.bfloat16, "cpu")
    y, residual_out = add_rms_norm(x, r, module.weight, EPS, gemma)
    assert residual_out.dtype == torch.bfloat16
    assert y.dtype == module(x + r).dtype
    torch.testing.assert_close(y, module(x + r), atol=0, rtol=0)


@pytest.mark.parametrize("use_y,use_residual", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backward_reference_matches_autograd(dtype, gemma, use_y, use_residual):
    x, r, w = _inputs((4, 3, 33), dtype, "cpu")
    leaves = (x.requires_grad_(True), r.requires_grad_(True), w.requires_grad_(True))
    y, residual_out, rstd = add_rms_norm_fwd_reference(x, r, w, EPS, gemma)
    dy = torch.randn_like(y) if use_y else torch.zeros_like(y)
    dres = torch.randn_like(residual_out) if use_residual else None
    outputs, grads = [y], [dy]
    if dres is not None:
        outputs.append(residual_out)
        grads.append(dres)
    gx, gr, gw = torch.autograd.grad(outputs, leaves, grads)
    rx, rw = add_rms_norm_bwd_reference(dy, dres, residual_out.detach(), w.detach(),
                                        rstd.detach(), gemma)
    assert_close(rx, gx)
    assert_close(rx, gr)
    assert_close(rw, gw)


@needs_extension
@pytest.mark.parametrize("gemma", [False, True])
def test_op_gradcheck_cpu(gemma):
    x, r, w = _inputs((3, 7), torch.float64, "cpu")
    inputs = (x.requires_grad_(True), r.requires_grad_(True), w.requires_grad_(True))
    fwd = torch.ops.unsloth_ext.add_rms_norm_fwd
    # Both outputs, then each alone (the other's gradient arrives as None).
    assert torch.autograd.gradcheck(lambda a, b, c: fwd(a, b, c, EPS, gemma)[:2], inputs)
    assert torch.autograd.gradcheck(lambda a, b, c: fwd(a, b, c, EPS, gemma)[0], inputs)
    assert torch.autograd.gradcheck(lambda a, b, c: fwd(a, b, c, EPS, gemma)[1] * 1.5, inputs)


def _opcheck_args(device, dtype, gemma, w_dtype=None):
    x, r, w = _inputs((3, 5, 40), dtype, device, w_dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dy = torch.randn(x.shape, dtype=_out_dtype(x, w, gemma), device=device)
    dres = torch.randn(x.shape, dtype=dtype, device=device)
    rstd = torch.rand(x.shape[:-1], dtype=acc, device=device) + 0.5
    return x, r, w, dy, dres, rstd


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_y_pad_leaves_room_after_each_row(device, dtype):
    """y_pad: the same y and sum, y in the first columns of a wider allocation whose extra
    columns nothing writes; the op and its gradients pass opcheck with the padded layout."""
    x, r, w = _inputs((3, 5, 40), dtype, device)
    expected = add_rms_norm(x, r, w, EPS)
    y, s = add_rms_norm(x, r, w, EPS, y_pad=16)
    assert y.stride() == (5 * 56, 56, 1) and s.is_contiguous()
    assert torch.equal(y, expected[0]) and torch.equal(s, expected[1])
    if STATE.loaded:
        torch.library.opcheck(torch.ops.unsloth_ext.add_rms_norm_fwd.default,
                              (x.float().requires_grad_(), r.float().requires_grad_(), w.float(),
                               EPS, False, 8))
    with pytest.raises(ValueError, match="y_pad is 1.5"):
        add_rms_norm(x, r, w, EPS, y_pad=1.5)


@needs_extension
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_cpu(dtype, gemma):
    x, r, w, dy, dres, rstd = _opcheck_args("cpu", dtype, gemma)
    grad = dtype != torch.bfloat16
    torch.library.opcheck(torch.ops.unsloth_ext.add_rms_norm_fwd.default,
                          (x.requires_grad_(grad), r.requires_grad_(grad), w, EPS, gemma))
    bwd = torch.ops.unsloth_ext.add_rms_norm_bwd.default
    torch.library.opcheck(bwd, (dy, dres, x.detach(), w, rstd, gemma))
    torch.library.opcheck(bwd, (dy, None, x.detach(), w, rstd, gemma))


@pytest.mark.parametrize("make,err,match", [
    (lambda: (torch.randn(4, 8), torch.randn(4, 8), torch.randn(7)), ValueError,
     "expected \\(8,\\)"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 9), torch.randn(8)), ValueError,
     "residual has shape"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64), torch.randn(8)),
     TypeError, "residual has dtype"),
    (lambda: (torch.randn(4, 8), torch.randn(4, 8, device="meta"), torch.randn(8)), ValueError,
     "residual is on meta"),
    (lambda: (torch.randn(4, 8, dtype=torch.float16), torch.randn(4, 8, dtype=torch.float16),
              torch.randn(8, dtype=torch.bfloat16)), TypeError, "float16"),
    (lambda: (torch.randn(0, 8), torch.randn(0, 8), torch.randn(8)), ValueError, "empty"),
    (lambda: (torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32),
              torch.randn(8)), TypeError, "int32"),
])
def test_bad_inputs_raise_clear_errors(make, err, match):
    x, r, w = make()
    with pytest.raises(err, match=match):
        add_rms_norm(x, r, w)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_and_residual_is_the_norm_and_its_input(device, dtype):
    # A pre-norm block: y = norm(x) goes to the sublayer, x on as the residual. The gradient of
    # x from both uses is the sum of the two, as autograd forms it over rms_norm.
    x = (torch.randn(3, 37, 769, dtype=dtype, device=device) * 3).requires_grad_(True)
    w = torch.randn(769, dtype=dtype, device=device, requires_grad=True)
    y, residual = rms_norm_and_residual(x, w, EPS, y_pad=8)
    assert residual.data_ptr() == x.data_ptr() and torch.equal(residual, x)
    assert y.stride(-2) == 769 + 8
    ry = rms_norm_reference(x, w, EPS)
    assert_close(y, ry)
    dy, dres = torch.randn_like(ry), torch.randn_like(x)
    gx, gw = torch.autograd.grad((y, residual), (x, w), (dy, dres))
    rgx, rgw = torch.autograd.grad((ry, x), (x, w), (dy, dres))
    # The kernel rounds the sum once where autograd rounds the norm's gradient first: both are
    # judged against fp64.
    xd, wd = (t.detach().double().requires_grad_(True) for t in (x, w))
    ogx, ogw = torch.autograd.grad((rms_norm_reference(xd, wd, EPS), xd), (xd, wd),
                                   (dy.double(), dres.double()))
    assert_no_worse_than_reference(gx, rgx, ogx)
    assert_no_worse_than_reference(gw, rgw, ogw)
    if device == "cuda":
        xd, _, wd = _inputs((3, 2, 7), torch.float64, device)
        leaves = (xd.requires_grad_(True), wd.requires_grad_(True))
        assert torch.autograd.gradcheck(lambda a, b: rms_norm_and_residual(a, b, EPS), leaves)


def test_negative_eps_rejected():
    with pytest.raises(ValueError, match="eps"):
        add_rms_norm(torch.randn(2, 4), torch.randn(2, 4), torch.randn(4), eps=-1.0)


# --- CUDA kernels ------------------------------------------------------------------------------

def _run_fwd(x, r, w, gemma):
    poison_cuda_allocator(6 * x.numel() * 4)
    return torch.ops.unsloth_ext.add_rms_norm_fwd(x, r, w, EPS, gemma)


def _run_bwd(dy, dres, s, w, rstd, gemma):
    poison_cuda_allocator(6 * s.numel() * 4)
    return torch.ops.unsloth_ext.add_rms_norm_bwd(dy, dres, s, w, rstd, gemma)


@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype, gemma):
    x, r, w = _inputs(shape, dtype, "cuda")
    y, s, rstd = _run_fwd(x, r, w, gemma)
    ry, rs, rrstd = add_rms_norm_fwd_reference(x, r, w, EPS, gemma)
    torch.testing.assert_close(s, rs, atol=0, rtol=0)  # the same one rounding of x + r
    assert_close(y, ry)
    assert_close(rstd, rrstd, dtype=torch.float32)
    oy, _, _ = add_rms_norm_fwd_reference(x.double(), r.double(), w.double(), EPS, gemma)
    assert_no_worse_than_reference(y, ry, oy)

    dy = torch.randn(y.shape, dtype=y.dtype, device="cuda")
    for dres in (torch.randn_like(s), None):
        dx, dw = _run_bwd(dy, dres, s, w, rstd, gemma)
        rdx, rdw = add_rms_norm_bwd_reference(dy, dres, rs, w, rrstd, gemma)
        assert_close(dx, rdx)
        # dW sums over every row: allow for the longer fp32 sum.
        assert_close(dw, rdw, scale=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("shape", [(5, 769), (8, 4096), (4, 5120), (2, 65537)], ids=str)
def test_kernel_fp32_weight(shape, dtype, gemma):
    x, r, w = _inputs(shape, dtype, "cuda", w_dtype=torch.float32)
    y, s, rstd = _run_fwd(x, r, w, gemma)
    ry, rs, rrstd = add_rms_norm_fwd_reference(x, r, w, EPS, gemma)
    assert y.dtype == ry.dtype and s.dtype == dtype
    assert_close(y, ry, dtype=dtype)
    dy = torch.randn(y.shape, dtype=y.dtype, device="cuda")
    dres = torch.randn_like(s)
    dx, dw = _run_bwd(dy, dres, s, w, rstd, gemma)
    rdx, rdw = add_rms_norm_bwd_reference(dy, dres, rs, w, rrstd, gemma)
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
    r = torch.randn(2, 64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y, s = add_rms_norm(x, r, module.weight, EPS, gemma)
    ref_s = r + x
    ref_y = module(ref_s)
    torch.testing.assert_close(s, ref_s, atol=0, rtol=0)
    assert_close(y, ref_y)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    gx, gr, gw = torch.autograd.grad((y, s), (x, r, module.weight), (dy, ds))
    rgx, rgr, rgw = torch.autograd.grad((ref_y, ref_s), (x, r, module.weight), (dy, ds))
    assert torch.equal(gx, gr)
    # transformers rounds the norm's gradient to bf16 before adding ds, and rounds each dW
    # product before summing (this kernel rounds once): judge both against fp64.
    leaves = [t.detach().double().requires_grad_(True) for t in (x, r, module.weight)]
    oy, os_ = add_rms_norm_reference(*leaves, EPS, gemma)
    ogx, _, ogw = torch.autograd.grad((oy, os_), leaves, (dy.double(), ds.double()))
    assert_no_worse_than_reference(gx, rgx, ogx)
    assert_no_worse_than_reference(gr, rgr, ogx)
    assert_no_worse_than_reference(gw, rgw, ogw)


@pytest.mark.cuda
def test_kernel_unused_outputs_bring_no_gradient():
    x, r, w = _inputs((4, 256), torch.bfloat16, "cuda")
    leaves = (x.requires_grad_(True), r.requires_grad_(True), w.requires_grad_(True))
    # Only residual_out used (the last layer's stream): its gradient passes straight through.
    _, s = add_rms_norm(*leaves)
    ds = torch.randn_like(s)
    gx, gr, gw = torch.autograd.grad(s, leaves, ds, allow_unused=True)
    assert torch.equal(gx, ds) and torch.equal(gr, ds) and gw is None
    # Only y used.
    y, _ = add_rms_norm(*leaves)
    dy = torch.randn_like(y)
    gx, gr, gw = torch.autograd.grad(y, leaves, dy)
    _, s, rstd = add_rms_norm_fwd_reference(x.detach(), r.detach(), w.detach(), EPS, False)
    rdx, rdw = add_rms_norm_bwd_reference(dy, None, s, w.detach(), rstd, False)
    assert_close(gx, rdx)
    assert_close(gw, rdw, scale=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_strided_inputs(dtype):
    base = torch.randn(6, 5, 3 * 1024, dtype=dtype, device="cuda")
    x = base[..., 1024:2048]  # rows 3072 elements apart
    r = torch.randn(6, 5, 2048, dtype=dtype, device="cuda")[..., 512:1536]
    w = torch.randn(1024, dtype=dtype, device="cuda")
    y, s, rstd = _run_fwd(x, r, w, False)
    ry, rs, _ = add_rms_norm_fwd_reference(x, r, w, EPS, False)
    assert_close(y, ry)
    assert_close(s, rs)
    dy = torch.randn(6, 5, 2048, dtype=dtype, device="cuda")[..., ::2]  # non-unit last stride
    dres = torch.randn(5, 6, 1024, dtype=dtype, device="cuda").transpose(0, 1)
    dx, dw = _run_bwd(dy, dres, s, w, rstd, False)
    rdx, rdw = add_rms_norm_bwd_reference(dy, dres, s, w, rstd, False)
    assert_close(dx, rdx)
    assert_close(dw, rdw, scale=4.0)
    xt = torch.randn(1024, 12, dtype=dtype, device="cuda").t()  # transposed
    rt = torch.randn(12, 1024, dtype=dtype, device="cuda")
    assert_close(_run_fwd(xt, rt, w, True)[0], add_rms_norm_fwd_reference(xt, rt, w, EPS, True)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("shape", [(3, 7), (4, 769), (2, 3, 64)], ids=str)
def test_kernel_gradcheck_fp64(shape, gemma):
    x, r, w = _inputs(shape, torch.float64, "cuda")
    inputs = (x.requires_grad_(True), r.requires_grad_(True), w.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda a, b, c: add_rms_norm(a, b, c, EPS, gemma), inputs)
    assert torch.autograd.gradcheck(lambda a, b, c: add_rms_norm(a, b, c, EPS, gemma)[0], inputs)


@pytest.mark.cuda
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                           (torch.float16, torch.float32), (torch.float64, None)])
def test_opcheck_cuda(dtype, w_dtype, gemma):
    x, r, w, dy, dres, rstd = _opcheck_args("cuda", dtype, gemma, w_dtype)
    grad = dtype in (torch.float32, torch.float64)
    torch.library.opcheck(torch.ops.unsloth_ext.add_rms_norm_fwd.default,
                          (x.requires_grad_(grad), r.requires_grad_(grad), w, EPS, gemma))
    bwd = torch.ops.unsloth_ext.add_rms_norm_bwd.default
    torch.library.opcheck(bwd, (dy, dres, x.detach(), w, rstd, gemma))
    torch.library.opcheck(bwd, (dy, None, x.detach(), w, rstd, gemma))


@pytest.mark.cuda
def test_kernel_runs_and_disable_switch(monkeypatch):
    x, r, w = _inputs((16, 256), torch.bfloat16, "cuda")
    with torch.profiler.profile() as prof:
        add_rms_norm(x, r, w)
    assert any("unsloth_ext::add_rms_norm_fwd" in e.name for e in prof.events())
    monkeypatch.setenv("UNSLOTH_EXT_DISABLE", "add_rms_norm")
    with torch.profiler.profile() as prof:
        y, s = add_rms_norm(x, r, w)
    assert not any("unsloth_ext::" in e.name for e in prof.events())
    ry, rs = add_rms_norm_reference(x, r, w)
    assert_close(y, ry)
    assert_close(s, rs)


@pytest.mark.cuda
def test_torch_compile_traces_the_op():
    x, r, w = _inputs((8, 512), torch.bfloat16, "cuda")
    compiled = torch.compile(lambda a, b, c: add_rms_norm(a, b, c)[0] * 2, fullgraph=True)
    assert_close(compiled(x, r, w), add_rms_norm_reference(x, r, w)[0] * 2)


@pytest.mark.cuda
def test_kernel_bad_inputs():
    fwd = torch.ops.unsloth_ext.add_rms_norm_fwd
    x = torch.randn(4, 64, device="cuda")
    w = torch.randn(64, device="cuda")
    with pytest.raises(ValueError, match="residual is on cpu"):
        fwd(x, torch.randn(4, 64), w, EPS, False)
    with pytest.raises(ValueError, match="weight is on cpu"):
        fwd(x, x, torch.randn(64), EPS, False)
    with pytest.raises(ValueError, match="x is on cpu; this kernel needs a CUDA tensor"):
        fwd(torch.randn(4, 64), x, w, EPS, False)
    with pytest.raises(ValueError, match="residual has shape"):
        fwd(x, x[:, :32], w, EPS, False)
    with pytest.raises(TypeError, match="residual has dtype"):
        fwd(x, x.double(), w, EPS, False)
    with pytest.raises(ValueError, match="expected \\[64\\]"):
        fwd(x, x, torch.randn(63, device="cuda"), EPS, False)
    with pytest.raises(ValueError, match="empty"):
        fwd(torch.randn(0, 64, device="cuda"), torch.randn(0, 64, device="cuda"), w, EPS, False)
    y, s, rstd = fwd(x, x, w, EPS, False)
    bwd = torch.ops.unsloth_ext.add_rms_norm_bwd
    with pytest.raises(TypeError, match="grad_y has dtype"):
        bwd(y.half(), None, s, w, rstd, False)
    with pytest.raises(TypeError, match="grad_residual_out has dtype"):
        bwd(y, s.double(), s, w, rstd, False)
    with pytest.raises(ValueError, match="grad_residual_out has shape"):
        bwd(y, s[:2], s, w, rstd, False)
    with pytest.raises(ValueError, match="rstd has 2 elements"):
        bwd(y, None, s, w, rstd[:2], False)


@pytest.mark.cuda
def test_kernel_over_2_pow_31_elements():
    cols = 4096
    rows = (1 << 31) // cols + 3
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(cols, device="cuda", dtype=torch.bfloat16)
    y, s, rstd = torch.ops.unsloth_ext.add_rms_norm_fwd(x, r, w, EPS, False)
    tail = slice(rows - 5, rows)
    ry, rs, _ = add_rms_norm_fwd_reference(x[tail], r[tail], w, EPS, False)
    assert_close(y[tail], ry)
    assert_close(s[tail], rs)
    del x, r
    dx, _ = torch.ops.unsloth_ext.add_rms_norm_bwd(y, y, s, w, rstd, False)
    rdx, _ = add_rms_norm_bwd_reference(y[tail], y[tail], s[tail], w, rstd[tail], False)
    assert_close(dx[tail], rdx)
