import copy
import dataclasses

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_f
import pytest
import torch
from bitsandbytes.functional import QuantState

from helpers import (DTYPES_16, TOLERANCES, assert_close, assert_no_worse_than_reference,
                     needs_extension, poison_cuda_allocator)
from unsloth_ext.nf4 import (DYNAMIC_MAP, NF4_MIDPOINTS, LoRA, NF4Weight, dequantize_nf4,
                             nf4_matmul, quantize_nf4)
from unsloth_ext.ops.nf4 import (NF4_LEVELS, nf4_absmax_reference, nf4_gemv_reference,
                                 nf4_gemv_supported, nf4_values_reference)

BF16_TOL = TOLERANCES[torch.bfloat16]
# (shape, blocksize): numel a multiple of blocksize, as the format requires. bitsandbytes itself
# also takes other sizes (a partial last block, an odd count padded with a zero nibble); real
# weights never have them, and this package rejects them.
QUANT_SHAPES = [((1, 64), 64), ((7, 576), 64), ((769, 128), 64), ((64, 7), 64),
                ((128, 33), 64), ((5, 1088), 64), ((7, 96), 32), ((33, 128), 128),
                ((6, 1280), 256), ((3, 4096), 4096)]


def _randn(shape, dtype, device="cpu", std=1.0):
    return (torch.randn(shape, device=device) * std).to(dtype)


def _bnb_quantize(weight, blocksize, double_quant):
    packed, state = bnb_f.quantize_4bit(weight, blocksize=blocksize,
                                        compress_statistics=double_quant, quant_type="nf4")
    return packed, state


def _bnb_state(w: NF4Weight) -> QuantState:
    """w's state as a bitsandbytes QuantState (for reading our bytes with bitsandbytes)."""
    nested, offset = None, None
    if w.double_quant:
        nested = QuantState(absmax=w.absmax2, code=w.code2, blocksize=256, dtype=torch.float32)
        offset = torch.tensor(w.offset, device=w.device)
    return QuantState(absmax=w.absmax, shape=w.shape, code=NF4_LEVELS.to(w.device),
                      blocksize=w.blocksize, quant_type="nf4", dtype=w.dtype, offset=offset,
                      state2=nested)


def _bnb_dequantize(packed, state) -> torch.Tensor:
    """bitsandbytes' dequantization of the state, in its shape. Values are read in flat order,
    so it runs on a [blocks, blocksize] view (an odd width, like a blocksize over 1024, sends
    bitsandbytes' CPU backend through a slow torch.compile)."""
    state = copy.copy(state)
    shape = state.shape
    state.shape = torch.Size((shape.numel() // state.blocksize, state.blocksize))
    return bnb_f.dequantize_4bit(packed.view(-1, 1), state).view(shape)


def _from_bnb_outputs(packed, state) -> NF4Weight:
    param = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True,
                              quant_type="nf4", blocksize=state.blocksize)
    return NF4Weight.from_bnb(param)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _assert_nearest_codes(ours, theirs, values, table):
    """ours is a nearest entry of `table` for every value; where bitsandbytes picked another
    code, that code is no nearer."""
    table = table.to(values.device)
    dist_ours = (values - table[ours.long()]).abs()
    dist_theirs = (values - table[theirs.long()]).abs()
    nearest = (values[:, None] - table[None, :]).abs().min(dim=1).values
    assert torch.equal(dist_ours, nearest)
    assert bool((dist_ours <= dist_theirs).all())


def _assert_codes_agree_but_near_midpoints(ours, theirs, weight, blocksize):
    """Equal NF4 codes, except for values within a few ulps of a midpoint between two levels
    (bitsandbytes' CUDA build takes the block's reciprocal with fast math)."""
    def codes(packed):
        return torch.stack((packed >> 4, packed & 15), dim=-1).view(-1).long()
    a, b = codes(ours), codes(theirs)
    differ = (a != b).nonzero().flatten()
    assert differ.numel() <= 1e-4 * a.numel()
    assert bool(((a[differ] - b[differ]).abs() == 1).all())
    values = weight.reshape(-1, blocksize).float()
    scaled = (values * (1.0 / values.abs().amax(1, keepdim=True))).view(-1)[differ]
    midpoint = NF4_MIDPOINTS.to(weight.device)[torch.minimum(a[differ], b[differ])]
    assert bool(((scaled - midpoint).abs() <= 1e-6).all())


# --- format constants ---------------------------------------------------------------------------

def test_levels_and_dynamic_map_match_bitsandbytes():
    assert torch.equal(NF4_LEVELS, bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_MAP, bnb_f.create_dynamic_map())


# --- quantizer against bitsandbytes (CPU) -------------------------------------------------------

@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,blocksize", QUANT_SHAPES, ids=str)
def test_quantize_matches_bitsandbytes(shape, blocksize, dtype, double_quant):
    weight = _randn(shape, dtype, std=0.05)
    ours = quantize_nf4(weight, blocksize, double_quant, compute_dtype=torch.bfloat16)
    packed, state = _bnb_quantize(weight, blocksize, double_quant)
    assert torch.equal(ours.packed, packed.view(-1))
    if not double_quant:
        assert torch.equal(ours.absmax, state.absmax)
        return
    assert ours.offset == state.offset.item()
    assert torch.equal(ours.absmax2, state.state2.absmax)
    assert torch.equal(ours.code2, state.state2.code)
    # bitsandbytes' CPU library searches the 8-bit map approximately: compare by distance.
    absmax = weight.reshape(-1, blocksize).float().abs().amax(1)
    groups = torch.arange(absmax.numel()) // 256
    scaled = (absmax - ours.offset) * (1.0 / ours.absmax2.clamp_min(1e-38))[groups]
    _assert_nearest_codes(ours.absmax, state.absmax, scaled.clamp(-1, 1), DYNAMIC_MAP)


def test_quantize_rounds_ties_to_the_lower_level():
    # Block absmax 1 makes the scaled values the inputs themselves: each midpoint is a tie.
    values = torch.cat([torch.ones(1), NF4_MIDPOINTS, -NF4_LEVELS[:16]])
    weight = values.view(1, 32)
    ours = quantize_nf4(weight, blocksize=32, double_quant=False,
                        compute_dtype=torch.bfloat16)
    codes = torch.stack((ours.packed >> 4, ours.packed & 15), -1).view(-1)
    assert codes[1:16].tolist() == list(range(15))
    packed, _ = _bnb_quantize(weight, 32, False)
    assert torch.equal(ours.packed, packed.view(-1))


# --- dequantization and the reader (CPU) --------------------------------------------------------

@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("shape,blocksize", QUANT_SHAPES[:-1] + [((3, 4096), 1024)], ids=str)
def test_dequantize_matches_bitsandbytes(shape, blocksize, dtype, double_quant):
    weight = _randn(shape, dtype, std=0.05)
    packed, state = _bnb_quantize(weight, blocksize, double_quant)
    w = _from_bnb_outputs(packed, state)
    assert w.shape == weight.shape and w.dtype == dtype and w.double_quant == double_quant
    expected = _bnb_dequantize(packed, state)
    assert torch.equal(_bits(dequantize_nf4(w)), _bits(expected))
    # And the other way: bitsandbytes reads what quantize_nf4 writes.
    ours = quantize_nf4(weight, blocksize, double_quant)
    theirs = _bnb_dequantize(ours.packed, _bnb_state(ours))
    assert torch.equal(_bits(ours.dequantize()), _bits(theirs))


@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_is_bounded(double_quant):
    weight = _randn((96, 256), torch.float32, std=0.02)
    w = quantize_nf4(weight, 64, double_quant, compute_dtype=torch.bfloat16)
    restored = w.dequantize().float()
    absmax = weight.reshape(-1, 64).abs().amax(1).repeat_interleave(64).view(weight.shape)
    # Half the widest gap between levels, plus the absmax's own quantization and bf16 rounding.
    half_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    assert bool(((weight - restored).abs() <= absmax * (half_gap + 0.02)).all())
    assert (weight - restored).norm() / weight.norm() < 0.12


def test_dequantize_into_a_reused_buffer():
    w = quantize_nf4(_randn((64, 128), torch.bfloat16))
    buffer = torch.full((64, 128), float("nan"), dtype=torch.bfloat16)
    out = dequantize_nf4(w, buffer)
    assert out.data_ptr() == buffer.data_ptr()
    assert torch.equal(_bits(out), _bits(dequantize_nf4(w)))


@pytest.mark.parametrize("make,err,match", [
    (lambda: torch.empty(64, 127, dtype=torch.bfloat16), ValueError, "expected \\(64, 128\\)"),
    (lambda: torch.empty(64, 128, dtype=torch.float16), ValueError, "float16"),
    (lambda: torch.empty(128, 64, dtype=torch.bfloat16).t(), ValueError, "contiguous rows"),
    (lambda: [0.0], TypeError, "torch.Tensor"),
])
def test_dequantize_rejects_bad_buffers(make, err, match):
    w = quantize_nf4(_randn((64, 128), torch.bfloat16))
    with pytest.raises(err, match=match):
        dequantize_nf4(w, make())


def test_from_bnb_reads_a_transformers_model(tmp_path):
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig,
                              LlamaForCausalLM)
    config = LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant,
                                                 dtype=torch.bfloat16, device_map="cpu")
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7
    x = torch.randn(3, 320, dtype=torch.bfloat16)
    for linear in linears:
        param = linear.weight
        w = NF4Weight.from_bnb(param)
        assert w.double_quant and w.blocksize == 64 and w.dtype == torch.bfloat16
        assert w.shape == (linear.out_features, linear.in_features)
        expected = bnb_f.dequantize_4bit(param.data, param.quant_state)
        assert torch.equal(_bits(w.dequantize()), _bits(expected))
        xs = x[:, :linear.in_features]
        with torch.no_grad():
            assert_close(nf4_matmul(xs, w), torch.nn.functional.linear(xs, expected))
    # A CPU forward may repack the weight into bitsandbytes' CPU-only layout: refused clearly.
    with torch.no_grad():
        linears[0](x[:, :linears[0].in_features])
    if getattr(linears[0].weight.quant_state, "packing_format_for_cpu", False):
        with pytest.raises(ValueError, match="packing_format_for_cpu"):
            NF4Weight.from_bnb(linears[0].weight)


def test_from_bnb_reads_a_parameter_once_per_quant_state():
    param = _nf4_param()
    first = NF4Weight.from_bnb(param)
    assert NF4Weight.from_bnb(param) is first
    # A new quant state (here one that is not NF4) is read anew, not served from the first read.
    _with_state(param, code=-NF4_LEVELS)
    with pytest.raises(ValueError, match="NF4 table"):
        NF4Weight.from_bnb(param)
    # So is new data under the same state: the view follows the parameter's bytes.
    param = _nf4_param()
    first = NF4Weight.from_bnb(param)
    param.data = param.data.clone()
    second = NF4Weight.from_bnb(param)
    assert second is not first and second.packed.data_ptr() == param.data.data_ptr()
    assert torch.equal(second.dequantize(), first.dequantize())


def _nf4_param(quant_type="nf4", double_quant=True, shape=(64, 128)):
    weight = _randn(shape, torch.bfloat16)
    return bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, blocksize=64,
                             compress_statistics=double_quant).to("cpu")


def _with_state(param, **changes):
    state = copy.deepcopy(param.quant_state)
    nested = changes.pop("nested", {})
    for key, value in changes.items():
        setattr(state, key, value)
    for key, value in nested.items():
        setattr(state.state2, key, value)
    param.quant_state = state
    return param


@pytest.mark.parametrize("make,err,match", [
    (lambda: _nf4_param(quant_type="fp4"), ValueError, "quant_type is 'fp4'"),
    (lambda: torch.zeros(64, dtype=torch.uint8), ValueError, "no quant_state"),
    (lambda: _with_state(_nf4_param(), blocksize=48), ValueError, "blocksize is 48"),
    (lambda: _with_state(_nf4_param(), blocksize=128), ValueError, "absmax has 128 entries"),
    (lambda: _with_state(_nf4_param(), shape=torch.Size((64, 192))), ValueError,
     "packed has 4096 bytes; expected 6144"),
    (lambda: _with_state(_nf4_param(), shape=torch.Size((8192,))), ValueError, "2-D"),
    (lambda: _with_state(_nf4_param(), dtype=torch.float64), TypeError, "dtype is"),
    (lambda: _with_state(_nf4_param(), code=-NF4_LEVELS), ValueError, "NF4 table"),
    (lambda: _with_state(_nf4_param(), nested={"blocksize": 128}), ValueError,
     "nested absmax blocksize is 128"),
    (lambda: _with_state(_nf4_param(), absmax=torch.zeros(128, dtype=torch.uint8)[:100]),
     ValueError, "absmax has 100 entries; expected 128"),
    (lambda: _with_state(_nf4_param(), nested={"absmax": torch.zeros(2)}), ValueError,
     "absmax2 has 2 entries; expected 1"),
    (lambda: _with_state(_nf4_param(double_quant=False), absmax=torch.zeros(128,
                                                                            dtype=torch.float16)),
     TypeError, "absmax has dtype torch.float16"),
])
def test_from_bnb_rejects_what_it_cannot_read(make, err, match):
    with pytest.raises(err, match=match):
        NF4Weight.from_bnb(make())


def _state(shape=(64, 128), double_quant=True, blocksize=64):
    w = quantize_nf4(_randn(shape, torch.bfloat16), blocksize, double_quant)
    return dict(packed=w.packed, absmax=w.absmax, shape=w.shape, dtype=w.dtype,
                blocksize=w.blocksize, absmax2=w.absmax2, code2=w.code2, offset=w.offset)


@pytest.mark.parametrize("changes,err,match", [
    (dict(packed=torch.zeros(4096, dtype=torch.int8)), TypeError, "packed has dtype"),
    (dict(packed=torch.zeros(4095, dtype=torch.uint8)), ValueError, "packed has 4095 bytes"),
    (dict(blocksize=100), ValueError, "blocksize is 100"),
    (dict(shape=(63, 127)), ValueError, "multiple of blocksize"),
    (dict(shape=(8192,)), ValueError, "expected \\(out_features, in_features\\)"),
    (dict(dtype=torch.float64), TypeError, "dtype is torch.float64"),
    (dict(absmax2=None), ValueError, "absmax2 or code2 is missing"),
    (dict(code2=torch.zeros(255)), ValueError, "code2 has 255 entries"),
    (dict(absmax2=torch.zeros(1, dtype=torch.float64)), TypeError, "absmax2 has dtype"),
    (dict(absmax=torch.zeros(128), absmax2=torch.zeros(1)), ValueError, "belong to a "
     "double-quantized"),
    (dict(absmax=torch.zeros(128, device="meta", dtype=torch.uint8)), ValueError,
     "absmax is on meta"),
    (dict(offset=float("nan")), ValueError, "offset is nan"),
])
def test_nf4weight_checks_its_fields(changes, err, match):
    fields = _state() | changes
    with pytest.raises(err, match=match):
        NF4Weight(**fields)


def test_nf4weight_fields_cannot_be_reassigned():
    # Dequantization trusts the state checked at construction, so it must not change after.
    w = NF4Weight(**_state())
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.blocksize = 32
    assert dataclasses.replace(w, offset=0.5).offset == 0.5  # a new, checked weight


@pytest.mark.parametrize("make,kwargs,err,match", [
    (lambda: torch.randn(128), {}, ValueError, "non-empty \\[out_features, in_features\\]"),
    (lambda: torch.randn(0, 64), {}, ValueError, "non-empty"),
    (lambda: torch.randn(2, 3, 64), {}, ValueError, "matrix"),
    (lambda: torch.ones(4, 64, dtype=torch.int32), {}, TypeError, "int32"),
    (lambda: torch.randn(4, 40, dtype=torch.bfloat16), {}, ValueError, "multiple of blocksize"),
    (lambda: torch.randn(4, 64, dtype=torch.bfloat16), {"blocksize": 96}, ValueError,
     "blocksize is 96"),
    (lambda: torch.randn(4, 64, dtype=torch.float64), {}, TypeError, "weight has dtype"),
    (lambda: torch.randn(4, 64), {"compute_dtype": torch.float64}, TypeError, "dtype is"),
    (lambda: torch.full((4, 64), float("nan"), dtype=torch.bfloat16), {}, ValueError,
     "non-finite"),
    (lambda: torch.full((4, 64), float("inf"), dtype=torch.float16), {}, ValueError,
     "non-finite"),
])
def test_quantize_rejects_bad_input(make, kwargs, err, match):
    with pytest.raises(err, match=match):
        quantize_nf4(make(), **kwargs)


# --- nf4_matmul (reference path on CPU) ---------------------------------------------------------

def _oracle(x, w: NF4Weight, lora=None):
    """fp64 product with the exact (fp32) dequantized weight."""
    exact = nf4_values_reference(w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.blocksize,
                                 torch.float32).view(w.shape)
    y = x.double() @ exact.double().T
    if lora is not None:
        y = y + lora.scale * (x.double() @ lora.a.double().T) @ lora.b.double().T
    return y


def _problem(m, n, k, dtype, device, double_quant=True, blocksize=64, rank=0,
             lora_dtype=None):
    weight = _randn((n, k), torch.float32, device, std=0.25 / k**0.5)
    w = quantize_nf4(weight, blocksize, double_quant, compute_dtype=dtype)
    x = _randn((m, k), dtype, device)
    lora = None
    if rank:
        lora_dtype = lora_dtype or dtype
        lora = LoRA(_randn((rank, k), lora_dtype, device, std=1 / k**0.5),
                    _randn((n, rank), lora_dtype, device, std=0.1 / rank**0.5), 2.0)
    return x, w, lora


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 40])
def test_matmul_matches_dequantize_then_matmul(m, rank):
    x, w, lora = _problem(m, 96, 128, torch.bfloat16, "cpu", rank=rank,
                          lora_dtype=torch.float32)
    y = nf4_matmul(x, w, lora)
    assert y.shape == (m, 96) and y.dtype == torch.bfloat16
    assert_close(y, _oracle(x, w, lora).to(torch.bfloat16))


def test_matmul_keeps_leading_dimensions():
    x, w, _ = _problem(6, 64, 192, torch.float16, "cpu", double_quant=False)
    y = nf4_matmul(x.view(2, 3, 192), w)
    assert y.shape == (2, 3, 64)
    assert torch.equal(y.view(6, 64), nf4_matmul(x, w))


@pytest.mark.parametrize("make,err,match", [
    (lambda x, w: (x.half(), w, None), TypeError, "expected torch.bfloat16"),
    (lambda x, w: (x[:, :64], w, None), ValueError, "expected \\[..., 128\\]"),
    (lambda x, w: (x.requires_grad_(True), w, None), ValueError, "gradients"),
    (lambda x, w: (x, w.packed, None), TypeError, "NF4Weight"),
    (lambda x, w: (x, w, (torch.randn(4, 128),)), TypeError, "\\(a, b, scale\\)"),
    (lambda x, w: (x, w, LoRA(torch.randn(4, 64), torch.randn(96, 4), 1.0)), ValueError,
     "lora_a has shape \\(4, 64\\)"),
    (lambda x, w: (x, w, LoRA(torch.randn(4, 128), torch.randn(96, 5), 1.0)), ValueError,
     "lora_b has shape \\(96, 5\\)"),
    (lambda x, w: (x, w, LoRA(torch.randn(4, 128).double(), torch.randn(96, 4), 1.0)),
     TypeError, "lora_a has dtype torch.float64"),
    (lambda x, w: (x, w, LoRA(torch.randn(4, 128), None, 1.0)), ValueError, "together"),
])
def test_matmul_rejects_bad_input(make, err, match):
    x, w, _ = _problem(2, 96, 128, torch.bfloat16, "cpu")
    args = make(x, w)
    with pytest.raises(err, match=match):
        nf4_matmul(*args)


# --- registered ops on CPU (the reference is the CPU kernel) ------------------------------------

def _op_args(w: NF4Weight):
    return (w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.blocksize)


@needs_extension
@pytest.mark.parametrize("double_quant", [True, False])
def test_opcheck_cpu(double_quant):
    x, w, lora = _problem(3, 48, 128, torch.bfloat16, "cpu", double_quant, rank=2)
    out = torch.empty(w.shape, dtype=w.dtype)
    torch.library.opcheck(torch.ops.unsloth_ext.nf4_dequantize.default, _op_args(w) + (out,))
    gemv = torch.ops.unsloth_ext.nf4_gemv.default
    torch.library.opcheck(gemv, (x,) + _op_args(w) + (48, None, None, 1.0))
    torch.library.opcheck(gemv, (x,) + _op_args(w) + (48, lora.a, lora.b, lora.scale))


@needs_extension
def test_cpu_ops_run_the_reference():
    x, w, lora = _problem(3, 48, 128, torch.float16, "cpu", rank=2, lora_dtype=torch.float32)
    out = torch.empty(w.shape, dtype=w.dtype)
    torch.ops.unsloth_ext.nf4_dequantize(*_op_args(w), out)
    assert torch.equal(_bits(out), _bits(dequantize_nf4(w)))
    y = torch.ops.unsloth_ext.nf4_gemv(x, *_op_args(w), 48, lora.a, lora.b, lora.scale)
    assert torch.equal(y, nf4_gemv_reference(x, *_op_args(w), 48, lora.a, lora.b, lora.scale))


# --- CUDA kernels -------------------------------------------------------------------------------

DEQUANT_SHAPES = [((1, 64), 64), ((7, 576), 64), ((769, 128), 64), ((64, 7), 64),
                  ((5125, 64), 64), ((7, 96), 32), ((33, 128), 128), ((6, 1280), 256),
                  ((3, 4096), 4096), ((14336, 4096), 64)]


@pytest.mark.cuda
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("shape,blocksize", DEQUANT_SHAPES, ids=str)
def test_dequantize_kernel_is_bit_exact(shape, blocksize, dtype, double_quant):
    w = quantize_nf4(_randn(shape, dtype, "cuda"), blocksize, double_quant)
    out = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    dequantize_nf4(w, out)
    expected = nf4_values_reference(*_op_args(w), dtype).view(shape)
    assert torch.equal(_bits(out), _bits(expected))
    cpu = NF4Weight(w.packed.cpu(), w.absmax.cpu(), w.shape, w.dtype, w.blocksize,
                    None if w.absmax2 is None else w.absmax2.cpu(),
                    None if w.code2 is None else w.code2.cpu(), w.offset)
    assert torch.equal(_bits(out.cpu()), _bits(dequantize_nf4(cpu)))


@pytest.mark.cuda
def test_dequantize_kernel_unaligned_buffers():
    w = quantize_nf4(_randn((96, 320), torch.bfloat16, "cuda"))
    expected = dequantize_nf4(w)
    storage = torch.full((96 * 320 + 1,), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = storage[1:].view(96, 320)  # 2 bytes past a 16-byte boundary
    dequantize_nf4(w, out)
    assert torch.equal(_bits(out), _bits(expected))
    packed = torch.empty(w.packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:]
    packed.copy_(w.packed)
    shifted = NF4Weight(packed, w.absmax, w.shape, w.dtype, w.blocksize, w.absmax2, w.code2,
                        w.offset)
    assert torch.equal(_bits(dequantize_nf4(shifted)), _bits(expected))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("pad", [8, 24, 5])
def test_dequantize_into_rows_of_a_wider_matrix(device, pad):
    """Rows pad columns apart beyond the weight's width (the kernel writes them in place when pad
    is a multiple of 8, else through a contiguous buffer); the columns past each row are left as
    they were. On CUDA the op itself also takes a transposed buffer."""
    w = quantize_nf4(_randn((96, 320), torch.bfloat16, device))
    expected = dequantize_nf4(w)
    wide = torch.full((96, 320 + pad), float("nan"), dtype=torch.bfloat16, device=device)
    dequantize_nf4(w, wide[:, :320])
    assert torch.equal(_bits(wide[:, :320]), _bits(expected))
    assert wide[:, 320:].isnan().all()
    if device == "cuda":
        transposed = torch.empty(320, 96, dtype=torch.bfloat16, device=device).t()
        torch.ops.unsloth_ext.nf4_dequantize(*_op_args(w), transposed)
        assert torch.equal(_bits(transposed), _bits(expected))


@pytest.mark.cuda
def test_dequantize_kernel_over_2_pow_31_values():
    rows, cols = 32769, 65536  # 2^31 + 65536 values
    packed = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8, device="cuda")
    n_blocks = rows * cols // 64
    absmax = torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, device="cuda")
    absmax2 = torch.rand(-(-n_blocks // 256), device="cuda") + 0.5
    w = NF4Weight(packed, absmax, (rows, cols), torch.bfloat16, 64, absmax2,
                  DYNAMIC_MAP.cuda(), 0.25)
    out = dequantize_nf4(w)
    scale = nf4_absmax_reference(absmax, absmax2, w.code2, w.offset)
    for first_row in (0, rows // 2, rows - 3):
        rows_slice = slice(first_row, first_row + 3)
        byte0, block0 = first_row * cols // 2, first_row * cols // 64
        expected = nf4_values_reference(packed[byte0:byte0 + 3 * cols // 2],
                                        scale[block0:block0 + 3 * cols // 64], None, None, 0.0,
                                        64, torch.bfloat16)
        assert torch.equal(_bits(out[rows_slice].reshape(-1)), _bits(expected))


def _gemv(x, w: NF4Weight, lora=None):
    poison_cuda_allocator(4 * x.shape[0] * w.shape[0])
    a, b, scale = lora if lora is not None else (None, None, 1.0)
    return torch.ops.unsloth_ext.nf4_gemv(x, *_op_args(w), w.shape[0], a, b, scale)


def _check_gemv(y, x, w, lora=None):
    """Within bf16 tolerance of dequantize-then-matmul, and no further from the fp64 product
    than torch.matmul on the dequantized weight."""
    oracle = _oracle(x, w, lora)
    reference = nf4_gemv_reference(x, *_op_args(w), w.shape[0],
                                   *(lora if lora is not None else (None, None, 1.0)))
    assert not y.isnan().any()
    torch.testing.assert_close(y, reference, **BF16_TOL)
    if y.numel() < 512:  # too few values for a stable error ratio
        return
    torch_path = x @ dequantize_nf4(w).T
    if lora is not None:
        torch_path = torch_path + (lora.scale * (x.float() @ lora.a.float().T)
                                   @ lora.b.float().T).to(x.dtype)
    assert_no_worse_than_reference(y, torch_path, oracle, slack=1e-4)


GEMV_SHAPES = [(1, 64), (7, 192), (769, 384), (769, 4160), (5125, 1088), (4096, 14336),
               (14336, 4096)]


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=str)
def test_gemv_kernel_matches_dequantize_then_matmul(shape, m):
    x, w, _ = _problem(m, *shape, torch.bfloat16, "cuda")
    _check_gemv(_gemv(x, w), x, w)


@pytest.mark.cuda
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128, 512])
@pytest.mark.parametrize("dtype", DTYPES_16)
@pytest.mark.parametrize("m", [1, 5, 16])
def test_gemv_kernel_formats_and_dtypes(m, dtype, blocksize, double_quant):
    x, w, _ = _problem(m, 1000, 1536, dtype, "cuda", double_quant, blocksize)
    _check_gemv(_gemv(x, w), x, w)


@pytest.mark.cuda
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rank", [1, 12, 16, 64])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("shape", [(7, 192), (769, 4160), (4096, 14336)], ids=str)
def test_gemv_kernel_with_lora(shape, m, rank, lora_dtype):
    x, w, lora = _problem(m, *shape, torch.bfloat16, "cuda", rank=rank, lora_dtype=lora_dtype)
    _check_gemv(_gemv(x, w, lora), x, w, lora)


def test_gemv_takes_weights_up_to_2_pow_36_values():
    assert nf4_gemv_supported(16, 1 << 29, 128, 64)
    assert not nf4_gemv_supported(16, (1 << 29) + 1, 128, 64)
    assert not nf4_gemv_supported(17, 64, 128, 64)
    assert not nf4_gemv_supported(1, 64, 96, 64)


@pytest.mark.cuda
def test_gemv_kernel_strided_and_unaligned_inputs():
    x, w, lora = _problem(3, 512, 1024, torch.float16, "cuda", rank=8)
    wide = torch.randn(3, 2048, dtype=torch.float16, device="cuda")
    wide[:, 1024:] = x
    strided = wide[:, 1024:]
    shifted = torch.empty(3 * 1024 + 1, dtype=torch.float16, device="cuda")[1:].view(3, 1024)
    shifted.copy_(x)
    expected = _gemv(x, w, lora)
    for variant in (strided, shifted, x.t().contiguous().t()):
        assert torch.equal(_gemv(variant, w, lora), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("m", [1, 16, 17, 64])
def test_matmul_on_cuda(m):
    x, w, lora = _problem(m, 384, 640, torch.bfloat16, "cuda", rank=8,
                          lora_dtype=torch.float32)
    y = nf4_matmul(x, w, lora)
    torch.testing.assert_close(y, _oracle(x, w, lora).to(y.dtype), **BF16_TOL)


@pytest.mark.cuda
@pytest.mark.parametrize("double_quant", [True, False])
def test_opcheck_cuda(double_quant):
    x, w, lora = _problem(3, 48, 128, torch.bfloat16, "cuda", double_quant, rank=2)
    out = torch.empty(w.shape, dtype=w.dtype, device="cuda")
    torch.library.opcheck(torch.ops.unsloth_ext.nf4_dequantize.default, _op_args(w) + (out,))
    gemv = torch.ops.unsloth_ext.nf4_gemv.default
    torch.library.opcheck(gemv, (x,) + _op_args(w) + (48, None, None, 1.0))
    torch.library.opcheck(gemv, (x,) + _op_args(w) + (48, lora.a, lora.b, lora.scale))


@pytest.mark.cuda
def test_kernel_bad_inputs():
    gemv, dequant = torch.ops.unsloth_ext.nf4_gemv, torch.ops.unsloth_ext.nf4_dequantize
    x, w, lora = _problem(2, 64, 128, torch.bfloat16, "cuda", rank=2)
    args = _op_args(w)
    with pytest.raises(ValueError, match="packed is on cpu but x is on cuda"):
        gemv(x, w.packed.cpu(), *args[1:], 64, None, None, 1.0)
    with pytest.raises(ValueError, match="1 <= M <= 16"):
        gemv(x.repeat(9, 1), *args, 64, None, None, 1.0)
    with pytest.raises(ValueError, match="multiple of 64"):
        gemv(x[:, :96].contiguous(), *args, 64, None, None, 1.0)
    with pytest.raises(ValueError, match="blocksize is 32; the NF4 GEMV needs 64"):
        gemv(x, *args[:5], 32, 64, None, None, 1.0)
    with pytest.raises(ValueError, match="packed has 4096 bytes; expected 8192"):
        gemv(x, *args, 128, None, None, 1.0)
    with pytest.raises(TypeError, match="x has dtype Float"):
        gemv(x.float(), *args, 64, None, None, 1.0)
    with pytest.raises(ValueError, match="lora_b has shape"):
        gemv(x, *args, 64, lora.a, lora.b[:, :1], 1.0)
    with pytest.raises(TypeError, match="lora_a has dtype Half"):
        gemv(x, *args, 64, lora.a.half(), lora.b, 1.0)
    with pytest.raises(ValueError, match="absmax has 127 entries"):
        gemv(x, w.packed, w.absmax[:127], *args[2:], 64, None, None, 1.0)
    with pytest.raises(ValueError, match="takes at most 2\\^36"):
        gemv(x, *args, 1 << 30, None, None, 1.0)
    out = torch.empty(64, 128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(TypeError, match="out has dtype Float"):
        dequant(*args, out.float())
    with pytest.raises(ValueError, match="out is empty"):
        dequant(*args, out[:0])


@pytest.mark.cuda
def test_kernel_runs_and_disable_switch(monkeypatch):
    x, w, _ = _problem(1, 256, 512, torch.bfloat16, "cuda")
    with torch.profiler.profile() as prof:
        nf4_matmul(x, w)
        w.dequantize()
    names = {e.name for e in prof.events()}
    assert {"unsloth_ext::nf4_gemv", "unsloth_ext::nf4_dequantize"} <= names
    monkeypatch.setenv("UNSLOTH_EXT_DISABLE", "nf4")
    with torch.profiler.profile() as prof:
        y = nf4_matmul(x, w)
    assert not any("unsloth_ext::" in e.name for e in prof.events())
    torch.testing.assert_close(y, nf4_gemv_reference(x, *_op_args(w), 256, None, None, 1.0))


@pytest.mark.cuda
def test_torch_compile_traces_the_ops():
    x, w, _ = _problem(2, 256, 512, torch.bfloat16, "cuda")
    compiled = torch.compile(lambda a: nf4_matmul(a, w) * 2 + w.dequantize()[:, 0], fullgraph=True)
    with torch.no_grad():
        expected = nf4_matmul(x, w) * 2 + w.dequantize()[:, 0]
        torch.testing.assert_close(compiled(x), expected)


@pytest.mark.cuda
def test_bitsandbytes_on_cuda():
    """The production path: bitsandbytes quantizes on the GPU when a model loads."""
    weight = _randn((4096, 1024), torch.bfloat16, "cuda", std=0.02)
    linear = bnb.nn.Linear4bit(1024, 4096, bias=False, compute_dtype=torch.bfloat16,
                               compress_statistics=True, quant_type="nf4")
    linear.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4",
                                      blocksize=64, compress_statistics=True)
    linear = linear.cuda()
    param = linear.weight
    ours = quantize_nf4(weight)
    _assert_codes_agree_but_near_midpoints(ours.packed, param.data.view(-1), weight, 64)
    assert ours.offset == param.quant_state.offset.item()
    assert torch.equal(ours.absmax2, param.quant_state.state2.absmax)
    absmax = weight.reshape(-1, 64).float().abs().amax(1)
    groups = torch.arange(absmax.numel(), device="cuda") // 256
    scaled = (absmax - ours.offset) * (1.0 / ours.absmax2.clamp_min(1e-38))[groups]
    _assert_nearest_codes(ours.absmax, param.quant_state.absmax, scaled.clamp(-1, 1),
                          DYNAMIC_MAP)
    w = NF4Weight.from_bnb(param)
    expected = bnb_f.dequantize_4bit(param.data, param.quant_state)
    assert torch.equal(_bits(w.dequantize()), _bits(expected))
    x = torch.randn(1, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        ours_y = nf4_matmul(x, w)
        theirs_y = linear(x)
    oracle = _oracle(x, w)
    assert_no_worse_than_reference(ours_y, theirs_y, oracle)
