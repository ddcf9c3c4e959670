"""LoRA autograd Functions against PEFT's LoraLayer on the same weights (torch.nn.Linear and
bitsandbytes Linear4bit bases), judged against fp64; fp64 gradchecks; saved-tensor accounting;
bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers.models.gemma.configuration_gemma import GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaMLP
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from helpers import poison_cuda_allocator, rel_error
from unsloth_ext import checkpointing, lora
from unsloth_ext.checkpointing import offloaded_checkpoint
from unsloth_ext.lora import (LoraParts, base_weight, clear_dequant_buffers, dropout_keep_mask,
                              lora_linear, lora_mlp, lora_parts, lora_qkv, matmul_lora)
from unsloth_ext.nf4 import NF4Weight, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit  # noqa: E402  (needs bitsandbytes)

ADAPTER = "default"
BATCH = (2, 7)  # X is [2, 7, H]: 14 tokens
# Plain Linear layers take odd sizes; NF4 needs out·in to be a multiple of its blocksize (64).
SHAPES = {"linear": dict(hidden=67, inter=131, q=96, kv=33),
          "nf4": dict(hidden=192, inter=131, q=128, kv=64)}
# Relative error (Frobenius) of PEFT against the fp64 oracle must stay below this: it shows the
# oracle computes what PEFT computes (same weights, same dropout masks).
SETUP_TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# fp32 adapters beside bf16 activations without autocast: PEFT runs the adapter in fp32, these
# Functions in bf16 (as under autocast); judged by a bf16 tolerance instead.
MIXED_TOLERANCE = 2e-2
CASES = [("linear", torch.float32), ("linear", torch.bfloat16), ("nf4", torch.bfloat16),
         ("nf4", torch.float16)]


# --- building PEFT layers ------------------------------------------------------------------

def _base(kind, in_features, out_features, dtype, bias, device="cpu"):
    """A frozen base layer with random weights: torch.nn.Linear, or bitsandbytes Linear4bit
    (NF4, double quantization) quantized from such a Linear."""
    linear = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    linear.requires_grad_(False)
    if kind == "linear":
        return linear.to(device)
    q = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=dtype,
                          compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False,
                                 quant_type="nf4", compress_statistics=True)
    if bias:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(device)


def _lora(base, r, alpha=None, dropout=0.0, rslora=False, adapter_dtype=None):
    """A PEFT LoRA layer over base with random lora_A and lora_B (PEFT starts B at zero)."""
    alpha = alpha or 2 * r
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=rslora)
    cls = LoraLinear4bit if isinstance(base, bnb.nn.Linear4bit) else LoraLinear
    layer = cls(base, ADAPTER, config=config, r=r, lora_alpha=alpha)
    dtype = adapter_dtype or (base.compute_dtype if isinstance(base, bnb.nn.Linear4bit)
                              else base.weight.dtype)
    device = base.weight.device
    layer.lora_A.to(device=device, dtype=dtype)
    layer.lora_B.to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.lora_A[ADAPTER].weight.normal_(std=1 / math.sqrt(layer.in_features))
        layer.lora_B[ADAPTER].weight.normal_(std=1 / math.sqrt(r))
    return layer


def _adapter(layer):
    return [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]


def _mlp(family, kind, dtype, r, device="cpu", dropout=0.0, adapter_dtype=None):
    """transformers' LlamaMLP/GemmaMLP with PEFT layers over the given base kind. family:
    "llama" (SwiGLU), "gemma" (GEGLU, tanh) or "gemma-erf" (GEGLU, exact)."""
    s = SHAPES[kind]
    sizes = dict(hidden_size=s["hidden"], intermediate_size=s["inter"], num_attention_heads=1,
                 num_key_value_heads=1)
    if family == "llama":
        module = LlamaMLP(LlamaConfig(**sizes))
    else:
        act = "gelu_pytorch_tanh" if family == "gemma" else "gelu"
        module = GemmaMLP(GemmaConfig(**sizes, hidden_act=act))
    for name, (i, o) in (("gate_proj", ("hidden", "inter")), ("up_proj", ("hidden", "inter")),
                         ("down_proj", ("inter", "hidden"))):
        base = _base(kind, s[i], s[o], dtype, False, device)
        setattr(module, name, _lora(base, r, dropout=dropout, adapter_dtype=adapter_dtype))
    return module


ACTIVATIONS = {"llama": ("swiglu", "none"), "gemma": ("geglu", "tanh"),
               "gemma-erf": ("geglu", "none")}


def _mlp_ours(module, family):
    activation, approximate = ACTIVATIONS[family]
    parts = [lora_parts(getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    return lambda X, masks=None: lora_mlp(X, *parts, activation, approximate, masks)


def _mlp_params(module):
    return [p for n in ("gate_proj", "up_proj", "down_proj") for p in _adapter(getattr(module, n))]


# --- the fp64 oracle ----------------------------------------------------------------------------

def _dense64(layer):
    """The base weight and bias of a PEFT layer in fp64, as the layer computes with them."""
    base = layer.get_base_layer()
    if isinstance(base, bnb.nn.Linear4bit):
        weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    else:
        weight = base.weight
    bias = None if base.bias is None else base.bias.double()
    return weight.double(), bias


def _oracle_linear(X, layer, A, B, keep=None, p=0.0):
    W, bias = _dense64(layer)
    Y = X @ W.T + (0 if bias is None else bias)
    if A is None:
        return Y
    Xd = X if keep is None else X * keep / (1 - p)
    return Y + layer.scaling[ADAPTER] * (Xd @ A.T) @ B.T


def _oracle_act(family, e):
    if family == "llama":
        return F.silu(e)
    return F.gelu(e, approximate="tanh" if family == "gemma" else "none")


def _oracle_mlp(X, module, family, params, keeps=(None, None, None), p=0.0):
    layers = [module.gate_proj, module.up_proj, module.down_proj]
    e = _oracle_linear(X, layers[0], *params[0:2], keeps[0], p)
    g = _oracle_linear(X, layers[1], *params[2:4], keeps[1], p)
    h = _oracle_act(family, e) * g
    return _oracle_linear(h, layers[2], *params[4:6], keeps[2], p)


def _leaves64(tensors):
    return [t.detach().double().requires_grad_(True) for t in tensors]


# --- comparison ---------------------------------------------------------------------------------

def _forward_backward(fn, X, params, dYs):
    """Outputs of fn(X) (a tensor or a tuple) and the gradients of X and params."""
    outs = fn(X)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, [X, *params], [dY.to(o.dtype) for o, dY in zip(outs, dYs)])
    return [o.detach() for o in outs] + list(grads)


def _assert_matches_peft(ours, peft, oracle, dtype, mixed=False):
    """Every output and gradient: our error against fp64 at most twice PEFT's (PEFT itself close
    to the oracle), in PEFT's dtype."""
    for i, (o, p, q) in enumerate(zip(ours, peft, oracle)):
        assert o.dtype == p.dtype and o.shape == p.shape, (i, o.dtype, p.dtype, o.shape, p.shape)
        peft_error, our_error = rel_error(p, q), rel_error(o, q)
        assert peft_error <= SETUP_TOLERANCE[dtype], f"tensor {i}: PEFT error {peft_error:.2e}"
        if mixed:
            assert our_error <= MIXED_TOLERANCE, f"tensor {i}: error {our_error:.2e}"
        else:
            assert our_error <= 2 * peft_error + 1e-6, (
                f"tensor {i}: error {our_error:.3e} vs PEFT {peft_error:.3e}")


def _compare(ours_fn, peft_fn, oracle_fn, X, params, out_shapes, dtype, mixed=False):
    """Run ours and PEFT on X (same params), and the fp64 oracle, with one random output
    gradient per output; compare."""
    # Values representable in dtype: the oracle sees exactly the gradients ours and PEFT see.
    dYs = [torch.randn(s, dtype=dtype, device=X.device).double() for s in out_shapes]
    peft = _forward_backward(peft_fn, X, params, dYs)
    ours = _forward_backward(ours_fn, X, params, dYs)
    X64, *p64 = _leaves64([X, *params])
    oracle = _forward_backward(lambda x: oracle_fn(x, p64), X64, p64, dYs)
    _assert_matches_peft(ours, peft, oracle, dtype, mixed)


def _X(hidden, dtype, device="cpu"):
    return torch.randn(*BATCH, hidden, dtype=dtype, device=device, requires_grad=True)


# --- single projection against PEFT -------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rank", [8, 16, 64, 128])
@pytest.mark.parametrize("kind,dtype", CASES, ids=str)
def test_linear_matches_peft(kind, dtype, rank, bias):
    s = SHAPES[kind]
    layer = _lora(_base(kind, s["hidden"], s["inter"], dtype, bias), rank)
    parts = lora_parts(layer)
    _compare(lambda X: lora_linear(X, parts), layer, lambda X, p: _oracle_linear(X, layer, *p),
             _X(s["hidden"], dtype), _adapter(layer), [(*BATCH, s["inter"])], dtype)


@pytest.mark.parametrize("kind,dtype", CASES, ids=str)
def test_matmul_lora_matches_peft(kind, dtype):
    s = SHAPES[kind]
    layer = _lora(_base(kind, s["hidden"], s["q"], dtype, True), 16)
    parts = lora_parts(layer)
    A, B = _adapter(layer)
    ours = lambda X: matmul_lora(X, parts.weight, A, B, parts.scaling, bias=parts.bias)  # noqa
    _compare(ours, layer, lambda X, p: _oracle_linear(X, layer, *p), _X(s["hidden"], dtype),
             [A, B], [(*BATCH, s["q"])], dtype)


@pytest.mark.parametrize("kind,dtype", CASES, ids=str)
def test_rslora_scaling(kind, dtype):
    s = SHAPES[kind]
    layer = _lora(_base(kind, s["hidden"], s["inter"], dtype, False), 64, alpha=16, rslora=True)
    parts = lora_parts(layer)
    assert parts.scaling == 16 / math.sqrt(64)
    _compare(lambda X: lora_linear(X, parts), layer, lambda X, p: _oracle_linear(X, layer, *p),
             _X(s["hidden"], dtype), _adapter(layer), [(*BATCH, s["inter"])], dtype)


@pytest.mark.parametrize("state", ["disabled", "merged", "disabled-after-merge"])
@pytest.mark.parametrize("kind,dtype", CASES[1:3], ids=str)
def test_disabled_and_merged_adapters_skip_lora(kind, dtype, state):
    s = SHAPES[kind]
    layer = _lora(_base(kind, s["hidden"], s["inter"], dtype, True), 16)
    if state in ("merged", "disabled-after-merge"):
        layer.merge()
    if state in ("disabled", "disabled-after-merge"):
        layer.enable_adapters(False)
    parts = lora_parts(layer)  # unmerges a disabled, merged layer as PEFT's forward does
    assert not parts.uses_lora
    assert parts.merged == (state == "merged") and parts.active == (state == "merged")
    X = _X(s["hidden"], dtype)
    ours, peft = lora_linear(X, parts), layer(X)
    W, bias = _dense64(layer)
    oracle = X.detach().double() @ W.T + bias
    assert rel_error(ours, oracle) <= 2 * rel_error(peft, oracle) + 1e-6
    dY = torch.randn_like(ours)
    (dx_ours,), (dx_peft,) = (torch.autograd.grad(y, X, dY) for y in (ours, peft))
    assert rel_error(dx_ours, dY.double() @ W) <= 2 * rel_error(dx_peft, dY.double() @ W) + 1e-6


def test_fp32_adapters_beside_bf16_activations():
    s = SHAPES["nf4"]
    layer = _lora(_base("nf4", s["hidden"], s["inter"], torch.bfloat16, True), 16,
                  adapter_dtype=torch.float32)
    parts = lora_parts(layer)
    _compare(lambda X: lora_linear(X, parts), layer, lambda X, p: _oracle_linear(X, layer, *p),
             _X(s["hidden"], torch.bfloat16), _adapter(layer), [(*BATCH, s["inter"])],
             torch.bfloat16, mixed=True)
    X = _X(s["hidden"], torch.bfloat16)
    grads = torch.autograd.grad(lora_linear(X, parts).sum(), [X, *_adapter(layer)])
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]


def test_fp32_adapters_are_copied_once_per_checkpointed_call(monkeypatch):
    # One bf16 copy of a call's fp32 adapters, with the A's of projections that share X stacked
    # as a view of it; an offloaded checkpoint's recompute reuses the forward's copy.
    s = SHAPES["nf4"]
    layers = [_lora(_base("nf4", s["hidden"], s[o], torch.bfloat16, False), r,
                    adapter_dtype=torch.float32) for o, r in (("q", 8), ("kv", 16), ("kv", 64))]
    parts = [lora_parts(layer) for layer in layers]
    params = _qkv_params(layers)
    X = _X(s["hidden"], torch.bfloat16)
    copies = []

    def spy(tensors, dtype):
        copies.append(real(tensors, dtype))
        return copies[-1]

    real = lora._adapter_copies
    monkeypatch.setattr(lora, "_adapter_copies", spy)

    def run(checkpointed):
        def qkv(x):
            return torch.cat(lora_qkv(x, *parts), -1)

        for t in (X, *params):
            t.grad = None
        Y = offloaded_checkpoint(qkv, X) if checkpointed else qkv(X)
        Y.float().square().sum().backward()  # the checkpoint accumulates into .grad
        return [t.grad for t in (X, *params)]

    plain = run(False)
    assert len(copies) == 1  # the backward uses the saved copy
    As, Bs = copies[0][:3], copies[0][3:]
    assert [c.dtype for c in copies[0]] == [torch.bfloat16] * 6
    assert torch.equal(torch.cat(As), torch.cat([p.to(torch.bfloat16) for p in params[0::2]]))
    assert all(torch.equal(b, p.to(torch.bfloat16)) for b, p in zip(Bs, params[1::2]))
    stacked = lora._stack(As, 0)
    assert stacked._base is As[0]._base and torch.equal(stacked, torch.cat(As))
    checkpointed = run(True)
    assert len(copies) == 3 and copies[2] is copies[1]  # forward, then the recompute's reuse
    for got, want in zip(checkpointed, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_offloaded_recompute_takes_the_rank_r_products_from_its_forward(monkeypatch):
    # Inside an offloaded checkpoint the forward keeps every s·D(X)·Aᵀ, with dropout or not, and
    # the MLP's s·D(h)·A_downᵀ for the recompute: the recompute (whose MLP skips its output) and
    # the backward run no more rank-r products than a run without checkpointing, and every
    # gradient is bitwise the same.
    hidden, inter, room = 64, 192, 16
    gen = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        return (torch.randn(*shape, generator=gen) / 8).requires_grad_(grad)

    X = t(14, hidden)
    Wq, Wk, Wv, Wg, Wu, Wd = (quantize_nf4(t(o, i, grad=False)) for o, i in (
        (hidden, hidden), (64, hidden), (64, hidden), (inter, hidden), (inter, hidden),
        (hidden, inter)))
    adapters = [t(*shape) for r in (4, 8, 4, 8, 4, 8) for shape in ((r, hidden), (hidden, r))]
    adapters[6:] = [t(8, hidden), t(inter, 8), t(4, hidden), t(inter, 4), t(8, inter),
                    t(hidden, 8)]
    products = []
    real = lora._scaled_mm

    def spy(a, b, *args, **kwargs):
        products.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(lora, "_scaled_mm", spy)

    def layer(x):
        aq, bq, ak, bk, av, bv, ag, bg, au, bu, ad, bd = adapters
        xw = F.pad(x, (0, room))[:, :hidden]  # scratch columns after each row
        q, k, v = lora_qkv(xw, LoraParts(Wq, None, aq, bq, 0.5),
                           LoraParts(Wk, None, ak, bk, 2.0, dropout_p=0.25),
                           LoraParts(Wv, None, av, bv, 2.0), spare_columns=room)
        u = F.pad(q * k.mean(-1, keepdim=True) + v.mean(), (0, room))[:, :hidden]
        return lora_mlp(u, LoraParts(Wg, None, ag, bg, 0.5), LoraParts(Wu, None, au, bu, 1.5),
                        LoraParts(Wd, None, ad, bd, 2.0), spare_columns=room,
                        compute_output=not checkpointing.recomputing(layer))

    def run(checkpointed):
        products.clear()
        torch.manual_seed(1)  # the same dropout mask in both runs
        for p in (X, *adapters):
            p.grad = None
        Y = offloaded_checkpoint(layer, X) if checkpointed else layer(X)
        Y.square().sum().backward()  # the checkpoint accumulates into .grad
        return list(products), [p.grad for p in (X, *adapters)]

    plain_products, plain = run(False)
    checkpointed_products, checkpointed = run(True)
    assert checkpointed_products == plain_products
    for got, want in zip(checkpointed, plain):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.cuda
def test_offloaded_mlp_recompute_takes_gate_and_up_from_the_stash(monkeypatch):
    # Inside an offloaded checkpoint the MLP's forward stashes e and g (or e only); the recompute
    # runs no GEMM for what it gets back, and every gradient is bitwise that of recomputing. (A
    # checkpoint follows, as the next layer would: the last one gets e and g from the device.)
    torch.manual_seed(0)
    hidden, inter = 128, 320

    def t(*shape, grad=True):
        return (torch.randn(*shape, device="cuda") / 8).to(torch.bfloat16).requires_grad_(grad)

    X = t(3, 5, hidden)
    Wg, Wu, Wd = (quantize_nf4(t(*shape, grad=False))
                  for shape in ((inter, hidden), (inter, hidden), (hidden, inter)))
    adapters = [t(4, hidden), t(inter, 4), t(8, hidden), t(inter, 8), t(4, inter), t(hidden, 4)]
    widths = []  # out features of each base GEMM run
    real = lora._project

    def spy(X, W, *args, **kwargs):
        widths.append(W.shape[0])
        return real(X, W, *args, **kwargs)

    monkeypatch.setattr(lora, "_project", spy)

    def mlp(x):
        ag, bg, au, bu, ad, bd = adapters
        return lora_mlp(x, LoraParts(Wg, None, ag, bg, 0.5), LoraParts(Wu, None, au, bu, 1.5),
                        LoraParts(Wd, None, ad, bd, 2.0))

    def grads(stash, last=False):
        before = checkpointing.configure_offload(stash=stash)
        try:
            widths.clear()
            for p in (X, *adapters):
                p.grad = None
            Y = offloaded_checkpoint(mlp, X)
            if not last:
                Y = offloaded_checkpoint(torch.mul, Y, 1.0)
            Y.float().square().sum().backward()
            return [p.grad for p in (X, *adapters)]
        finally:
            checkpointing.configure_offload(**before)

    recomputed = grads("off")
    assert widths == [inter, inter, hidden] * 2  # forward, recompute
    from_stash = grads(1)
    assert widths == [inter, inter, hidden, hidden]
    # A planner that keeps e only: the recompute runs the up GEMM, not the gate GEMM.
    monkeypatch.setattr(checkpointing._OFFLOADER.planner, "due", lambda stream, sizes: 1)
    e_from_stash = grads(1)
    assert widths == [inter, inter, hidden, inter, hidden]
    last = grads("off", last=True)
    assert widths == [inter, inter, hidden, hidden]
    for got, want, e_only, on_device in zip(from_stash, recomputed, e_from_stash, last):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(e_only, want, rtol=0, atol=0)
        torch.testing.assert_close(on_device, want, rtol=0, atol=0)


def _under_autocast(fn):
    def run(X):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(X)
    return run


@pytest.mark.parametrize("what", ["linear", "mlp"])
def test_autocast_matches_peft(what):
    """fp32 model, fp32 adapters, bf16 autocast (a Trainer with bf16=True)."""
    s = SHAPES["linear"]
    X = _X(s["hidden"], torch.float32)
    if what == "linear":
        layer = _lora(_base("linear", s["hidden"], s["inter"], torch.float32, True), 16)
        parts = lora_parts(layer)
        _compare(_under_autocast(lambda x: lora_linear(x, parts)), _under_autocast(layer),
                 lambda x, p: _oracle_linear(x, layer, *p), X, _adapter(layer),
                 [(*BATCH, s["inter"])], torch.bfloat16)
    else:
        module = _mlp("llama", "linear", torch.float32, 16)
        _compare(_under_autocast(_mlp_ours(module, "llama")), _under_autocast(module),
                 lambda x, p: _oracle_mlp(x, module, "llama", p), X, _mlp_params(module),
                 [(*BATCH, s["hidden"])], torch.bfloat16)


# --- QKV and MLP against PEFT -------------------------------------------------------------------

def _qkv_layers(kind, dtype, ranks=(8, 16, 64), bias=True, dropout=0.0, device="cpu"):
    s = SHAPES[kind]
    return [_lora(_base(kind, s["hidden"], s[o], dtype, bias, device), r, dropout=dropout)
            for o, r in zip(("q", "kv", "kv"), ranks)]


def _qkv_params(layers):
    return [p for layer in layers for p in _adapter(layer)]


def _qkv_oracle(layers, keeps=(None, None, None), p=0.0):
    return lambda X, w: tuple(_oracle_linear(X, layer, *w[2 * i:2 * i + 2], keeps[i], p)
                              for i, layer in enumerate(layers))


def _qkv_shapes(kind):
    s = SHAPES[kind]
    return [(*BATCH, s["q"]), (*BATCH, s["kv"]), (*BATCH, s["kv"])]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind,dtype", CASES, ids=str)
def test_qkv_matches_peft(kind, dtype, bias):
    layers = _qkv_layers(kind, dtype, bias=bias)
    parts = [lora_parts(layer) for layer in layers]
    _compare(lambda X: lora_qkv(X, *parts), lambda X: tuple(layer(X) for layer in layers),
             _qkv_oracle(layers), _X(SHAPES[kind]["hidden"], dtype), _qkv_params(layers),
             _qkv_shapes(kind), dtype)


@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("rank", [8, 64])
@pytest.mark.parametrize("family", ["llama", "gemma", "gemma-erf"])
@pytest.mark.parametrize("kind,dtype", CASES, ids=str)
def test_mlp_matches_peft(kind, dtype, family, rank, blocks, monkeypatch):
    if blocks == "several":
        monkeypatch.setattr(lora, "_MIN_BLOCK_ELEMENTS", 1)  # 14 rows in blocks of 4
    module = _mlp(family, kind, dtype, rank)
    s = SHAPES[kind]
    _compare(_mlp_ours(module, family), module,
             lambda X, p: _oracle_mlp(X, module, family, p), _X(s["hidden"], dtype),
             _mlp_params(module), [(*BATCH, s["hidden"])], dtype)


# --- dropout ------------------------------------------------------------------------------------

P = 0.25


def _masks(shapes, dtype, device="cpu"):
    return [dropout_keep_mask(shape, P, dtype, device) for shape in shapes]


def _seeded(fn, seed=1234):
    def run(X):
        torch.manual_seed(seed)
        return fn(X)
    return run


@pytest.mark.parametrize("kind,dtype", CASES, ids=str)
def test_dropout_seeded_run_matches_peft(kind, dtype):
    """Train mode, same seed: the masks drawn here are PEFT's masks."""
    s = SHAPES[kind]
    layer = _lora(_base(kind, s["hidden"], s["inter"], dtype, True), 16, dropout=P)
    parts = lora_parts(layer)
    assert parts.dropout_p == P
    torch.manual_seed(1234)
    (keep,) = _masks([(*BATCH, s["hidden"])], dtype)
    _compare(_seeded(lambda X: lora_linear(X, parts)), _seeded(layer),
             lambda X, p: _oracle_linear(X, layer, *p, keep, P), _X(s["hidden"], dtype),
             _adapter(layer), [(*BATCH, s["inter"])], dtype)


@pytest.mark.parametrize("kind,dtype", CASES, ids=str)
def test_dropout_seeded_qkv_matches_peft(kind, dtype):
    layers = _qkv_layers(kind, dtype, dropout=P)
    parts = [lora_parts(layer) for layer in layers]
    hidden = SHAPES[kind]["hidden"]
    torch.manual_seed(1234)
    keeps = _masks([(*BATCH, hidden)] * 3, dtype)
    _compare(_seeded(lambda X: lora_qkv(X, *parts)),
             _seeded(lambda X: tuple(layer(X) for layer in layers)),
             _qkv_oracle(layers, keeps, P), _X(hidden, dtype), _qkv_params(layers),
             _qkv_shapes(kind), dtype)


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("kind,dtype", CASES, ids=str)
def test_dropout_seeded_mlp_matches_peft(kind, dtype, family, monkeypatch):
    monkeypatch.setattr(lora, "_MIN_BLOCK_ELEMENTS", 1)
    module = _mlp(family, kind, dtype, 16, dropout=P)
    s = SHAPES[kind]
    torch.manual_seed(1234)
    keeps = _masks([(*BATCH, s["hidden"]), (*BATCH, s["hidden"]), (*BATCH, s["inter"])], dtype)
    _compare(_seeded(_mlp_ours(module, family)), _seeded(module),
             lambda X, p: _oracle_mlp(X, module, family, p, keeps, P), _X(s["hidden"], dtype),
             _mlp_params(module), [(*BATCH, s["hidden"])], dtype)


def test_dropout_fixed_masks_match_oracle():
    """Masks passed in (one projection with dropout, one without) give the oracle's answer."""
    layers = _qkv_layers("linear", torch.float64, bias=True)
    hidden = SHAPES["linear"]["hidden"]
    keeps = [torch.rand(*BATCH, hidden) > P, None, torch.rand(*BATCH, hidden) > 0.5]
    ps = [P, 0.0, 0.5]
    parts = [lora_parts(layer) for layer in layers]
    parts = [LoraParts(pt.weight, pt.bias, pt.lora_A, pt.lora_B, pt.scaling, p)
             for pt, p in zip(parts, ps)]
    X = _X(hidden, torch.float64)
    params = _qkv_params(layers)
    ours = lora_qkv(X, *parts, dropout_masks=keeps)
    for i, (y, layer) in enumerate(zip(ours, layers)):
        expected = _oracle_linear(X, layer, *params[2 * i:2 * i + 2], keeps[i], ps[i])
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_eval_mode_turns_dropout_off():
    s = SHAPES["linear"]
    layer = _lora(_base("linear", s["hidden"], s["inter"], torch.float32, False), 8, dropout=P)
    assert lora_parts(layer).dropout_p == P
    layer.eval()
    assert lora_parts(layer).dropout_p == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_keep_mask_is_nn_dropouts_mask(dtype):
    x = torch.rand(5, 33, dtype=dtype) + 0.5  # no zeros: nonzero outputs are the kept ones
    torch.manual_seed(7)
    expected = torch.nn.Dropout(P)(x) != 0
    torch.manual_seed(7)
    assert torch.equal(dropout_keep_mask(x.shape, P, dtype, "cpu"), expected)


# --- fp64 gradchecks ----------------------------------------------------------------------------

def _t(*shape, grad=True):
    return (0.5 * torch.randn(*shape, dtype=torch.float64)).requires_grad_(grad)


# The MLP's backward overwrites its saved e and g; gradcheck backpropagates one graph repeatedly,
# so each unpack hands out a copy.
_copy_on_unpack = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.clone())


def test_gradcheck_matmul_lora():
    X, W, A, B, bias = _t(2, 3, 9), _t(7, 9, grad=False), _t(3, 9), _t(7, 3), _t(7)
    keep = torch.rand(2, 3, 9) > 0.3
    assert torch.autograd.gradcheck(
        lambda x, a, b, c: matmul_lora(x, W, a, b, 0.7, keep, bias=c, dropout_p=0.3),
        (X, A, B, bias))


def test_gradcheck_lora_qkv():
    X = _t(5, 9)
    Ws = [_t(o, 9, grad=False) for o in (8, 4, 4)]
    tensors = [_t(2, 9), _t(8, 2), _t(8), _t(3, 9), _t(4, 3), _t(1, 9), _t(4, 1)]
    keep = torch.rand(5, 9) > 0.5

    def qkv(x, aq, bq, biasq, ak, bk, av, bv):
        q = LoraParts(Ws[0], biasq, aq, bq, 0.5)
        k = LoraParts(Ws[1], None, ak, bk, 2.0, dropout_p=0.5)
        v = LoraParts(Ws[2], None, av, bv, 1.0)
        return lora_qkv(x, q, k, v, [None, keep, None])

    assert torch.autograd.gradcheck(qkv, (X, *tensors))


@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("activation,approximate", [("swiglu", "none"), ("geglu", "none"),
                                                    ("geglu", "tanh")])
def test_gradcheck_lora_mlp(activation, approximate, blocks, monkeypatch):
    if blocks == "several":
        monkeypatch.setattr(lora, "_MIN_BLOCK_ELEMENTS", 1)
    X = _t(2, 3, 8)
    Wg, Wu, Wd = _t(11, 8, grad=False), _t(11, 8, grad=False), _t(8, 11, grad=False)
    tensors = [_t(3, 8), _t(11, 3), _t(2, 8), _t(11, 2), _t(3, 11), _t(8, 3), _t(8)]
    keeps = [None, torch.rand(2, 3, 8) > 0.3, torch.rand(2, 3, 11) > 0.5]

    def mlp(x, ag, bg, au, bu, ad, bd, bias_d):
        gate = LoraParts(Wg, None, ag, bg, 0.5)
        up = LoraParts(Wu, None, au, bu, 1.5, dropout_p=0.3)
        down = LoraParts(Wd, bias_d, ad, bd, 2.0, dropout_p=0.5)
        return lora_mlp(x, gate, up, down, activation, approximate, keeps)

    with _copy_on_unpack:
        assert torch.autograd.gradcheck(mlp, (X, *tensors))


def _makers(device, dtype):
    """t(*shape, grad=True): a random tensor; weight(*shape): a frozen one, NF4 on CUDA."""
    def t(*shape, grad=True):
        return (0.5 * torch.randn(*shape, device=device)).to(dtype).requires_grad_(grad)

    def weight(*shape):
        w = t(*shape, grad=False)
        return quantize_nf4(w) if device == "cuda" else w

    return t, weight


@pytest.mark.parametrize("frozen_down_A", [False, True])
@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64),
                                          pytest.param("cuda", torch.bfloat16,
                                                       marks=pytest.mark.cuda)])
def test_mlp_without_output_gives_the_same_gradients(device, dtype, blocks, frozen_down_A,
                                                     monkeypatch):
    """compute_output=False returns zeros and the gradients of the full computation (dropout on
    all three projections, a down bias; on CUDA with NF4 weights and the kernels)."""
    if blocks == "several":
        monkeypatch.setattr(lora, "_MIN_BLOCK_ELEMENTS", 1)
    torch.manual_seed(0)

    t, weight = _makers(device, dtype)
    hidden, inter = 64, 192
    X = t(2, 5, hidden)
    Wg, Wu, Wd = weight(inter, hidden), weight(inter, hidden), weight(hidden, inter)
    tensors = [t(3, hidden), t(inter, 3), t(2, hidden), t(inter, 2), t(4, inter, grad=False)
               if frozen_down_A else t(4, inter), t(hidden, 4), t(hidden)]
    keeps = [torch.rand(2, 5, hidden, device=device) > p for p in (0.2, 0.3)] + [
        torch.rand(2, 5, inter, device=device) > 0.5]
    dY = torch.randn(2, 5, hidden, device=device).to(dtype)

    def grads(compute_output):
        ag, bg, au, bu, ad, bd, bias_d = tensors
        gate = LoraParts(Wg, None, ag, bg, 0.5, dropout_p=0.2)
        up = LoraParts(Wu, None, au, bu, 1.5, dropout_p=0.3)
        down = LoraParts(Wd, bias_d, ad, bd, 2.0, dropout_p=0.5)
        Y = lora_mlp(X, gate, up, down, dropout_masks=keeps, compute_output=compute_output)
        inputs = [x for x in (X, *tensors) if x.requires_grad]
        return Y, torch.autograd.grad(Y, inputs, dY)

    Y, expected = grads(True)
    zeros, got = grads(False)
    assert Y.abs().sum() > 0 and torch.equal(zeros, torch.zeros_like(Y))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64),
                                          pytest.param("cuda", torch.bfloat16,
                                                       marks=pytest.mark.cuda)])
def test_mlp_adds_the_residual_in_its_down_projection(device, dtype, monkeypatch):
    """residual=R gives R + mlp(X) (the down projection's GEMMs add R, over several row blocks)
    and R's gradient is the output's; on CUDA with NF4 weights and the kernels."""
    monkeypatch.setattr(lora, "_MIN_BLOCK_ELEMENTS", 1)
    torch.manual_seed(0)

    t, weight = _makers(device, dtype)
    hidden, inter = 64, 192
    X, R = t(2, 5, hidden), t(2, 5, hidden)
    gate = LoraParts(weight(inter, hidden), None, t(3, hidden), t(inter, 3), 0.5)
    up = LoraParts(weight(inter, hidden), None, t(2, hidden), t(inter, 2), 1.5)
    down = LoraParts(weight(hidden, inter), None, t(4, inter), t(hidden, 4), 2.0)
    inputs = [X, R] + [t for p in (gate, up, down) for t in (p.lora_A, p.lora_B)]
    dY = torch.randn(2, 5, hidden, device=device).to(dtype)
    fused = lora_mlp(X, gate, up, down, residual=R)
    mlp = lora_mlp(X, gate, up, down)
    expected = R + mlp
    # The sums are rounded in other places: within a unit in the last place of their terms.
    ulp = torch.finfo(dtype).eps * (R.abs() + mlp.abs()).max().item()
    torch.testing.assert_close(fused, expected, rtol=0, atol=2 * ulp)
    got = torch.autograd.grad(fused, inputs, dY)
    for a, b in zip(got, torch.autograd.grad(expected, inputs, dY)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(got[1], dY)
    if device == "cpu":
        with _copy_on_unpack:
            assert torch.autograd.gradcheck(
                lambda x, r: lora_mlp(x, gate, up, down, residual=r), (X, R))
        # A residual in another dtype is added after the MLP, in the promoted dtype.
        wide = R.detach().float()
        out = lora_mlp(X.detach().float(), *(LoraParts(
            p.weight.float(), None, p.lora_A.detach().float(), p.lora_B.detach().float(),
            p.scaling) for p in (gate, up, down)), residual=wide.double())
        assert out.dtype == torch.float64
        with pytest.raises(ValueError, match="residual has shape \\(2, 3, 64\\), expected "
                                             "\\(2, 5, 64\\)"):
            lora_mlp(X, gate, up, down, residual=R[:, :3])


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32),
                                          pytest.param("cuda", torch.bfloat16,
                                                       marks=pytest.mark.cuda)])
def test_lora_terms_ride_in_the_base_gemms(device, dtype):
    """With scratch columns after X's rows (spare_columns, as the norms' y_pad leaves them),
    NF4 projections compute their LoRA term inside the base GEMM: the columns then hold each
    s·X·Aᵀ, outputs match the separate products' within rounding and gradients are the same. q
    has NF4 and LoRA, k NF4 without LoRA, v a tensor weight, a bias and LoRA; gate and up NF4."""
    torch.manual_seed(0)
    t, _ = _makers(device, dtype)

    def nf4(*shape):
        return quantize_nf4(t(*shape, grad=False))

    hidden, inter = 64, 192
    wide = t(2, 5, hidden + 24, grad=False)
    X = wide[..., :hidden].requires_grad_()
    q = LoraParts(nf4(96, hidden), None, t(8, hidden), t(96, 8), 0.5)
    k = LoraParts(nf4(32, hidden))
    v = LoraParts(t(32, hidden, grad=False), t(32), t(4, hidden), t(32, 4), 2.0)
    gate = LoraParts(nf4(inter, hidden), None, t(3, hidden), t(inter, 3), 0.5)
    up = LoraParts(nf4(inter, hidden), None, t(2, hidden), t(inter, 2), 1.5)
    down = LoraParts(nf4(hidden, inter), None, t(4, inter), t(hidden, 4), 2.0)
    ulp = torch.finfo(dtype).eps

    def run(fn, spare, params):
        outs = fn(spare)
        outs = outs if isinstance(outs, tuple) else (outs,)
        dYs = [torch.ones_like(Y) for Y in outs]
        return outs, torch.autograd.grad(outs, [X, *params], dYs)

    qkv_params = [q.lora_A, q.lora_B, v.bias, v.lora_A, v.lora_B]
    expected = run(lambda spare: lora_qkv(X, q, k, v, spare_columns=spare), 0, qkv_params)
    got = run(lambda spare: lora_qkv(X, q, k, v, spare_columns=spare), 24, qkv_params)
    tail = wide[..., hidden:]
    torch.testing.assert_close(tail[..., :8], 0.5 * X @ q.lora_A.t(), rtol=4 * ulp, atol=4 * ulp)
    torch.testing.assert_close(tail[..., 8:12], 2.0 * X @ v.lora_A.t(), rtol=4 * ulp,
                               atol=4 * ulp)
    for a, b in zip(got[0], expected[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=2 * ulp * b.abs().max().item())
    for a, b in zip(got[1], expected[1]):
        assert torch.equal(a, b)

    mlp_params = [p.lora_A for p in (gate, up, down)] + [p.lora_B for p in (gate, up, down)]
    expected = run(lambda spare: lora_mlp(X, gate, up, down, spare_columns=spare), 0, mlp_params)
    got = run(lambda spare: lora_mlp(X, gate, up, down, spare_columns=spare), 5, mlp_params)
    torch.testing.assert_close(tail[..., :3], 0.5 * X @ gate.lora_A.t(), rtol=4 * ulp,
                               atol=4 * ulp)
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=8 * ulp * b.abs().max().item())
    with pytest.raises(ValueError, match="spare_columns is 25 but X"):
        lora_qkv(X, q, k, v, spare_columns=25)
    with pytest.raises(ValueError, match="spare_columns is 3 but X"):
        lora_mlp(X.detach().clone(), gate, up, down, spare_columns=3)


def test_gradcheck_without_lora_and_frozen_adapter():
    """No LoRA term (dX only), and an adapter whose A is frozen (dB and dX only)."""
    X, W, A, B = _t(4, 6), _t(5, 6, grad=False), _t(2, 6, grad=False), _t(5, 2)
    assert torch.autograd.gradcheck(lambda x: matmul_lora(x, W, None, None, 1.0), (X,))
    assert torch.autograd.gradcheck(lambda x, b: matmul_lora(x, W, A, b, 1.0), (X, B))
    Wg, Wd = _t(7, 6, grad=False), _t(6, 7, grad=False)
    plain = LoraParts(Wg)
    with _copy_on_unpack:
        assert torch.autograd.gradcheck(
            lambda x: lora_mlp(x, plain, LoraParts(Wg.clone()), LoraParts(Wd)), (X,))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "one token", "1-d"])
def test_input_layouts(layout):
    """Strided, single-token and 1-D inputs give what their contiguous copy gives."""
    hidden = 9
    make = {"transposed": lambda: _t(hidden, 5, grad=False).t(),
            "sliced": lambda: _t(5, 2 * hidden, grad=False)[:, ::2],
            "one token": lambda: _t(1, hidden, grad=False),
            "1-d": lambda: _t(hidden, grad=False)}[layout]
    X = make().requires_grad_(True)
    X_copy = X.detach().contiguous().requires_grad_(True)
    q, k = (LoraParts(_t(n, hidden, grad=False), _t(n), _t(2, hidden), _t(n, 2), 0.5)
            for n in (6, 3))
    gate, up = (LoraParts(_t(7, hidden, grad=False), None, _t(2, hidden), _t(7, 2))
                for _ in range(2))
    down = LoraParts(_t(hidden, 7, grad=False), None, _t(3, 7), _t(hidden, 3), 2.0)

    def run(x):
        return (*lora_qkv(x, q, k, q), lora_mlp(x, gate, up, down))

    params = [q.lora_A, q.lora_B, k.lora_A, gate.lora_A, down.lora_B]
    outs, outs_copy = run(X), run(X_copy)
    dYs = [torch.randn_like(y) for y in outs]
    for y, y_copy in zip(outs, outs_copy):
        assert y.shape == (*X.shape[:-1], y.shape[-1])
        torch.testing.assert_close(y, y_copy, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(outs, [X, *params], dYs)
    grads_copy = torch.autograd.grad(outs_copy, [X_copy, *params], dYs)
    for g, g_copy in zip(grads, grads_copy):
        torch.testing.assert_close(g, g_copy, rtol=1e-12, atol=1e-12)


def test_mlp_graph_cannot_be_backpropagated_twice():
    X = _t(3, 8)
    gate = LoraParts(_t(5, 8, grad=False), None, _t(2, 8), _t(5, 2))
    up = LoraParts(_t(5, 8, grad=False))
    Y = lora_mlp(X, gate, up, LoraParts(_t(8, 5, grad=False)))
    torch.autograd.grad(Y.sum(), X, retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(Y.sum(), X)


# --- saved tensors ------------------------------------------------------------------------------

def _saved_bytes(fn, params):
    """Bytes of the distinct storages autograd saves while fn() runs, params (every weight and
    adapter) excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def mlp_saved_bytes_per_token(hidden, inter, ranks, elem, dropout=False):
    """docs/lora.md: b·(H + 2I + r_g + r_u + r_d), plus 2H + I bytes of masks with dropout."""
    return elem * (hidden + 2 * inter + sum(ranks)) + (2 * hidden + inter if dropout else 0)


def linears_saved_bytes_per_token(hidden, ranks, elem, dropped=0):
    """docs/lora.md: b·(H + Σr), plus H bytes per projection with dropout."""
    return elem * (hidden + sum(ranks)) + hidden * dropped


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("kind", ["linear", "nf4"])
def test_mlp_saves_what_the_docs_say(kind, dropout):
    dtype = torch.bfloat16
    module = _mlp("llama", kind, dtype, 16, dropout=P if dropout else 0.0)
    s = SHAPES[kind]
    X = _X(s["hidden"], dtype)
    params = list(module.parameters())
    ours = _saved_bytes(lambda: _mlp_ours(module, "llama")(X), params)
    tokens = X.numel() // s["hidden"]
    assert ours == tokens * mlp_saved_bytes_per_token(s["hidden"], s["inter"], (16, 16, 16), 2,
                                                      dropout)
    if not dropout:
        # Stock PEFT + transformers: X, e, silu(e), g, h and the three lora_A outputs.
        assert _saved_bytes(lambda: module(X), params) == tokens * 2 * (
            s["hidden"] + 4 * s["inter"] + 3 * 16)


@pytest.mark.parametrize("dropout", [False, True])
def test_qkv_and_linear_save_what_the_docs_say(dropout):
    dtype = torch.bfloat16
    layers = _qkv_layers("nf4", dtype, dropout=P if dropout else 0.0)
    parts = [lora_parts(layer) for layer in layers]
    hidden = SHAPES["nf4"]["hidden"]
    X = _X(hidden, dtype)
    tokens = X.numel() // hidden
    saved = _saved_bytes(lambda: lora_qkv(X, *parts), _qkv_params(layers))
    assert saved == tokens * linears_saved_bytes_per_token(hidden, (8, 16, 64), 2,
                                                           3 if dropout else 0)
    saved = _saved_bytes(lambda: lora_linear(X, parts[0]), _adapter(layers[0]))
    assert saved == tokens * linears_saved_bytes_per_token(hidden, (8,), 2, 1 if dropout else 0)


def test_nf4_weights_share_one_dequant_buffer():
    clear_dequant_buffers()
    module = _mlp("llama", "nf4", torch.bfloat16, 8)
    X = _X(SHAPES["nf4"]["hidden"], torch.bfloat16)
    _mlp_ours(module, "llama")(X).sum().backward()
    assert list(lora._DEQUANT_BUFFERS) == [(torch.device("cpu"), torch.bfloat16)]
    numel = SHAPES["nf4"]["hidden"] * SHAPES["nf4"]["inter"]
    assert lora._DEQUANT_BUFFERS[(torch.device("cpu"), torch.bfloat16)].numel() == numel
    clear_dequant_buffers()
    assert not lora._DEQUANT_BUFFERS


# --- lora_parts -----------------------------------------------------------------------------------

def test_lora_parts_reads_the_layer():
    s = SHAPES["nf4"]
    layer = _lora(_base("nf4", s["hidden"], s["inter"], torch.bfloat16, True), 16, alpha=8)
    parts = lora_parts(layer)
    assert isinstance(parts.weight, NF4Weight) and tuple(parts.weight.shape) == (131, 192)
    assert parts.bias is layer.get_base_layer().bias
    assert parts.lora_A is layer.lora_A[ADAPTER].weight
    assert parts.lora_B is layer.lora_B[ADAPTER].weight
    assert (parts.scaling, parts.dropout_p, parts.active, parts.merged) == (0.5, 0.0, True, False)
    plain = _lora(_base("linear", 5, 3, torch.float32, False), 2)
    assert lora_parts(plain).weight is plain.get_base_layer().weight
    assert base_weight(plain.get_base_layer()) is plain.get_base_layer().weight
    dense = parts.dense_weight()
    packed = layer.get_base_layer().weight
    assert torch.equal(dense, bnb.functional.dequantize_4bit(packed.data, packed.quant_state))
    assert not any(dense.data_ptr() == b.data_ptr() for b in lora._DEQUANT_BUFFERS.values())
    nf4 = base_weight(layer.get_base_layer())
    assert isinstance(nf4, NF4Weight) and nf4.packed.data_ptr() == parts.weight.packed.data_ptr()
    with pytest.raises(TypeError, match="expected torch.nn.Linear or bitsandbytes Linear4bit"):
        base_weight(torch.nn.Conv1d(2, 2, 1))


def test_lora_parts_rejects_what_it_does_not_compute():
    base = lambda: _base("linear", 16, 8, torch.float32, True)  # noqa: E731
    with pytest.raises(TypeError, match="expected a PEFT LoraLayer"):
        lora_parts(torch.nn.Linear(4, 4))
    dora = LoraLinear(base(), ADAPTER, config=LoraConfig(r=2, use_dora=True), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="DoRA"):
        lora_parts(dora)
    biased = LoraLinear(base(), ADAPTER, config=LoraConfig(r=2, lora_bias=True), r=2,
                        lora_alpha=2)
    with pytest.raises(ValueError, match="lora_bias"):
        lora_parts(biased)
    two = LoraLinear(base(), ADAPTER, config=LoraConfig(r=2), r=2, lora_alpha=2)
    two.update_layer("other", 2, 2, config=LoraConfig(r=2))
    two.set_adapter([ADAPTER, "other"])
    with pytest.raises(ValueError, match="2 active adapters"):
        lora_parts(two)
    fp4 = bnb.nn.Linear4bit(64, 8, quant_type="fp4", compute_dtype=torch.bfloat16)
    fp4.weight = bnb.nn.Params4bit(torch.randn(8, 64, dtype=torch.bfloat16),
                                   requires_grad=False, quant_type="fp4")
    fp4_layer = LoraLinear4bit(fp4.to("cpu"), ADAPTER, config=LoraConfig(r=2), r=2, lora_alpha=2)
    with pytest.raises(ValueError, match="'fp4'"):
        lora_parts(fp4_layer)


# --- bad inputs -----------------------------------------------------------------------------------

def _ok():
    return dict(X=torch.randn(3, 8), W=torch.randn(6, 8), A=torch.randn(2, 8),
                B=torch.randn(6, 2), s=1.0)


@pytest.mark.parametrize("change,err,match", [
    (dict(A=torch.randn(2, 7)), ValueError, r"A has shape \(2, 7\), expected \(2, 8\)"),
    (dict(B=torch.randn(5, 2)), ValueError, r"B has shape \(5, 2\), expected \(6, 2\)"),
    (dict(B=torch.randn(6, 3)), ValueError, r"B has shape \(6, 3\), expected \(6, 2\)"),
    (dict(W=torch.randn(6, 9)), ValueError, r"W has shape \(6, 9\), expected \[out_features, 8\]"),
    (dict(W=torch.randn(6, 8, device="meta")), ValueError, "W is on meta but X is on cpu"),
    (dict(A=torch.randn(2, 8, device="meta")), ValueError, "A is on meta but X is on cpu"),
    (dict(W=torch.randn(6, 8, dtype=torch.bfloat16)), TypeError,
     "W has dtype torch.bfloat16 but X has dtype torch.float32"),
    (dict(A=torch.randn(2, 8, dtype=torch.float16)), TypeError, "A has dtype torch.float16"),
    (dict(W=torch.randn(6, 8, requires_grad=True)), ValueError, "W requires grad"),
    (dict(W=[[1.0]]), TypeError, "expected a torch.Tensor or an NF4Weight"),
    (dict(X=torch.randn(0, 8)), ValueError, "X is empty"),
    (dict(X=torch.ones(3, 8, dtype=torch.int32)), TypeError, "X has dtype torch.int32"),
    (dict(B=None), ValueError, "B is None but A is given"),
    (dict(s=float("nan")), TypeError, "s is nan; expected a finite number"),
    (dict(s=torch.tensor(1.0)), TypeError, "expected a finite number"),
])
def test_bad_inputs_raise_clear_errors(change, err, match):
    args = {**_ok(), **change}
    with pytest.raises(err, match=match):
        matmul_lora(args["X"], args["W"], args["A"], args["B"], args["s"])


def test_bad_dropout_and_bias_raise_clear_errors():
    a = _ok()
    call = lambda **kw: matmul_lora(a["X"], a["W"], a["A"], a["B"], a["s"], **kw)  # noqa: E731
    with pytest.raises(ValueError, match="dropout_p is 1.0; expected 0 <= p < 1"):
        call(dropout_p=1.0)
    with pytest.raises(TypeError, match="must be a bool tensor"):
        call(dropout_mask=torch.ones(3, 8), dropout_p=0.1)
    with pytest.raises(ValueError, match=r"dropout_mask has shape \(3, 7\), expected \(3, 8\)"):
        call(dropout_mask=torch.ones(3, 7, dtype=torch.bool), dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p is 0"):
        call(dropout_mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(6,\)"):
        call(bias=torch.randn(5))


def test_bad_mlp_and_qkv_inputs_raise_clear_errors():
    X = torch.randn(3, 8)
    gate, up, down = LoraParts(torch.randn(5, 8)), LoraParts(torch.randn(5, 8)), LoraParts(
        torch.randn(8, 5))
    with pytest.raises(ValueError, match="activation is 'relu'"):
        lora_mlp(X, gate, up, down, "relu")
    with pytest.raises(ValueError, match="approximate is 'tanh'"):
        lora_mlp(X, gate, up, down, "swiglu", "tanh")
    with pytest.raises(ValueError, match=r"up.weight has shape \(4, 8\), expected \(5, 8\)"):
        lora_mlp(X, gate, LoraParts(torch.randn(4, 8)), down)
    with pytest.raises(ValueError, match=r"down.weight has shape \(8, 4\), expected "
                                         r"\[out_features, 5\]"):
        lora_mlp(X, gate, up, LoraParts(torch.randn(8, 4)))
    bad_a = LoraParts(torch.randn(5, 8), None, torch.randn(2, 9), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"k.lora_A has shape \(2, 9\)"):
        lora_qkv(X, gate, bad_a, up)
    with pytest.raises(ValueError, match="dropout masks: got 2, expected 3"):
        lora_qkv(X, gate, up, gate, dropout_masks=[None, None])


def test_nf4_weight_in_another_dtype_is_rejected():
    s = SHAPES["nf4"]
    parts = lora_parts(_lora(_base("nf4", s["hidden"], s["inter"], torch.bfloat16, False), 8))
    with pytest.raises(TypeError, match="weight has dtype torch.bfloat16 but X has dtype "
                                        "torch.float16"):
        lora_linear(torch.randn(3, s["hidden"], dtype=torch.float16), parts)


# --- CUDA -----------------------------------------------------------------------------------------

CUDA_SHAPES = dict(hidden=1024, inter=2816, q=1024, kv=256)


@pytest.mark.cuda
@pytest.mark.parametrize("what", ["linear", "qkv", "mlp-llama", "mlp-gemma"])
@pytest.mark.parametrize("kind", ["nf4", "linear"])
def test_cuda_matches_peft(kind, what, monkeypatch):
    monkeypatch.setitem(SHAPES, kind, CUDA_SHAPES)
    dtype, device = torch.bfloat16, "cuda"
    X = torch.randn(4, 512, CUDA_SHAPES["hidden"], dtype=dtype, device=device, requires_grad=True)
    poison_cuda_allocator(64 << 20)
    if what == "linear":
        layer = _lora(_base(kind, 1024, 2816, dtype, True, device), 16)
        parts = lora_parts(layer)
        _compare(lambda x: lora_linear(x, parts), layer,
                 lambda x, p: _oracle_linear(x, layer, *p), X, _adapter(layer),
                 [(4, 512, 2816)], dtype)
    elif what == "qkv":
        layers = _qkv_layers(kind, dtype, ranks=(16, 16, 16), device=device)
        parts = [lora_parts(layer) for layer in layers]
        _compare(lambda x: lora_qkv(x, *parts), lambda x: tuple(layer(x) for layer in layers),
                 _qkv_oracle(layers), X, _qkv_params(layers),
                 [(4, 512, 1024), (4, 512, 256), (4, 512, 256)], dtype)
    else:
        family = what.split("-")[1]
        module = _mlp(family, kind, dtype, 16, device=device)
        _compare(_mlp_ours(module, family), module,
                 lambda x, p: _oracle_mlp(x, module, family, p), X, _mlp_params(module),
                 [(4, 512, 1024)], dtype)


@pytest.mark.cuda
def test_cuda_dropout_seeded_mlp_matches_peft(monkeypatch):
    monkeypatch.setitem(SHAPES, "nf4", CUDA_SHAPES)
    dtype = torch.bfloat16
    module = _mlp("llama", "nf4", dtype, 16, device="cuda", dropout=P)
    X = torch.randn(2, 256, 1024, dtype=dtype, device="cuda", requires_grad=True)
    torch.manual_seed(1234)
    keeps = _masks([(2, 256, 1024), (2, 256, 1024), (2, 256, 2816)], dtype, "cuda")
    _compare(_seeded(_mlp_ours(module, "llama")), _seeded(module),
             lambda x, p: _oracle_mlp(x, module, "llama", p, keeps, P), X,
             _mlp_params(module), [(2, 256, 1024)], dtype)


@pytest.mark.cuda
def test_cuda_gradcheck():
    X = torch.randn(5, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    W = torch.randn(7, 9, dtype=torch.float64, device="cuda")
    A = torch.randn(3, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    B = torch.randn(7, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    keep = torch.rand(5, 9, device="cuda") > 0.3
    assert torch.autograd.gradcheck(
        lambda x, a, b: matmul_lora(x, W, a, b, 0.5, keep, dropout_p=0.3), (X, A, B))
    Wd = torch.randn(9, 7, dtype=torch.float64, device="cuda")
    Ad = torch.randn(2, 7, dtype=torch.float64, device="cuda", requires_grad=True)
    Bd = torch.randn(9, 2, dtype=torch.float64, device="cuda", requires_grad=True)

    def mlp(x, a, b, ad, bd):
        gate = LoraParts(W, None, a, b, 0.5)
        return lora_mlp(x, gate, LoraParts(W.clone()), LoraParts(Wd, None, ad, bd, 2.0))

    with _copy_on_unpack:
        assert torch.autograd.gradcheck(mlp, (X, A, B, Ad, Bd))


def mlp_peak_bound(tokens, hidden, inter, ranks, elem, buffer_numel):
    """docs/lora.md: the peak of lora_mlp forward + backward above its inputs, no dropout, the
    output held, the dequantization buffer allocated on the way."""
    count = max(1, min(lora._ROW_BLOCKS, tokens * inter // 2**24))
    rows = -(-tokens // count)
    saved = tokens * mlp_saved_bytes_per_token(hidden, inter, ranks, elem)
    r = sum(ranks)
    eps = 6 * elem * tokens * r + 16 * r * (2 * hidden + inter) + 16 * (2 * inter + hidden)
    inputs = elem * tokens * hidden  # X is saved but allocated before
    output = elem * tokens * hidden
    return (saved - inputs + output + elem * (rows * inter + tokens * hidden)
            + elem * buffer_numel + eps)


@pytest.mark.cuda
def test_cuda_mlp_peak_memory_within_docs(monkeypatch):
    """Llama-shaped MLP (hidden 2048, intermediate 5632, r 16), 8192 tokens, bf16 NF4."""
    shapes = dict(hidden=2048, inter=5632, q=2048, kv=512)
    monkeypatch.setitem(SHAPES, "nf4", shapes)
    module = _mlp("llama", "nf4", torch.bfloat16, 16, device="cuda")
    run = _mlp_ours(module, "llama")
    X = torch.randn(8192, 2048, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dY = torch.randn(8192, 2048, dtype=torch.bfloat16, device="cuda")
    params = _mlp_params(module)
    torch.autograd.grad(run(X), [X, *params], dY)  # warm-up: cuBLAS workspaces
    clear_dequant_buffers()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    Y = run(X)
    grads = torch.autograd.grad(Y, [X, *params], dY)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    del Y, grads
    bound = mlp_peak_bound(8192, 2048, 5632, (16, 16, 16), 2, 2048 * 5632)
    assert peak <= bound + (1 << 20), f"peak {peak / 2**20:.1f} MiB, docs {bound / 2**20:.1f} MiB"


@pytest.mark.cuda
def test_cuda_bad_inputs():
    s = SHAPES["nf4"]
    parts = lora_parts(_lora(_base("nf4", s["hidden"], s["inter"], torch.bfloat16, False, "cuda"),
                             8))
    X_cpu = torch.randn(3, s["hidden"], dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight is on cuda:0 but X is on cpu"):
        lora_linear(X_cpu, parts)
    W = torch.randn(6, 8, device="cuda")
    with pytest.raises(ValueError, match="W is on cuda:0 but X is on cpu"):
        matmul_lora(torch.randn(3, 8), W, None, None, 1.0)
    with pytest.raises(ValueError, match="A is on cpu but X is on cuda:0"):
        matmul_lora(torch.randn(3, 8, device="cuda"), W, torch.randn(2, 8),
                    torch.randn(6, 2, device="cuda"), 1.0)
