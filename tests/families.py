"""Tiny random models of every family in tunelab's architecture table, built offline from transformers'
own config classes (the unit tests of arch.py and structured pruning, and the family matrix, use them)."""

from __future__ import annotations

import torch

CAUSAL = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2", "gpt_neox",
          "granite", "smollm3")
MASKED = ("bert", "roberta", "modernbert")

# family -> (config class name, its size fields); 2 layers, hidden 32, 4 heads of 8 (2 KV heads where GQA exists).
_GQA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8)
_MHA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "llama": ("LlamaConfig", _GQA), "mistral": ("MistralConfig", _GQA), "qwen2": ("Qwen2Config", _GQA),
    "qwen3": ("Qwen3Config", _GQA), "gemma2": ("Gemma2Config", _GQA), "gemma3_text": ("Gemma3TextConfig", _GQA),
    "phi3": ("Phi3Config", {k: v for k, v in _GQA.items() if k != "head_dim"}), "olmo2": ("Olmo2Config", _GQA),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4)), "gpt_neox": ("GPTNeoXConfig", _MHA),
    "granite": ("GraniteConfig", _GQA), "smollm3": ("SmolLM3Config", _GQA),
    "bert": ("BertConfig", _MHA), "roberta": ("RobertaConfig", _MHA), "modernbert": ("ModernBertConfig", _MHA),
}


def tiny_config(family: str, vocab_size: int = 64, pad: int = 0, eos: int = 1, mask: int | None = None, **overrides):
    import transformers

    name, sizes = CONFIGS[family]
    ids = dict(vocab_size=vocab_size, pad_token_id=pad, bos_token_id=eos, eos_token_id=eos)
    if family == "modernbert":
        ids.update(cls_token_id=eos, sep_token_id=eos)
    positions = {"n_positions": 128} if family == "gpt2" else {"max_position_embeddings": 128}
    return getattr(transformers, name)(**sizes, **ids, **positions, **overrides)


def tiny_model(family: str, seed: int = 0, **config_fields):
    """A random model of the family with its task head (causal LM or masked LM), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if family in MASKED else AutoModelForCausalLM
    return auto.from_config(tiny_config(family, **config_fields)).eval()
