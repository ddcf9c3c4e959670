from dataclasses import dataclass

import pytest
import torch
from transformers.activations import ACT2FN

from helpers import (DTYPES, assert_close, assert_no_worse_than_reference, needs_extension,
                     poison_cuda_allocator)
from unsloth_ext.ops.glu import (geglu, geglu_backward_, geglu_bwd_reference, geglu_reference,
                                 swiglu, swiglu_backward_, swiglu_bwd_reference, swiglu_reference)

SHAPES = [(1,), (7,), (769,), (14336,), (65537,), (1, 1), (3, 7), (5, 769), (2, 3, 14336),
          (3, 1, 2, 65537)]
EPS32 = 2.0**-24


@dataclass(frozen=True)
class Glu:
    """One gated activation: its public functions, ops, references and transformers' act."""
    name: str  # "swiglu" or "geglu"
    approximate: str | None  # geglu's gelu form
    act2fn: str  # transformers' ACT2FN key

    def __str__(self):
        return self.act2fn

    @property
    def extra(self) -> tuple:
        return () if self.approximate is None else (self.approximate,)

    def op(self, direction: str):
        return getattr(torch.ops.unsloth_ext, f"{self.name}_{direction}")

    def fwd(self, e, g):
        return swiglu(e, g) if self.name == "swiglu" else geglu(e, g, self.approximate)

    def backward_(self, grad_h, e, g, store_h=False):
        if self.name == "swiglu":
            swiglu_backward_(grad_h, e, g, store_h=store_h)
        else:
            geglu_backward_(grad_h, e, g, self.approximate, store_h=store_h)

    def ref_fwd(self, e, g):
        return swiglu_reference(e, g) if self.name == "swiglu" else geglu_reference(
            e, g, self.approximate)

    def ref_bwd(self, grad_h, e, g):
        if self.name == "swiglu":
            return swiglu_bwd_reference(grad_h, e, g)
        return geglu_bwd_reference(grad_h, e, g, self.approximate)

    def transformers(self, e, g):
        return ACT2FN[self.act2fn](e) * g


GLUS = [Glu("swiglu", None, "silu"), Glu("geglu", "none", "gelu"),
        Glu("geglu", "tanh", "gelu_pytorch_tanh")]


def _inputs(shape, dtype, device):
    """e spread over the activation's whole curve (tails included), g and grad_h around 1."""
    e = torch.randn(shape, dtype=dtype, device=device) * 3
    g = torch.randn(shape, dtype=dtype, device=device)
    grad_h = torch.randn(shape, dtype=dtype, device=device)
    return e, g, grad_h


# --- reference (CPU, always) -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_reference_matches_transformers(glu, dtype):
    e, g, _ = _inputs((4, 5, 96), dtype, "cpu")
    expected = glu.transformers(e, g)
    torch.testing.assert_close(glu.ref_fwd(e, g), expected, atol=0, rtol=0)
    torch.testing.assert_close(glu.fwd(e, g), expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_backward_reference_matches_autograd(glu, dtype):
    e, g, grad_h = _inputs((4, 3, 33), dtype, "cpu")
    e.requires_grad_(True)
    g.requires_grad_(True)
    ge, gg = torch.autograd.grad(glu.transformers(e, g), (e, g), grad_h)
    re, rg = glu.ref_bwd(grad_h, e.detach(), g.detach())
    assert_close(re, ge)
    # grad_h * round(act(e)): the same single rounding as autograd's.
    torch.testing.assert_close(rg, gg, atol=0, rtol=0)


@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_backward_in_place_reference_cpu(glu):
    e, g, grad_h = _inputs((6, 40), torch.bfloat16, "cpu")
    re, rg = glu.ref_bwd(grad_h, e, g)
    rh = glu.ref_fwd(e, g)
    kept = grad_h.clone()
    glu.backward_(grad_h, e, g)
    assert torch.equal(e, re) and torch.equal(g, rg) and torch.equal(grad_h, kept)
    e, g, grad_h = _inputs((6, 40), torch.bfloat16, "cpu")
    re, rg = glu.ref_bwd(grad_h, e, g)
    rh = glu.ref_fwd(e, g)
    glu.backward_(grad_h, e, g, store_h=True)  # grad_h receives h
    assert torch.equal(e, re) and torch.equal(g, rg) and torch.equal(grad_h, rh)


@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_backward_in_place_into_halves_of_one_buffer_cpu(glu):
    fused = torch.randn(5, 2 * 24, dtype=torch.float32)
    e, g = fused[:, :24], fused[:, 24:]
    grad_h = torch.randn(5, 24)
    re, rg = glu.ref_bwd(grad_h, e, g)
    glu.backward_(grad_h, e, g)
    assert torch.equal(fused[:, :24], re) and torch.equal(fused[:, 24:], rg)


@needs_extension
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_op_gradcheck_cpu(glu):
    e, g, _ = _inputs((3, 7), torch.float64, "cpu")
    e.requires_grad_(True)
    g.requires_grad_(True)
    fwd = glu.op("fwd")
    assert torch.autograd.gradcheck(lambda a, b: fwd(a, b, *glu.extra), (e, g))


def _opcheck_all(glu, device, dtype):
    e, g, grad_h = _inputs((3, 5, 40), dtype, device)
    grad = dtype in (torch.float32, torch.float64)
    torch.library.opcheck(glu.op("fwd").default,
                          (e.clone().requires_grad_(grad), g.clone().requires_grad_(grad),
                           *glu.extra))
    torch.library.opcheck(glu.op("bwd").default, (grad_h, e, g, *glu.extra))
    torch.library.opcheck(glu.op("bwd_").default, (grad_h, e.clone(), g.clone(), *glu.extra))
    torch.library.opcheck(glu.op("bwd_").default,
                          (grad_h.clone(), e.clone(), g.clone(), *glu.extra), {"store_h": True})


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_opcheck_cpu(glu, dtype):
    _opcheck_all(glu, "cpu", dtype)


def _in_place_with(grad_h_is_e=False, g_is_e=False, expanded_e=False, expanded_grad_h=False):
    e, g = torch.randn(4, 8), torch.randn(4, 8)
    if expanded_e:
        e = torch.randn(4, 1).expand(4, 8)
    grad_h = torch.randn(4, 1).expand(4, 8) if expanded_grad_h else torch.randn(4, 8)
    swiglu_backward_(e if grad_h_is_e else grad_h, e, e if g_is_e else g,
                     store_h=expanded_grad_h)


@pytest.mark.parametrize("call,err,match", [
    pytest.param(lambda: swiglu(torch.randn(4, 8), torch.randn(4, 7)), ValueError,
                 "g has shape \\(4, 7\\), expected the shape of e", id="shape"),
    pytest.param(lambda: geglu(torch.randn(4, 8), torch.randn(4, 8).half()), TypeError,
                 "g has dtype torch.float16, expected the dtype of e", id="dtype"),
    pytest.param(lambda: swiglu(torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8)), TypeError,
                 "e has dtype torch.int32", id="int"),
    pytest.param(lambda: swiglu(torch.randn(0, 8), torch.randn(0, 8)), ValueError, "e is empty",
                 id="empty"),
    pytest.param(lambda: swiglu(torch.tensor(1.0), torch.tensor(2.0)), ValueError, "e is empty",
                 id="0-dim"),
    pytest.param(lambda: swiglu([1.0], torch.randn(1)), TypeError, "e must be a torch.Tensor",
                 id="not-a-tensor"),
    pytest.param(lambda: swiglu(torch.randn(4, 8), torch.randn(4, 8, device="meta")), ValueError,
                 "g is on meta but e is on cpu", id="device"),
    pytest.param(lambda: geglu(torch.randn(4, 8), torch.randn(4, 8), approximate="erf"),
                 ValueError, "approximate is 'erf'; expected 'none' or 'tanh'", id="approximate"),
    pytest.param(lambda: geglu_backward_(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8),
                                         approximate="sigmoid"), ValueError,
                 "approximate is 'sigmoid'", id="approximate-backward"),
    pytest.param(lambda: swiglu_backward_(torch.randn(4, 9), torch.randn(4, 8), torch.randn(4, 8)),
                 ValueError, "grad_h has shape \\(4, 9\\), expected the shape of e",
                 id="grad-shape"),
    pytest.param(lambda: swiglu_backward_(torch.randn(4, 8).double(), torch.randn(4, 8),
                                          torch.randn(4, 8)), TypeError,
                 "grad_h has dtype torch.float64", id="grad-dtype"),
    pytest.param(lambda: _in_place_with(g_is_e=True), ValueError, "e and g share memory",
                 id="in-place-e-is-g"),
    pytest.param(lambda: _in_place_with(grad_h_is_e=True), ValueError,
                 "e and grad_h share memory", id="in-place-grad-is-e"),
    pytest.param(lambda: _in_place_with(expanded_e=True), ValueError,
                 "e has elements that share memory", id="in-place-expanded"),
    pytest.param(lambda: _in_place_with(expanded_grad_h=True), ValueError,
                 "grad_h has elements that share memory", id="store-h-expanded"),
])
def test_bad_inputs_raise_clear_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()


# --- CUDA kernels ------------------------------------------------------------------------------

def _run(fn, *args):
    poison_cuda_allocator(16 * args[0].numel() * args[0].element_size())
    return fn(*args)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, dtype, glu):
    e, g, grad_h = _inputs(shape, dtype, "cuda")
    h = _run(glu.op("fwd"), e, g, *glu.extra)
    rh = glu.ref_fwd(e, g)
    assert_close(h, rh)
    assert_no_worse_than_reference(h, rh, glu.ref_fwd(e.double(), g.double()))

    ge, gg = _run(glu.op("bwd"), grad_h, e, g, *glu.extra)
    re, rg = glu.ref_bwd(grad_h, e, g)
    assert_close(ge, re)
    assert_close(gg, rg)
    oe, og = glu.ref_bwd(grad_h.double(), e.double(), g.double())
    assert_no_worse_than_reference(ge, re, oe)
    assert_no_worse_than_reference(gg, rg, og)

    # The in-place backward writes exactly the out-of-place values into e and g, and with store_h
    # exactly the forward's h into grad_h.
    e2, g2, h2 = e.clone(), g.clone(), grad_h.clone()
    glu.op("bwd_")(grad_h, e2, g2, *glu.extra)
    assert torch.equal(e2, ge) and torch.equal(g2, gg)
    e2, g2 = e.clone(), g.clone()
    glu.op("bwd_")(h2, e2, g2, *glu.extra, store_h=True)
    assert torch.equal(e2, ge) and torch.equal(g2, gg) and torch.equal(h2, h)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_kernel_fp32_error_against_fp64(glu):
    """fp32 math with CUDA's expf/erff/tanhf (2 ulp each): act(e) within 16 units of 2^-24 |e|
    and act'(e) within 16 units of 2^-24 (1 + |e|), about 8 ulp (the same formulas with PyTorch's
    fp32 functions on CPU stay within 2.4 and 1.8 units)."""
    e = torch.cat([torch.linspace(-12, 12, 100001, device="cuda"),
                   torch.randn(1 << 20, device="cuda") * 3])
    g, grad_h = torch.randn_like(e), torch.randn_like(e)
    h = glu.op("fwd")(e, g, *glu.extra).double()
    ge, gg = (t.double() for t in glu.op("bwd")(grad_h, e, g, *glu.extra))
    e64, g64, dh64 = e.double(), g.double(), grad_h.double()
    oh = glu.ref_fwd(e64, g64)
    oe, og = glu.ref_bwd(dh64, e64, g64)
    checks = {  # output: (kernel, fp64 oracle, allowed error in units of 2^-24)
        "h": (h, oh, 16 * e64.abs() * g64.abs() + oh.abs()),
        "grad_g": (gg, og, 16 * dh64.abs() * e64.abs() + og.abs()),
        "grad_e": (ge, oe, 16 * (dh64 * g64).abs() * (1 + e64.abs()) + 2 * oe.abs()),
    }
    for name, (got, oracle, allowed) in checks.items():
        worst = ((got - oracle).abs() / (EPS32 * allowed).clamp_min(1e-300)).max().item()
        assert worst <= 1, f"{name}: error {worst:.2f} times the bound"


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_kernel_matches_transformers_autograd(glu):
    e, g, grad_h = _inputs((2, 64, 1024), torch.bfloat16, "cuda")
    e.requires_grad_(True)
    g.requires_grad_(True)
    h, ref = glu.fwd(e, g), glu.transformers(e, g)
    assert_close(h, ref)
    grads = torch.autograd.grad(h, (e, g), grad_h)
    for got, expected in zip(grads, torch.autograd.grad(ref, (e, g), grad_h)):
        assert_close(got, expected)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols,width", [(769, 1538), (1032, 2064), (1030, 2064)],
                         ids=["elementwise", "vectors", "vectors+tail"])
def test_kernel_row_strided_views(glu, dtype, cols, width):
    """e and g as column blocks of one [tokens, width] buffer (a fused gate/up output), g starting
    at column width / 2: read in place, and written in place by the in-place backward."""
    fused = torch.randn(37, width, dtype=dtype, device="cuda") * 3
    e, g = fused[:, :cols], fused[:, width // 2:width // 2 + cols]
    grad_h = torch.randn(37, width, dtype=dtype, device="cuda")[:, width // 2:width // 2 + cols]
    assert_close(_run(glu.op("fwd"), e, g, *glu.extra), glu.ref_fwd(e, g))
    re, rg = glu.ref_bwd(grad_h, e, g)
    ge, gg = _run(glu.op("bwd"), grad_h, e, g, *glu.extra)
    assert_close(ge, re)
    assert_close(gg, rg)
    rh = glu.ref_fwd(e, g)
    untouched = fused[:, cols:width // 2].clone()
    glu.op("bwd_")(grad_h, e, g, *glu.extra, store_h=True)
    assert_close(fused[:, :cols], re)
    assert_close(fused[:, width // 2:width // 2 + cols], rg)
    assert_close(grad_h, rh)
    assert torch.equal(fused[:, cols:width // 2], untouched)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_kernel_row_strided_views_past_the_grid_rows(glu):
    """More strided rows than a grid has rows (65535): the blocks walk on to the rest."""
    fused = torch.randn(70001, 48, dtype=torch.bfloat16, device="cuda") * 3
    e, g, grad_h = fused[:, :10], fused[:, 16:26], fused[:, 32:42]
    assert_close(_run(glu.op("fwd"), e, g, *glu.extra), glu.ref_fwd(e, g))
    for got, ref in zip(_run(glu.op("bwd"), grad_h, e, g, *glu.extra),
                        glu.ref_bwd(grad_h, e, g)):
        assert_close(got, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_kernel_layouts_without_rows(glu):
    """Transposed operands and a non-unit last stride: copied, results still in place."""
    e = (torch.randn(96, 40, device="cuda") * 3).t()
    g = torch.randn(96, 40, device="cuda").t()
    grad_h = torch.randn(40, 192, device="cuda")[:, ::2]
    h = _run(glu.op("fwd"), e, g, *glu.extra)
    assert h.is_contiguous()
    assert_close(h, glu.ref_fwd(e, g))
    re, rg = glu.ref_bwd(grad_h, e, g)
    for got, ref in zip(_run(glu.op("bwd"), grad_h, e, g, *glu.extra), (re, rg)):
        assert got.is_contiguous()
        assert_close(got, ref)
    rh = glu.ref_fwd(e, g)
    glu.op("bwd_")(grad_h, e, g, *glu.extra, store_h=True)
    assert_close(e, re)
    assert_close(g, rg)
    assert_close(grad_h, rh)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [769, 65537])
def test_kernel_unaligned_views(glu, dtype, n):
    """Pointers off 16-byte alignment take the element-wise path."""
    e = (torch.randn(n + 1, dtype=dtype, device="cuda") * 3)[1:]
    g = torch.randn(n, dtype=dtype, device="cuda")  # aligned beside an unaligned e
    grad_h = torch.randn(n + 3, dtype=dtype, device="cuda")[3:]
    assert_close(_run(glu.op("fwd"), e, g, *glu.extra), glu.ref_fwd(e, g))
    re, rg = glu.ref_bwd(grad_h, e, g)
    ge, gg = _run(glu.op("bwd"), grad_h, e, g, *glu.extra)
    assert_close(ge, re)
    assert_close(gg, rg)
    glu.op("bwd_")(grad_h, e, g, *glu.extra)
    assert torch.equal(e, ge) and torch.equal(g, gg)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
@pytest.mark.parametrize("shape", [(3, 7), (4, 769), (2, 3, 64)], ids=str)
def test_kernel_gradcheck_fp64(glu, shape):
    e, g, _ = _inputs(shape, torch.float64, "cuda")
    e.requires_grad_(True)
    g.requires_grad_(True)
    assert torch.autograd.gradcheck(glu.fwd, (e, g))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_opcheck_cuda(glu, dtype):
    _opcheck_all(glu, "cuda", dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_kernel_runs_and_disable_switch(glu, monkeypatch):
    e, g, grad_h = _inputs((16, 256), torch.bfloat16, "cuda")
    with torch.profiler.profile() as prof:
        glu.fwd(e, g)
        glu.backward_(grad_h, e.clone(), g.clone())
    names = {ev.name for ev in prof.events()}
    assert f"unsloth_ext::{glu.name}_fwd" in names and f"unsloth_ext::{glu.name}_bwd_" in names
    monkeypatch.setenv("UNSLOTH_EXT_DISABLE", glu.name)
    e2, g2 = e.clone(), g.clone()
    with torch.profiler.profile() as prof:
        h = glu.fwd(e, g)
        glu.backward_(grad_h, e2, g2)
    assert not any("unsloth_ext::" in ev.name for ev in prof.events())
    assert_close(h, glu.ref_fwd(e, g))
    re, rg = glu.ref_bwd(grad_h, e, g)
    assert torch.equal(e2, re) and torch.equal(g2, rg)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_torch_compile_traces_the_op(glu):
    e, g, grad_h = _inputs((8, 512), torch.bfloat16, "cuda")
    compiled = torch.compile(lambda a, b: glu.fwd(a, b) * 2, fullgraph=True)
    assert_close(compiled(e, g), glu.ref_fwd(e, g) * 2)
    e.requires_grad_(True)
    got = torch.autograd.grad(compiled(e, g), e, grad_h)[0]
    assert_close(got, glu.ref_bwd(grad_h * 2, e.detach(), g)[0])


@pytest.mark.cuda
def test_kernel_bad_inputs():
    fwd, bwd_ = torch.ops.unsloth_ext.geglu_fwd, torch.ops.unsloth_ext.swiglu_bwd_
    e = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="g is on cpu but e is on cuda"):
        fwd(e, torch.randn(4, 64), "none")
    with pytest.raises(ValueError, match="e is on cpu; this kernel needs a CUDA tensor"):
        fwd(torch.randn(4, 64), e, "none")
    with pytest.raises(ValueError, match="expected the shape of e"):
        fwd(e, torch.randn(4, 63, device="cuda"), "none")
    with pytest.raises(TypeError, match="expected the dtype of e"):
        fwd(e, e.half(), "none")
    with pytest.raises(TypeError, match="e has dtype Int"):
        fwd(e.int(), e.int(), "none")
    with pytest.raises(ValueError, match="e is empty"):
        fwd(e[:0], e[:0], "none")
    with pytest.raises(ValueError, match="approximate is 'erf'; expected 'none' or 'tanh'"):
        fwd(e, e, "erf")
    with pytest.raises(TypeError, match="grad_h has dtype"):
        torch.ops.unsloth_ext.swiglu_bwd(e.half(), e, e)
    with pytest.raises(ValueError, match="e and g share memory"):
        bwd_(e.clone(), e, e)
    with pytest.raises(ValueError, match="e and grad_h share memory"):
        bwd_(e, e, e.clone())
    with pytest.raises(ValueError, match="e has elements that share memory"):
        bwd_(e, torch.randn(4, 1, device="cuda").expand(4, 64), e.clone())
    with pytest.raises(ValueError, match="grad_h has elements that share memory"):
        bwd_(torch.randn(4, 1, device="cuda").expand(4, 64), e.clone(), e.clone(), store_h=True)


@pytest.mark.cuda
@pytest.mark.parametrize("glu", GLUS, ids=str)
def test_kernel_over_2_pow_31_elements(glu):
    n = (1 << 31) + 8 * 3 + 5  # past 2^31, and a tail shorter than a vector
    e = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    h = glu.op("fwd")(e, g, *glu.extra)
    windows = [slice(0, 4096), slice((1 << 31) - 2048, (1 << 31) + 2048), slice(n - 4096, n)]
    for w in windows:
        assert_close(h[w], glu.ref_fwd(e[w], g[w]))
    refs = [glu.ref_bwd(h[w], e[w], g[w]) for w in windows]
    glu.op("bwd_")(h, e, g, *glu.extra)
    for w, (re, rg) in zip(windows, refs):
        assert_close(e[w], re)
        assert_close(g[w], rg)
    del e, g, h
    # Rows past 2^31 elements of a [rows, 2I] buffer: int64 row offsets.
    cols = 14336
    rows = (1 << 31) // cols + 3
    fused = torch.randn(rows, 2 * cols, device="cuda", dtype=torch.bfloat16)
    e, g = fused[:, :cols], fused[:, cols:]
    h = glu.op("fwd")(e, g, *glu.extra)
    tail = slice(rows - 5, rows)
    assert_close(h[tail], glu.ref_fwd(e[tail], g[tail]))
