"""Patching a whole model: convergence against stock transformers+PEFT from the same LoRA
initialization, patch/unpatch round trips, instance scoping, adapters that stock PEFT reloads,
and unsupported models."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM)

import unsloth_ext
from unsloth_ext import FastLanguageModel, lora, patch, unpatch
from unsloth_ext.fast_model import DEFAULT_TARGET_MODULES
from unsloth_ext.finetune import save_adapter
from unsloth_ext.patching import patch_report

TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-5)


def _save_tiny(tmp_path, cls=LlamaForCausalLM, config_cls=LlamaConfig, seed=0):
    torch.manual_seed(seed)
    model = cls(config_cls(**TINY))
    path = tmp_path / f"tiny-{config_cls.model_type}"
    model.save_pretrained(path)
    return path


def _stock(path, device, dtype, load_in_4bit=True):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype) \
        if load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=dtype,
                                                 device_map=device, attn_implementation="sdpa")
    torch.manual_seed(3407)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                            target_modules=list(DEFAULT_TARGET_MODULES),
                                            task_type="CAUSAL_LM"))


def _fast(path, device, dtype, load_in_4bit=True, checkpointing="unsloth"):
    model, _ = FastLanguageModel.from_pretrained(str(path), max_seq_length=256, dtype=dtype,
                                                 load_in_4bit=load_in_4bit, device_map=device)
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0,
                                            use_gradient_checkpointing=checkpointing,
                                            random_state=3407)


def _train(model, batches, steps):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    losses = []
    for ids in batches[:steps]:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _lora_weights(model):
    return {n: p.detach().float().cpu() for n, p in model.named_parameters() if "lora_" in n}


def _batches(device, n=30, batch=4, seq=48):
    """n batches cycling over 3 fixed ones: random tokens the adapters can memorize."""
    gen = torch.Generator().manual_seed(1)
    fixed = [torch.randint(0, TINY["vocab_size"], (batch, seq), generator=gen).to(device)
             for _ in range(3)]
    return [fixed[i % 3] for i in range(n)]


def _converge(tmp_path, device, dtype, tolerance):
    path = _save_tiny(tmp_path)
    stock = _stock(path, device, dtype)
    fast = _fast(path, device, dtype)
    assert patch_report(fast), "nothing was patched"
    batches = _batches(device)
    stock_losses = _train(stock, batches, 30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast_losses = _train(fast, batches, 30)
    fallbacks = [str(w.message) for w in caught if "runs stock" in str(w.message)]
    assert not fallbacks, fallbacks  # every patched part ran its fused path
    diffs = [abs(a - b) for a, b in zip(stock_losses, fast_losses)]
    assert max(diffs) <= tolerance, list(zip(stock_losses, fast_losses))
    assert stock_losses[-1] < stock_losses[0] - 0.2  # it learned something
    return path, batches, _lora_weights(stock), _lora_weights(fast)


def test_convergence_matches_stock_cpu_fp32(tmp_path):
    _, _, stock_w, fast_w = _converge(tmp_path, "cpu", torch.float32, 1e-3)
    # Per adapter matrix: Adam moves a weight whose gradient is near zero by about the learning
    # rate whatever the gradient's size, so elementwise tolerances would see fp32 rounding there.
    for name, w in stock_w.items():
        assert (fast_w[name] - w).norm() <= 1e-3 * w.norm(), name


@pytest.mark.cuda
def test_convergence_matches_stock_cuda_bf16(tmp_path):
    path, batches, stock_w, fast_w = _converge(tmp_path, "cuda", torch.bfloat16, 3e-2)
    # Final adapters: no further from stock trained in fp32 than stock's own bf16 run is.
    oracle = _stock(path, "cuda", torch.float32)
    _train(oracle, batches, 30)
    for name, w in _lora_weights(oracle).items():
        assert (fast_w[name] - w).norm() <= 2 * (stock_w[name] - w).norm() + 1e-3, name


def test_bad_label_raises_a_clear_error(tmp_path):
    model = _fast(_save_tiny(tmp_path), "cpu", torch.float32)
    model.train()
    ids = _batches("cpu", n=1)[0]
    labels = ids.clone()
    labels[1, 5] = TINY["vocab_size"]
    with pytest.raises(ValueError, match=rf"labels\[{ids.shape[1] + 4}\] is {TINY['vocab_size']}"
                                         "; expected a class index"):
        model(input_ids=ids, labels=labels)


def test_offloaded_recompute_skips_the_mlp_output(tmp_path, monkeypatch):
    """With "unsloth" checkpointing the backward recomputes each layer with its MLP told not to
    compute its output (compute_output=False), and every LoRA gradient equals that of the same
    model trained without checkpointing."""
    path = _save_tiny(tmp_path)
    ids = _batches("cpu")[0]
    real = lora.lora_mlp
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("compute_output", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(lora, "lora_mlp", spy)
    layers = TINY["num_hidden_layers"]
    grads = {}
    for mode, expected_calls in (("unsloth", [True] * layers + [False] * layers),
                                 (False, [True] * layers)):
        model = _fast(path, "cpu", torch.float32, checkpointing=mode)
        torch.manual_seed(5)
        with torch.no_grad():  # PEFT starts lora_B at zero, which would hide dA
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
        model.train()
        calls.clear()
        model(input_ids=ids, labels=ids).loss.backward()
        assert calls == expected_calls, mode
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads[False]) == 2 * 7 * layers
    for name, grad in grads[False].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads["unsloth"][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls,config_cls", [(LlamaForCausalLM, LlamaConfig),
                                            (MistralForCausalLM, MistralConfig)])
def test_patch_unpatch_round_trip(tmp_path, cls, config_cls):
    path = _save_tiny(tmp_path, cls, config_cls)
    stock = _stock(path, "cpu", torch.float32, load_in_4bit=False)
    bystander = copy.deepcopy(stock)
    ids = _batches("cpu", n=1)[0]
    with torch.no_grad():
        torch.nn.init.normal_(next(p for n, p in stock.named_parameters() if "lora_B" in n))
        bystander.load_state_dict(stock.state_dict())
        expected = stock(input_ids=ids, labels=ids)
        patch(stock)
        assert patch_report(stock)
        patched = stock(input_ids=ids, labels=ids)
        other = bystander(input_ids=ids, labels=ids)  # another model in the process: untouched
        unpatch(stock)
        restored = stock(input_ids=ids, labels=ids)
    torch.testing.assert_close(patched.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(restored.logits, expected.logits) and torch.equal(restored.loss, expected.loss)
    assert torch.equal(other.logits, expected.logits)
    assert not patch_report(stock)
    assert not any("forward" in vars(m) for m in stock.modules())
    assert not any("forward" in vars(m) for m in bystander.modules())


def test_saved_adapter_reloads_in_stock_peft(tmp_path):
    path = _save_tiny(tmp_path)
    fast = _fast(path, "cpu", torch.float32)
    _train(fast, _batches("cpu", n=5), 5)
    save_adapter(fast, None, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = _batches("cpu", n=1)[0]
    # Train mode without dropout: deterministic, and bitsandbytes keeps its dequantizing CPU path
    # (in eval mode it repacks the weights for a CPU kernel with other rounding).
    reloaded.train()
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids).logits, reloaded(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_unsupported_model_warns_once_and_runs_stock(tmp_path):
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128)).eval()
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch(model)
    notices = [w for w in caught if issubclass(w.category, unsloth_ext.UnslothExtWarning)]
    assert len(notices) == 1 and "'gpt2' is not supported" in str(notices[0].message)
    assert not patch_report(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
