"""FastLanguageModel: load a causal LM (NF4 by default), attach LoRA, and run it patched."""

from __future__ import annotations

import warnings

import torch

from unsloth_ext._extension import UnslothExtWarning
from unsloth_ext.checkpointing import offloaded_checkpoint
from unsloth_ext.patching import patch, unwrap

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")
CHECKPOINTING_MODES = (True, False, "unsloth")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on GPUs; fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def set_gradient_checkpointing(model, mode) -> None:
    """mode True: recompute each decoder layer in the backward (torch.utils.checkpoint);
    "unsloth": the same with each layer's input held in pinned host memory; False: off."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"use_gradient_checkpointing must be one of {CHECKPOINTING_MODES}, got "
                         f"{mode!r}")
    base = unwrap(model)
    if mode is False:
        base.gradient_checkpointing_disable()
        return
    if mode == "unsloth":
        base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded_checkpoint)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Frozen embeddings: make the first layer's input require grad so gradients reach LoRA.
    base.enable_input_require_grads()
    base.config.use_cache = False


class FastLanguageModel:
    """Entry points mirroring the familiar QLoRA workflow."""

    @staticmethod
    def from_pretrained(model_name_or_path: str, max_seq_length: int = 2048,
                        dtype: torch.dtype | None = None, load_in_4bit: bool = True,
                        device_map=None, **kwargs):
        """Load a local (or cached) transformers checkpoint. Returns (model, tokenizer); the
        tokenizer is None, with a warning, when the checkpoint has none.

        dtype None: bf16 where supported, else fp16 (fp32 on CPU). load_in_4bit: NF4 with double
        quantization and `dtype` compute, through bitsandbytes. The model runs patched; an
        unsupported model type gets one warning and runs stock code.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device_map is None:
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device("cuda" if device_map != "cpu" and torch.cuda.is_available() else "cpu")
        dtype = dtype or default_dtype(device)
        if load_in_4bit:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as exc:
                raise ImportError("load_in_4bit=True needs bitsandbytes (pip install bitsandbytes)"
                                  ", or pass load_in_4bit=False") from exc
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, dtype=dtype, device_map=device_map, attn_implementation="sdpa",
            **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        except (OSError, ValueError) as exc:  # a checkpoint saved without its tokenizer
            warnings.warn(f"no tokenizer loaded from {model_name_or_path}: {exc}",
                          UnslothExtWarning, stacklevel=2)
            tokenizer = None
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_seq_length > limit:
            warnings.warn(f"max_seq_length {max_seq_length} exceeds the model's "
                          f"max_position_embeddings {limit}", UnslothExtWarning, stacklevel=2)
        model.max_seq_length = max_seq_length
        patch(model)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, r: int = 16, lora_alpha: int = 16, lora_dropout: float = 0.0,
                       target_modules=DEFAULT_TARGET_MODULES, bias: str = "none",
                       use_gradient_checkpointing=True, use_rslora: bool = False,
                       random_state: int = 3407, **lora_kwargs):
        """Attach LoRA adapters (stock PEFT `LoraConfig`, so adapters save and load in stock
        PEFT) and return the patched PEFT model ready for training."""
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(random_state)
        for param in model.parameters():
            param.requires_grad_(False)
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=list(target_modules), bias=bias,
                            use_rslora=use_rslora, task_type="CAUSAL_LM", **lora_kwargs)
        peft_model = get_peft_model(model, config)
        peft_model.max_seq_length = getattr(model, "max_seq_length", None)
        peft_model.unsloth_ext_checkpointing = use_gradient_checkpointing
        FastLanguageModel.for_training(peft_model)
        patch(peft_model)
        return peft_model

    @staticmethod
    def for_training(model):
        """Training mode, with the gradient checkpointing chosen in get_peft_model."""
        model.train()
        set_gradient_checkpointing(model, getattr(model, "unsloth_ext_checkpointing", True))
        return model

    @staticmethod
    def for_inference(model):
        """Evaluation mode for generation: no checkpointing, KV cache on."""
        model.eval()
        base = unwrap(model)
        if base.is_gradient_checkpointing:
            base.gradient_checkpointing_disable()
        base.config.use_cache = True
        return model
