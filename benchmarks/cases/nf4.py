"""NF4 cases on the Llama-3-8B MLP weights: 4096 -> 14336 (W [14336, 4096]) and 14336 -> 4096
(W [4096, 14336]), double-quantized, bf16. The token count is not used: the dequantize cases
have no tokens and the GEMV cases are decoding (M = 1, and M = 16, the most the GEMV takes).

nf4_dequantize: bytes = packed weight read + bf16 weight written + absmax state read.
    eager: the PyTorch reference; compiled: torch.compile of it.
nf4_gemv, nf4_gemv_lora: bytes = the packed weight only (so GB/s and % of copy are the packed
    weight's streaming rate). eager: torch.matmul on the dense bf16 weight (what a 16-bit model
    runs; speedup vs eager is the gain over it); compiled: torch.compile of the
    dequantize-then-matmul reference. The LoRA case adds a rank-16 adapter to every column
    (eager: PEFT's two extra matmuls). bound: torch.matmul of the same x on bf16 weights of
    as many bytes as the packed ones (out_features / 4 rows), which is cuBLAS streaming the
    GEMV's bytes; the "x dense" a GEMV can reach is about eager / bound.
    One GEMV moves 29 MB, which would stay in the 50 MB L2 if repeated: each timed call runs the
    product once on each of WEIGHT_COPIES different weights (all columns alike, times and bytes
    for all copies), and kernel and eager calls are replayed from CUDA graphs so that Python's
    launch time (about a 10 µs kernel's length) is not what is measured.
"""

from dataclasses import replace

import torch

from common import Case, nbytes
from unsloth_ext.nf4 import quantize_nf4
from unsloth_ext.ops.nf4 import GEMV_MAX_ROWS, nf4_dequantize_reference, nf4_values_reference

SHAPES = [(14336, 4096), (4096, 14336)]  # [out_features, in_features]
WEIGHT_COPIES = 4
LORA_RANK = 16


def _weight(out_features: int, in_features: int):
    dense = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
    return dense, quantize_nf4(dense)


def _state(w):
    return (w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.blocksize)


class _Graphed:
    """fn() captured in a CUDA graph (after a warm-up run); a call replays it. It holds fn, and
    with it the tensors the graph reads, which nothing else may keep alive."""

    def __init__(self, fn):
        self.fn = fn
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()

    def __call__(self):
        self.graph.replay()


def dequantize_cases(tokens: int) -> list[Case]:
    cases = []
    for out_features, in_features in SHAPES:
        _, w = _weight(out_features, in_features)
        out = torch.empty(w.shape, device="cuda", dtype=w.dtype)
        state = _state(w)
        dequantize = torch.ops.unsloth_ext.nf4_dequantize
        compiled = torch.compile(nf4_values_reference)
        cases.append(Case(
            "nf4_dequantize", "fwd", f"[{out_features}, {in_features}] -> bf16",
            nbytes(w.packed, w.absmax, w.absmax2, w.code2, out),
            kernel=lambda state=state, out=out: dequantize(*state, out),
            eager=lambda state=state, out=out: nf4_dequantize_reference(*state, out),
            compiled=lambda state=state, c=compiled: c(*state, torch.bfloat16)))
    return cases


def _gemv_case(out_features: int, in_features: int, rank: int, m: int = 1) -> Case:
    gemv = torch.ops.unsloth_ext.nf4_gemv
    x = torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16)
    # Copies of one weight in separate memory: the same values keep torch.compile to one graph.
    dense, w = _weight(out_features, in_features)
    weights = [(dense.clone(), replace(w, packed=w.packed.clone(), absmax=w.absmax.clone(),
                                       absmax2=w.absmax2.clone()))
               for _ in range(WEIGHT_COPIES)]
    lora = (None, None, 1.0)
    if rank:
        lora = (torch.randn(rank, in_features, device="cuda", dtype=torch.bfloat16) * 0.02,
                torch.randn(out_features, rank, device="cuda", dtype=torch.bfloat16) * 0.02, 2.0)

    def kernel():
        for _, w in weights:
            gemv(x, *_state(w), out_features, *lora)

    def dense():
        for d, _ in weights:
            y = x @ d.T
            if rank:
                y = y + (x @ lora[0].T) @ lora[1].T * lora[2]

    # bf16 weights of as many bytes as the packed ones.
    same_bytes = [torch.randn(out_features // 4, in_features, device="cuda",
                              dtype=torch.bfloat16) for _ in range(WEIGHT_COPIES)]

    def bound():
        for d in same_bytes:
            x @ d.T

    def reference(x, state):
        y = x @ nf4_values_reference(*state, x.dtype).view(out_features, in_features).T
        if rank:
            y = y + (x @ lora[0].T) @ lora[1].T * lora[2]
        return y

    compiled_reference = torch.compile(reference)

    def compiled():
        for _, w in weights:
            compiled_reference(x, _state(w))

    name = "nf4_gemv_lora" if rank else "nf4_gemv"
    adapter = f", LoRA r={rank}" if rank else ""
    return Case(name, "fwd",
                f"M={m}, [{out_features}, {in_features}]{adapter}, x{WEIGHT_COPIES} weights",
                WEIGHT_COPIES * nbytes(weights[0][1].packed),
                kernel=_Graphed(kernel), eager=_Graphed(dense), compiled=compiled,
                bound=_Graphed(bound))


def gemv_cases(tokens: int) -> list[Case]:
    cases = [_gemv_case(out_features, in_features, 0) for out_features, in_features in SHAPES]
    cases.append(_gemv_case(*SHAPES[0], LORA_RANK))
    # The most rows of x the GEMV takes (batched decoding).
    cases += [_gemv_case(out_features, in_features, 0, GEMV_MAX_ROWS)
              for out_features, in_features in SHAPES]
    return cases


CASES = {"nf4_dequantize": dequantize_cases, "nf4_gemv": gemv_cases}
