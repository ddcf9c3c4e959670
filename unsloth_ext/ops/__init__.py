"""Every op: a thin wrapper named like the op, its PyTorch reference, and its registration."""

from unsloth_ext.ops.rms_norm import rms_norm, rms_norm_reference
from unsloth_ext.ops.layer_norm import layer_norm, layer_norm_reference
from unsloth_ext.ops.add_rms_norm import (add_rms_norm, add_rms_norm_reference,
                                          rms_norm_and_residual)
from unsloth_ext.ops.nf4 import nf4_dequantize, nf4_gemv
from unsloth_ext.ops.cross_entropy import (LinearCrossEntropy, cross_entropy,
                                           cross_entropy_reference, fused_linear_cross_entropy)
from unsloth_ext.ops.glu import (geglu, geglu_backward_, geglu_reference, swiglu,
                                 swiglu_backward_, swiglu_reference)
from unsloth_ext.ops.rope import apply_rope_, apply_rope_reference, rope_cache

# Public op name -> the registered ops behind it (the environment report lists these).
KERNEL_OPS = {
    "rms_norm": ("rms_norm_fwd", "rms_norm_bwd"),
    "layer_norm": ("layer_norm_fwd", "layer_norm_bwd"),
    "add_rms_norm": ("add_rms_norm_fwd", "add_rms_norm_bwd"),
    "nf4": ("nf4_dequantize", "nf4_gemv"),
    "cross_entropy": ("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_bwd_",
                      "cross_entropy_fwd_bwd_"),
    "swiglu": ("swiglu_fwd", "swiglu_bwd", "swiglu_bwd_"),
    "geglu": ("geglu_fwd", "geglu_bwd", "geglu_bwd_"),
    "rope": ("rope_fwd", "rope_bwd"),
}

__all__ = [
    "KERNEL_OPS",
    "LinearCrossEntropy", "add_rms_norm", "add_rms_norm_reference", "apply_rope_",
    "apply_rope_reference", "cross_entropy", "cross_entropy_reference",
    "fused_linear_cross_entropy", "geglu", "geglu_backward_", "geglu_reference", "layer_norm",
    "layer_norm_reference", "nf4_dequantize", "nf4_gemv", "rms_norm", "rms_norm_and_residual",
    "rms_norm_reference", "rope_cache", "swiglu", "swiglu_backward_", "swiglu_reference",
]
