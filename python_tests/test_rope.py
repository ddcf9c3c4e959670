import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from helpers import (DTYPES, assert_close, assert_no_worse_than_reference, needs_extension,
                     poison_cuda_allocator)
from unsloth_ext.ops import rope as rope_module
from unsloth_ext.ops.rope import (apply_rope_, apply_rope_reference, rope_bwd_reference,
                                  rope_cache)

ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
               "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
             "rope_theta": 10000.0},
}
MAX_POSITION_EMBEDDINGS = 256


def _config(rope_type, head_dim=64):
    return LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=head_dim, max_position_embeddings=MAX_POSITION_EMBEDDINGS,
                       rope_parameters=dict(ROPE_PARAMETERS[rope_type]))


def _packed_positions(batch, seq, device="cpu", dtype=torch.int64):
    """Rows of packed sequences, each restarting at 0 (lengths vary by row)."""
    rows = []
    for b in range(batch):
        cut = sorted({0, min(seq, 3 + 5 * b), min(seq, seq // 2 + b), seq})
        rows.append(torch.cat([torch.arange(e - s) for s, e in zip(cut, cut[1:])]))
    return torch.stack(rows).to(device=device, dtype=dtype)


def _qk(batch, seq, q_heads, k_heads, head_dim, dtype, device, layout):
    """q and k as transformers makes them: for "bhsd" transposed views of the projections'
    outputs [batch, seq, heads * head_dim], for "bshd" those outputs viewed per head."""
    def one(heads):
        proj = torch.randn(batch, seq, heads * head_dim, dtype=dtype, device=device)
        x = proj.view(batch, seq, heads, head_dim)
        return x.transpose(1, 2) if layout == "bhsd" else x
    return one(q_heads), one(k_heads)


def _random_cache(rows, rotary_dim, dtype, device="cpu"):
    """A cos/sin cache whose halves differ, so that a backward using -sin instead of the
    transposed rotation would show."""
    return (torch.randn(rows, rotary_dim, dtype=dtype, device=device),
            torch.randn(rows, rotary_dim, dtype=dtype, device=device))


def _transformers_cos_sin(config, position_ids, dtype):
    rotary = LlamaRotaryEmbedding(config)
    return rotary(torch.empty(1, dtype=dtype, device=position_ids.device), position_ids)


# --- cache and reference against transformers (CPU, always) -----------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_cache_matches_transformers(rope_type, dtype):
    config = _config(rope_type)
    position_ids = _packed_positions(3, 200)
    cos, sin = rope_cache(config, 200, dtype=dtype)
    ref_cos, ref_sin = _transformers_cos_sin(config, position_ids, dtype)
    torch.testing.assert_close(cos[position_ids], ref_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin[position_ids], ref_sin, atol=0, rtol=0)


@pytest.mark.parametrize("longest", [100, 400, 1000])
def test_dynamic_cache_follows_the_sequence_length(longest):
    """transformers grows the NTK base once max(position_ids) + 1 exceeds
    max_position_embeddings (256 here); rope_cache does so for seq_len above it."""
    config = _config("dynamic")
    position_ids = torch.stack([torch.arange(longest), torch.arange(longest) // 2])
    ref_cos, ref_sin = _transformers_cos_sin(config, position_ids, torch.float32)
    cos, sin = rope_cache(config, longest)
    torch.testing.assert_close(cos[position_ids], ref_cos, atol=0, rtol=0)
    torch.testing.assert_close(sin[position_ids], ref_sin, atol=0, rtol=0)
    if longest > MAX_POSITION_EMBEDDINGS:
        default_cos, _ = rope_cache(_config("default"), longest)
        assert not torch.equal(cos, default_cos)
    # A longer cache built for the same sequence length holds the same rows.
    cos_long, _ = rope_cache(config, longest + 64, seq_len=longest)
    torch.testing.assert_close(cos_long[:longest], cos, atol=0, rtol=0)


def test_yarn_cache_carries_the_attention_factor():
    cos, sin = rope_cache(_config("yarn"), 8)
    scale = cos[0, 0].item()  # cos(0) times the attention factor
    assert scale > 1.0
    torch.testing.assert_close(cos.square() + sin.square(), torch.full_like(cos, scale * scale))


def test_cache_from_a_mapping_equals_cache_from_the_config():
    params = dict(ROPE_PARAMETERS["llama3"], head_dim=64,
                  max_position_embeddings=MAX_POSITION_EMBEDDINGS)
    for got, expected in zip(rope_cache(params, 50), rope_cache(_config("llama3"), 50)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_partial_rotary_cache():
    params = {"rope_theta": 10000.0, "head_dim": 80, "partial_rotary_factor": 0.5}
    cos, sin = rope_cache(params, 16)
    assert cos.shape == sin.shape == (16, 40)
    torch.testing.assert_close(cos[:, :20], cos[:, 20:], atol=0, rtol=0)


@pytest.mark.parametrize("params,match", [
    ({"rope_type": "longrope", "head_dim": 64}, "not supported"),
    ({"rope_theta": 10000.0}, "head_dim"),
    ({"head_dim": 64, "partial_rotary_factor": 0.3}, "even"),
    ({"rope_type": "dynamic", "factor": 2.0, "head_dim": 64}, "max_position_embeddings"),
    ({"full_attention": {"rope_type": "default"}, "sliding_attention": None, "head_dim": 64},
     "per layer type"),
])
def test_cache_bad_parameters(params, match):
    with pytest.raises(ValueError, match=match):
        rope_cache(params, 8)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rope_type", list(ROPE_PARAMETERS))
def test_reference_matches_transformers(rope_type, dtype, layout):
    config = _config(rope_type)
    position_ids = _packed_positions(2, 37)
    q, k = _qk(2, 37, 4, 2, 64, dtype, "cpu", layout)
    cos_g, sin_g = _transformers_cos_sin(config, position_ids, dtype)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos_g, sin_g,
                                        unsqueeze_dim=1 if layout == "bhsd" else 2)
    cos, sin = rope_cache(config, 37, dtype=dtype)
    out_q, out_k = apply_rope_reference(q, k, cos, sin, position_ids, layout)
    torch.testing.assert_close(out_q, ref_q, atol=0, rtol=0)
    torch.testing.assert_close(out_k, ref_k, atol=0, rtol=0)


def test_reference_partial_rotary_leaves_the_tail():
    q, k = _qk(2, 9, 3, 1, 96, torch.float32, "cpu", "bhsd")
    cos, sin = rope_cache({"head_dim": 96, "partial_rotary_factor": 0.5}, 9)
    position_ids = torch.arange(9).expand(2, 9)
    out_q, out_k = apply_rope_reference(q, k, cos, sin, position_ids)
    ref_q, ref_k = apply_rotary_pos_emb(q[..., :48], k[..., :48], cos[position_ids],
                                        sin[position_ids])
    torch.testing.assert_close(out_q, torch.cat((ref_q, q[..., 48:]), -1), atol=0, rtol=0)
    torch.testing.assert_close(out_k, torch.cat((ref_k, k[..., 48:]), -1), atol=0, rtol=0)


def test_reference_fp32_cache_with_16_bit_inputs():
    q, k = _qk(1, 5, 2, 2, 32, torch.bfloat16, "cpu", "bhsd")
    cos, sin = rope_cache({"head_dim": 32}, 5)
    position_ids = torch.arange(5)[None]
    out_q, _ = apply_rope_reference(q, k, cos, sin, position_ids)
    ref_q, _ = apply_rotary_pos_emb(q, k, cos[position_ids], sin[position_ids])
    assert out_q.dtype == torch.bfloat16
    torch.testing.assert_close(out_q, ref_q.to(torch.bfloat16), atol=0, rtol=0)


def test_backward_reference_is_the_adjoint():
    q, k = _qk(2, 6, 3, 1, 16, torch.float64, "cpu", "bshd")
    cos, sin = _random_cache(10, 12, torch.float64)
    position_ids = torch.randint(0, 10, (2, 6))
    qa, ka = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    out_q, out_k = apply_rope_reference(qa, ka, cos, sin, position_ids, "bshd")
    gq, gk = torch.randn_like(out_q), torch.randn_like(out_k)
    exp_q, exp_k = torch.autograd.grad((out_q, out_k), (qa, ka), (gq, gk))
    rope_bwd_reference(gq, gk, cos, sin, position_ids)
    assert_close(gq, exp_q)
    assert_close(gk, exp_k)


# --- the public wrapper on CPU ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_apply_rope_rotates_in_place(layout):
    q, k = _qk(3, 11, 4, 1, 64, torch.float32, "cpu", layout)
    cos, sin = rope_cache({"head_dim": 64}, 11)
    position_ids = _packed_positions(3, 11)
    ref_q, ref_k = apply_rope_reference(q, k, cos, sin, position_ids, layout)
    q_ptr = q.data_ptr()
    out_q, out_k = apply_rope_(q, k, cos, sin, position_ids, layout)
    assert out_q is q and out_k is k and q.data_ptr() == q_ptr
    torch.testing.assert_close(q, ref_q, atol=0, rtol=0)
    torch.testing.assert_close(k, ref_k, atol=0, rtol=0)


@pytest.mark.parametrize("position_ids", [torch.arange(7), torch.arange(7)[None],
                                          torch.arange(7, dtype=torch.int32).expand(2, 7)],
                         ids=["1d", "batch-1", "int32"])
def test_apply_rope_position_shapes(position_ids):
    q, k = _qk(2, 7, 2, 2, 32, torch.float32, "cpu", "bhsd")
    cos, sin = rope_cache({"head_dim": 32}, 7)
    ref = apply_rope_reference(q, k, cos, sin, torch.arange(7).expand(2, 7))
    for got, expected in zip(apply_rope_(q, k, cos, sin, position_ids), ref):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def _grads_through_apply_rope(q, k, cos, sin, position_ids, layout, loss):
    qa, ka = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    loss(*apply_rope_(qa * 1, ka * 1, cos, sin, position_ids, layout)).backward()
    return qa.grad, ka.grad


def _grads_through_reference(q, k, cos, sin, position_ids, layout, loss):
    qa, ka = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    loss(*apply_rope_reference(qa, ka, cos, sin, position_ids, layout)).backward()
    return qa.grad, ka.grad


def _weights(t):
    """Small integers (exact in every dtype) shaped like t."""
    return (torch.arange(t.numel(), device=t.device) % 7 - 3).view(t.shape).to(t.dtype)


# Linear losses, so that each path's gradient reaching the rotation is exact.
LOSSES = {
    "weighted": lambda q, k: (q * _weights(q)).sum() + (k * _weights(k).flip(-1)).sum(),
    "sum": lambda q, k: q.sum() + k.sum(),  # broadcast (stride 0) gradients
    "shared": lambda q, k: ((q + k) * _weights(q)).sum(),  # one gradient tensor for q and k
}


@pytest.mark.parametrize("loss", list(LOSSES))
def test_apply_rope_gradients_cpu(loss):
    q, k = _qk(2, 5, 3, 3, 8, torch.float64, "cpu", "bhsd")
    cos, sin = _random_cache(9, 8, torch.float64)
    position_ids = torch.randint(0, 9, (2, 5))
    got = _grads_through_apply_rope(q, k, cos, sin, position_ids, "bhsd", LOSSES[loss])
    expected = _grads_through_reference(q, k, cos, sin, position_ids, "bhsd", LOSSES[loss])
    for g, e in zip(got, expected):
        assert_close(g, e)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_apply_rope_gradcheck_cpu(layout):
    q, k = _qk(2, 4, 2, 1, 8, torch.float64, "cpu", layout)
    cos, sin = _random_cache(6, 6, torch.float64)
    position_ids = torch.randint(0, 6, (2, 4))
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: apply_rope_(a.clone(), b.clone(), cos, sin, position_ids, layout), (q, k))


def test_unrotated_tensors_saved_for_backward_are_caught():
    """The rotation changes q's memory; an op that saved q before is told at backward."""
    proj = torch.randn(2, 4, 16, requires_grad=True) * 1
    q = proj.view(2, 4, 2, 8)
    saved = q.sin()  # saves q
    k = torch.randn(2, 4, 1, 8)
    cos, sin = rope_cache({"head_dim": 8}, 4)
    apply_rope_(q, k, cos, sin, torch.arange(4), "bshd")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@pytest.fixture
def kernel_path_on_cpu(monkeypatch):
    """Route the wrapper through the registered ops on CPU (their CPU kernel is the reference):
    the autograd.Function and the mutating ops as they run on CUDA."""
    monkeypatch.setattr(rope_module, "use_kernel", lambda name, tensor: True)


@needs_extension
def test_op_gradcheck_cpu(kernel_path_on_cpu):
    q, k = _qk(2, 3, 2, 2, 8, torch.float64, "cpu", "bhsd")
    cos, sin = _random_cache(5, 8, torch.float64)
    position_ids = torch.randint(0, 5, (2, 3))
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: apply_rope_(a.clone(), b.clone(), cos, sin, position_ids), (q, k))


@needs_extension
def test_torch_compile_traces_the_ops_cpu(kernel_path_on_cpu):
    cos, sin = _random_cache(6, 8, torch.float32)
    position_ids = torch.randint(0, 6, (2, 5))

    def attention_like(proj_q, proj_k):
        q = proj_q.view(2, 5, 3, 8).transpose(1, 2)
        k = proj_k.view(2, 5, 1, 8).transpose(1, 2)
        q, k = apply_rope_(q, k, cos, sin, position_ids)
        return (q @ k.transpose(2, 3)).square().sum()

    proj_q, proj_k = torch.randn(2, 5, 24), torch.randn(2, 5, 8)
    expected = _grads_of(attention_like, proj_q, proj_k)
    got = _grads_of(torch.compile(attention_like, fullgraph=True, backend="aot_eager"),
                    proj_q, proj_k)
    for g, e in zip(got, expected):
        assert_close(g, e)


def _grads_of(fn, *inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*[t * 1 for t in leaves])
    return (out, *torch.autograd.grad(out, leaves))


def _opcheck_args(device, dtype, cache_dtype=None):
    q = torch.randn(2, 5, 3, 16, dtype=dtype, device=device)
    k = torch.randn(2, 5, 1, 16, dtype=dtype, device=device)
    cos, sin = _random_cache(7, 12, cache_dtype or dtype, device)
    position_ids = torch.randint(0, 7, (2, 5), device=device)
    return q, k, cos, sin, position_ids


@needs_extension
@pytest.mark.parametrize("name", ["rope_fwd", "rope_bwd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_cpu(name, dtype):
    torch.library.opcheck(getattr(torch.ops.unsloth_ext, name).default,
                          _opcheck_args("cpu", dtype))


def _bad_inputs():
    def args(**over):
        q, k = _qk(2, 5, 4, 2, 16, torch.float32, "cpu", "bhsd")
        cos, sin = rope_cache({"head_dim": 16}, 8)
        base = dict(q=q, k=k, cos=cos, sin=sin, position_ids=torch.arange(5).expand(2, 5))
        base.update(over)
        return base

    return [
        (lambda: args(q=torch.ones(2, 4, 5, 16, dtype=torch.int32)), TypeError, "q has dtype"),
        (lambda: args(k=torch.randn(2, 2, 5, 16, dtype=torch.float64)), TypeError,
         "k has dtype torch.float64 but q has dtype torch.float32"),
        (lambda: args(k=torch.randn(2, 2, 5, 8)), ValueError, "k has head_dim 8 but q has "
         "head_dim 16"),
        (lambda: args(k=torch.randn(2, 2, 5, 16, device="meta")), ValueError,
         "k is on meta but q is on cpu"),
        (lambda: args(k=torch.randn(2, 2, 6, 16)), ValueError, "sequence sizes"),
        (lambda: args(q=torch.randn(4, 5, 16)), ValueError, "expected 4 dimensions"),
        (lambda: args(q=torch.randn(2, 4, 0, 16), k=torch.randn(2, 2, 0, 16),
                      position_ids=torch.zeros(2, 0, dtype=torch.int64)), ValueError, "empty"),
        (lambda: args(position_ids=torch.arange(6).expand(2, 6)), ValueError,
         "position_ids has shape \\(2, 6\\); expected \\[2, 5\\]"),
        (lambda: args(position_ids=torch.arange(5).expand(3, 5)), ValueError, "position_ids"),
        (lambda: args(position_ids=torch.arange(5.0)), TypeError, "int64 or int32"),
        (lambda: args(position_ids=torch.arange(5) + 4), ValueError,
         "positions from 4 to 8, but the cos/sin cache has rows for positions 0 to 7"),
        (lambda: args(position_ids=torch.arange(5) - 1), ValueError, "positions from -1"),
        (lambda: args(cos=torch.randn(8, 7), sin=torch.randn(8, 7)), ValueError, "even"),
        (lambda: args(cos=torch.randn(8, 18), sin=torch.randn(8, 18)), ValueError,
         "at most head_dim 16"),
        (lambda: args(sin=torch.randn(8, 14)), ValueError, "expected the shape of cos"),
        (lambda: args(cos=torch.randn(8, 16, dtype=torch.float64),
                      sin=torch.randn(8, 16, dtype=torch.float64)), TypeError, "cos has dtype"),
        (lambda: args(sin=torch.randn(8, 16, dtype=torch.float16)), TypeError, "sin has dtype"),
        (lambda: args(cos=torch.randn(8, 16, requires_grad=True)), ValueError, "require grad"),
        (lambda: args(q=torch.randn(2, 4, 5, 16, requires_grad=True)), ValueError,
         "leaf tensor that requires grad"),
        (lambda: dict(args(), layout="sbhd"), ValueError, "layout"),
    ]


@pytest.mark.parametrize("make,err,match", _bad_inputs())
def test_bad_inputs_raise_clear_errors(make, err, match):
    with pytest.raises(err, match=match):
        apply_rope_(**make())


# --- CUDA kernels -----------------------------------------------------------------------------

def _reference_in_fp32(q, k, cos, sin, position_ids, layout):
    """The reference computed in fp32 (fp64 for fp64), rounded once to the inputs' dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = apply_rope_reference(q.to(acc), k.to(acc), cos.to(acc), sin.to(acc), position_ids,
                               layout)
    return tuple(t.to(q.dtype) for t in out)


def _run_kernel(q, k, cos, sin, position_ids, layout):
    """apply_rope_ on copies of q and k laid out like them; returns the rotated copies."""
    q_run, k_run = _like(q), _like(k)
    poison_cuda_allocator(4 * (q.numel() + k.numel()) * q.element_size())
    return apply_rope_(q_run, k_run, cos, sin, position_ids, layout)


def _like(t):
    """A copy of t with the same strides and storage offset (so views stay views, and a
    misaligned start stays misaligned)."""
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype,
                          device=t.device)
    return storage.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


def _check_kernel(q, k, cos, sin, position_ids, layout):
    got_q, got_k = _run_kernel(q, k, cos, sin, position_ids, layout)
    exp_q, exp_k = _reference_in_fp32(q, k, cos, sin, position_ids, layout)
    assert_close(got_q, exp_q)
    assert_close(got_k, exp_k)
    if q.dtype != torch.float64:
        # Against fp64: no worse than PyTorch at the kernel's precision.
        ref_q, ref_k = apply_rope_reference(q, k, cos, sin, position_ids, layout)
        oracle_q, oracle_k = apply_rope_reference(q.double(), k.double(), cos.double(),
                                                  sin.double(), position_ids, layout)
        assert_no_worse_than_reference(got_q, ref_q, oracle_q)
        assert_no_worse_than_reference(got_k, ref_k, oracle_k)


SHAPES = [  # batch, seq, q_heads, k_heads, head_dim, rotary_dim
    (1, 1, 1, 1, 64, 64),
    (2, 37, 32, 8, 128, 128),  # Llama-3-8B heads (GQA)
    (3, 17, 7, 1, 80, 80),  # MQA, head_dim 80
    (2, 29, 12, 4, 96, 96),
    (1, 9, 5, 5, 256, 256),
    (2, 21, 6, 2, 128, 64),  # partial rotary
    (1, 13, 3, 3, 64, 10),  # rotary pairs not a multiple of the vector width
]


@pytest.mark.cuda
@pytest.mark.parametrize("cache_dtype", ["same", "float32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_matches_reference(shape, layout, dtype, cache_dtype):
    batch, seq, q_heads, k_heads, head_dim, rotary_dim = shape
    q, k = _qk(batch, seq, q_heads, k_heads, head_dim, dtype, "cuda", layout)
    cdtype = dtype if cache_dtype == "same" else torch.float32
    cos, sin = rope_cache({"head_dim": rotary_dim}, seq + 5, "cuda", cdtype)
    _check_kernel(q, k, cos, sin, _packed_positions(batch, seq, "cuda"), layout)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_kernel_random_cache_and_int32_positions(dtype):
    q, k = _qk(3, 19, 6, 2, 64, dtype, "cuda", "bshd")
    cos, sin = _random_cache(40, 48, dtype, "cuda")
    position_ids = torch.randint(0, 40, (3, 19), device="cuda", dtype=torch.int32)
    _check_kernel(q, k, cos, sin, position_ids, "bshd")
    _check_kernel(q, k, cos, sin, position_ids[:1], "bshd")  # one row for the whole batch


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_strided_and_misaligned_inputs(dtype):
    cos, sin = rope_cache({"head_dim": 64}, 16, "cuda", dtype)
    position_ids = _packed_positions(2, 16, "cuda")
    # Every other element along head_dim (the scalar path).
    q = torch.randn(2, 16, 4, 128, dtype=dtype, device="cuda")[..., ::2]
    k = torch.randn(2, 3, 16, 128, dtype=dtype, device="cuda")[..., ::2].transpose(1, 2)
    _check_kernel(q, k, cos, sin, position_ids, "bshd")
    # Starting one element past a 16-byte boundary.
    flat = torch.randn(2 * 16 * 5 * 64 + 1, dtype=dtype, device="cuda")
    q = flat[1:].view(2, 16, 5, 64)
    k = torch.randn(2, 16, 1, 64, dtype=dtype, device="cuda")
    _check_kernel(q, k, cos, sin, position_ids, "bshd")
    # The cache itself a strided view.
    wide_cos, wide_sin = (torch.cat((t, t), dim=-1) for t in (cos, sin))
    _check_kernel(q, k, wide_cos[:, :64], wide_sin[:, :64], position_ids, "bshd")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_touches_only_the_rotary_dims_of_q_and_k(dtype):
    """q and k as views of one fused qkv output: rotated in place, no copy; v and the dims past
    rotary_dim keep their bits, as does everything around the buffer."""
    batch, seq, hq, hk, d = 2, 33, 8, 2, 128
    buf = torch.randn(batch * seq * (hq + 2 * hk) * d + 2 * 4096, dtype=dtype, device="cuda")
    before = buf.clone()
    qkv = buf[4096:-4096].view(batch, seq, hq + 2 * hk, d)
    q, k, v = qkv.split([hq, hk, hk], dim=2)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = rope_cache({"head_dim": d, "partial_rotary_factor": 0.75}, seq, "cuda")
    position_ids = torch.arange(seq, device="cuda")[None]
    exp_q, exp_k = _reference_in_fp32(q, k, cos, sin, position_ids, "bhsd")
    out_q, out_k = apply_rope_(q, k, cos, sin, position_ids)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    assert_close(q, exp_q)
    assert_close(k, exp_k)
    qkv_before = before[4096:-4096].view(batch, seq, hq + 2 * hk, d)
    assert torch.equal(qkv[..., 96:], qkv_before[..., 96:])
    assert torch.equal(v, qkv_before[:, :, hq + hk:])
    assert torch.equal(buf[:4096], before[:4096]) and torch.equal(buf[-4096:], before[-4096:])


@pytest.mark.cuda
def test_kernel_matches_transformers_llama():
    """bf16 Llama-3 attention inputs: the cache equals transformers' cos/sin; the rotation is
    within tolerance of fp32 math and no further from fp64 than transformers' bf16 math."""
    config = _config("llama3", head_dim=128)
    position_ids = _packed_positions(2, 300, "cuda")
    q, k = _qk(2, 300, 32, 8, 128, torch.bfloat16, "cuda", "bhsd")
    cos_g, sin_g = _transformers_cos_sin(config, position_ids, torch.bfloat16)
    cos, sin = rope_cache(config, 300, "cuda", torch.bfloat16)
    torch.testing.assert_close(cos[position_ids], cos_g, atol=0, rtol=0)
    torch.testing.assert_close(sin[position_ids], sin_g, atol=0, rtol=0)
    exp_q, exp_k = _reference_in_fp32(q, k, cos, sin, position_ids, "bhsd")
    got_q, got_k = _run_kernel(q, k, cos, sin, position_ids, "bhsd")
    assert_close(got_q, exp_q)
    assert_close(got_k, exp_k)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos_g, sin_g)
    oracle_q, oracle_k = apply_rotary_pos_emb(q.double(), k.double(), cos_g.double(),
                                              sin_g.double())
    assert_no_worse_than_reference(got_q, ref_q, oracle_q)
    assert_no_worse_than_reference(got_k, ref_k, oracle_k)


@pytest.mark.cuda
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_gradients(dtype, loss):
    q, k = _qk(2, 23, 4, 4, 64, dtype, "cuda", "bhsd")
    cos, sin = rope_cache({"head_dim": 64}, 23, "cuda")
    position_ids = _packed_positions(2, 23, "cuda")
    got = _grads_through_apply_rope(q, k, cos, sin, position_ids, "bhsd", LOSSES[loss])
    expected = _grads_through_reference(q.float(), k.float(), cos, sin, position_ids, "bhsd",
                                        LOSSES[loss])
    for g, e in zip(got, expected):
        assert_close(g, e.to(dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_kernel_gradcheck_fp64(layout):
    q, k = _qk(2, 5, 3, 1, 16, torch.float64, "cuda", layout)
    cos, sin = _random_cache(8, 12, torch.float64, "cuda")
    position_ids = torch.randint(0, 8, (2, 5), device="cuda")
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: apply_rope_(a.clone(), b.clone(), cos, sin, position_ids, layout), (q, k))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["rope_fwd", "rope_bwd"])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                               (torch.float16, torch.float32),
                                               (torch.float64, None)])
def test_opcheck_cuda(name, dtype, cache_dtype):
    torch.library.opcheck(getattr(torch.ops.unsloth_ext, name).default,
                          _opcheck_args("cuda", dtype, cache_dtype))


@pytest.mark.cuda
def test_kernel_runs_and_disable_switch(monkeypatch):
    q, k = _qk(2, 16, 4, 2, 64, torch.bfloat16, "cuda", "bhsd")
    cos, sin = rope_cache({"head_dim": 64}, 16, "cuda")
    position_ids = torch.arange(16, device="cuda")
    with torch.profiler.profile() as prof:
        apply_rope_(_like(q), _like(k), cos, sin, position_ids)
    assert any("unsloth_ext::rope_fwd" in e.name for e in prof.events())
    monkeypatch.setenv("UNSLOTH_EXT_DISABLE", "rope")
    with torch.profiler.profile() as prof:
        out = apply_rope_(_like(q), _like(k), cos, sin, position_ids)
    assert not any("unsloth_ext::" in e.name for e in prof.events())
    for got, expected in zip(out, apply_rope_reference(q, k, cos, sin, position_ids)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.cuda
def test_torch_compile_traces_the_op():
    cos, sin = rope_cache({"head_dim": 64}, 32, "cuda")
    position_ids = _packed_positions(2, 32, "cuda")

    def attention_like(proj_q, proj_k):
        q = proj_q.view(2, 32, 4, 64).transpose(1, 2)
        k = proj_k.view(2, 32, 2, 64).transpose(1, 2)
        q, k = apply_rope_(q, k, cos, sin, position_ids)
        return torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True).sum()

    proj_q = torch.randn(2, 32, 256, device="cuda")
    proj_k = torch.randn(2, 32, 128, device="cuda")
    expected = _grads_of(attention_like, proj_q, proj_k)
    got = _grads_of(torch.compile(attention_like, fullgraph=True), proj_q, proj_k)
    for g, e in zip(got, expected):
        assert_close(g, e, scale=4.0)


@pytest.mark.cuda
def test_kernel_positions_outside_the_cache_give_nan():
    q, k = _qk(1, 6, 2, 1, 64, torch.float32, "cuda", "bshd")
    cos, sin = rope_cache({"head_dim": 64}, 4, "cuda")
    position_ids = torch.tensor([[0, 1, 4, 3, -1, 2]], device="cuda")
    out_q, out_k = apply_rope_(_like(q), _like(k), cos, sin, position_ids, "bshd")
    bad = torch.tensor([False, False, True, False, True, False], device="cuda")
    assert out_q[:, bad].isnan().all() and out_k[:, bad].isnan().all()
    exp_q, exp_k = apply_rope_reference(q[:, ~bad], k[:, ~bad], cos, sin, position_ids[:, ~bad],
                                        "bshd")
    assert_close(out_q[:, ~bad], exp_q)
    assert_close(out_k[:, ~bad], exp_k)


@pytest.mark.cuda
def test_kernel_bad_inputs():
    fwd = torch.ops.unsloth_ext.rope_fwd
    q = torch.randn(2, 5, 4, 64, device="cuda")
    k = torch.randn(2, 5, 2, 64, device="cuda")
    cos, sin = rope_cache({"head_dim": 64}, 8, "cuda")
    pos = torch.arange(5, device="cuda").expand(2, 5)
    with pytest.raises(ValueError, match="cos is on cpu but q is on cuda"):
        fwd(q, k, cos.cpu(), sin, pos)
    with pytest.raises(ValueError, match="q is on cpu; this kernel needs a CUDA tensor"):
        fwd(q.cpu(), k, cos, sin, pos)
    with pytest.raises(ValueError, match="position_ids is on cpu"):
        apply_rope_(q, k, cos, sin, pos.cpu(), "bshd")
    with pytest.raises(ValueError, match="k has head_dim 32 but q has head_dim 64"):
        fwd(q, k[..., :32], cos, sin, pos)
    with pytest.raises(ValueError, match="position_ids has shape"):
        fwd(q, k, cos, sin, pos[:, :4])
    with pytest.raises(TypeError, match="position_ids has dtype"):
        fwd(q, k, cos, sin, pos.float())
    with pytest.raises(TypeError, match="k has dtype"):
        fwd(q, k.half(), cos, sin, pos)
    with pytest.raises(ValueError, match="share memory"):
        fwd(q, q, cos, sin, pos)
    with pytest.raises(ValueError, match="elements that share memory"):
        fwd(q, torch.randn(2, 5, 1, 64, device="cuda").expand(2, 5, 2, 64), cos, sin, pos)
    with pytest.raises(ValueError, match="even"):
        fwd(q, k, cos[:, :63], sin[:, :63], pos)
    wide = torch.randn(8, 1024, device="cuda")
    with pytest.raises(ValueError, match="at most 512"):
        fwd(torch.randn(1, 5, 1, 1024, device="cuda"), torch.randn(1, 5, 1, 1024, device="cuda"),
            wide, wide, pos[:1])
    with pytest.raises(ValueError, match="empty"):
        fwd(q[:, :0], k[:, :0], cos, sin, pos[:, :0])


@pytest.mark.cuda
def test_kernel_over_2_pow_31_elements():
    """int64 offsets: q has more than 2^31 elements; packed positions keep the cache small."""
    heads, d = 8, 128
    seq = (1 << 31) // (heads * d) + 7
    q = torch.randn(1, seq, heads, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, seq, 1, d, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_cache({"head_dim": d}, 4096, "cuda")
    position_ids = (torch.arange(seq, device="cuda") % 4096)[None]
    tail = slice(seq - 5, seq)
    exp_q, exp_k = _reference_in_fp32(q[:, tail], k[:, tail], cos, sin, position_ids[:, tail],
                                      "bshd")
    apply_rope_(q, k, cos, sin, position_ids, "bshd")
    assert_close(q[:, tail], exp_q)
    assert_close(k[:, tail], exp_k)
