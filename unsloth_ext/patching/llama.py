"""Patches for the Llama family (Llama, Mistral: same layer layout in transformers 5.x).

Per decoder layer: RMSNorm kernels (leaving room after each row for the LoRA down products, so
that the NF4 base GEMMs carry the LoRA terms: `lora_mlp`'s spare_columns), the residual add fused
into the post-attention RMSNorm, q/k/v through the fused LoRA QKV, RoPE in place on q and k (on
transformers' own cos/sin, so every rope scaling is covered exactly), attention through PyTorch
SDPA, o through the LoRA projection, the MLP through the fused LoRA MLP (recomputed by the
offloaded checkpointing, whose backward never reads a layer's output, the MLP skips its down
projection's forward). The causal-LM head
computes the loss with fused linear + cross-entropy and never materializes the training logits.
Each patched forward falls back to the stock one, with one warning, for anything it does not
compute (e.g. DoRA adapters).
"""

from __future__ import annotations

import torch

from unsloth_ext.patching import PatchRecord, warn_unsupported

_ACTIVATIONS = {"silu": ("swiglu", "none"), "gelu": ("geglu", "none"),
                "gelu_pytorch_tanh": ("geglu", "tanh")}
_warned: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warn_unsupported(reason)


def _parts(module: torch.nn.Module):
    """LoraParts of a PEFT LoRA layer, a Linear or a bitsandbytes Linear4bit; an offloaded
    checkpoint's recompute reuses those its forward read."""
    from peft.tuners.lora import LoraLayer

    from unsloth_ext.checkpointing import memoized
    from unsloth_ext.lora import LoraParts, base_weight, lora_parts

    def read():
        if isinstance(module, LoraLayer):
            return lora_parts(module)
        return LoraParts(base_weight(module), module.bias)

    return memoized(("lora parts", id(module)), read)


def _lora_room(*modules: torch.nn.Module) -> int:
    """Scratch columns for a norm to leave after each row of its output, for the LoRA Functions
    to write the modules' down products into (`spare_columns`): the largest rank of each PEFT
    LoRA layer, summed, rounded up to 8 columns so that rows stay 16-byte aligned. Read from the
    layers' configuration alone; room an inactive adapter leaves is unused."""
    from peft.tuners.lora import LoraLayer

    room = sum(max(m.r.values(), default=0) for m in modules if isinstance(m, LoraLayer))
    return -(-room // 8) * 8


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    from unsloth_ext.ops.rms_norm import rms_norm

    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def mlp_forward(self, x: torch.Tensor, compute_output: bool = True,
                residual: torch.Tensor | None = None, spare_columns: int = 0) -> torch.Tensor:
    """The fused LoRA MLP, plus residual when given; compute_output=False and spare_columns: see
    `lora_mlp` (the stock fallback ignores them)."""
    from unsloth_ext.lora import lora_mlp

    activation = _ACTIVATIONS.get(self.config.hidden_act)
    try:
        if activation is None:
            raise ValueError(f"hidden_act {self.config.hidden_act!r} has no fused MLP")
        parts = (_parts(self.gate_proj), _parts(self.up_proj), _parts(self.down_proj))
    except (TypeError, ValueError) as exc:
        _fallback(f"MLP not fused: {exc}")
        out = type(self).forward(self, x)
        return out if residual is None else residual + out
    return lora_mlp(x, *parts, activation=activation[0], approximate=activation[1],
                    compute_output=compute_output, residual=residual, spare_columns=spare_columns)


def _rope_positions(cos: torch.Tensor, seq: int) -> torch.Tensor:
    """transformers' cos/sin are gathered per token, `[Bc, S, D]`: used as a cache of Bc*S rows,
    token (b, s) reads row b*S + s (row s when Bc is 1)."""
    rows = torch.arange(cos.shape[0] * seq, device=cos.device)
    return rows.view(cos.shape[0], seq)


def attention_forward(self, hidden_states: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                      attention_mask: torch.Tensor | None = None, past_key_values=None,
                      spare_columns: int = 0, **kwargs):
    """spare_columns: scratch columns after hidden_states' rows (see `lora_mlp`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from unsloth_ext.lora import lora_linear, lora_qkv
    from unsloth_ext.ops.rope import apply_rope_

    try:
        q_parts, k_parts, v_parts = (_parts(self.q_proj), _parts(self.k_proj), _parts(self.v_proj))
        o_parts = _parts(self.o_proj)
    except (TypeError, ValueError) as exc:
        _fallback(f"attention not fused: {exc}")
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  past_key_values, **kwargs)
    batch, seq = hidden_states.shape[:2]
    q, k, v = lora_qkv(hidden_states, q_parts, k_parts, v_parts, spare_columns=spare_columns)
    q = q.view(batch, seq, -1, self.head_dim)
    k = k.view(batch, seq, -1, self.head_dim)
    v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    positions = _rope_positions(cos, seq)
    q, k = apply_rope_(q, k, cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1]),
                       positions, layout="bshd")
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    out, _ = sdpa_attention_forward(self, q, k, v, attention_mask,
                                    dropout=self.attention_dropout if self.training else 0.0,
                                    scaling=self.scaling, **kwargs)
    return lora_linear(out.reshape(batch, seq, -1), o_parts), None


def decoder_layer_forward(self, hidden_states: torch.Tensor, attention_mask=None,
                          position_ids=None, past_key_values=None, use_cache=False,
                          position_embeddings=None, **kwargs) -> torch.Tensor:
    from unsloth_ext.checkpointing import gradient_sum, recomputing
    from unsloth_ext.ops.add_rms_norm import add_rms_norm, rms_norm_and_residual

    # Both norms leave room after their rows for the LoRA Functions' s·X·Aᵀ columns, which the
    # base GEMMs then read (spare_columns).
    attention, mlp = self.self_attn, self.mlp
    room = _lora_room(attention.q_proj, attention.k_proj, attention.v_proj)
    norm = self.input_layernorm
    # The norm's backward also adds the residual's gradient (no separate sum of the two).
    hidden_states, residual = rms_norm_and_residual(hidden_states, norm.weight,
                                                    norm.variance_epsilon, y_pad=room)
    hidden_states, _ = attention(hidden_states=hidden_states, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values,
                                 use_cache=use_cache, position_embeddings=position_embeddings,
                                 spare_columns=room, **kwargs)
    # residual + attention output, and the post-attention RMSNorm of that sum, in one pass. Under
    # autocast the two differ in dtype: the sum takes the promoted one, as in the stock layer.
    dtype = torch.promote_types(hidden_states.dtype, residual.dtype)
    norm = self.post_attention_layernorm
    room = _lora_room(mlp.gate_proj, mlp.up_proj)
    hidden_states, residual = add_rms_norm(hidden_states.to(dtype), residual.to(dtype),
                                           norm.weight, norm.variance_epsilon, y_pad=room)
    # Recomputed in an offloaded checkpoint's backward, the layer's output only carries the
    # gradient, so neither the MLP's output values (its down projection) nor the sum is computed.
    # Otherwise the MLP's down projection adds the residual as it writes its output.
    if recomputing(self):
        return gradient_sum(residual, mlp(hidden_states, compute_output=False,
                                          spare_columns=room))
    return mlp(hidden_states, residual=residual, spare_columns=room)


def causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                      past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                      logits_to_keep=0, **kwargs):
    """The stock forward, except that with labels in training the loss comes from fused linear +
    cross-entropy and no logits are returned (they never exist in full)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from unsloth_ext.ops.cross_entropy import fused_linear_cross_entropy, start_label_check

    if labels is None or not self.training:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if shift_labels is None:
        # Token t predicts label t+1; the last position has no target (as transformers pads).
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    head = self.lm_head.weight
    shift_labels = shift_labels.reshape(-1).to(head.device)
    # The label check runs beside the forward rather than after it (see start_label_check).
    finish_label_check = start_label_check(shift_labels, head.shape[0])
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state
    finish_label_check()
    loss = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head, shift_labels.to(hidden.device),
        bias=self.lm_head.bias, num_items_in_batch=num_items, check_labels=False)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


def patch_llama(model, record: PatchRecord) -> None:
    """Bind the patched forwards on this model's modules (instances only)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    for module in model.modules():
        if isinstance(module, (LlamaRMSNorm, MistralRMSNorm)):
            record.bind(module, rms_norm_forward, "rms_norm")
    for layer in model.model.layers:
        record.bind(layer, decoder_layer_forward, "decoder_layer (fused residual add + RMSNorm)")
        record.bind(layer.self_attn, attention_forward, "attention (LoRA QKV/O, RoPE, SDPA)")
        record.bind(layer.mlp, mlp_forward, "mlp (fused LoRA MLP)")
    if isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        record.bind(model, causal_lm_forward, "causal_lm (fused linear + cross-entropy)")
