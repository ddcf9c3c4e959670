"""unsloth_ext: compiled CUDA kernels and PEFT wiring for fast, lean LoRA/QLoRA fine-tuning."""

import warnings

from unsloth_ext._extension import STATE, UnslothExtWarning, startup_notice
from unsloth_ext.fast_model import FastLanguageModel
from unsloth_ext.ops import rms_norm
from unsloth_ext.patching import patch, unpatch

__version__ = "0.1.0"

_notice = startup_notice()
if _notice is not None:
    warnings.warn(_notice, UnslothExtWarning, stacklevel=2)

__all__ = ["STATE", "FastLanguageModel", "UnslothExtWarning", "patch", "rms_norm", "unpatch"]
