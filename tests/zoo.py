"""Tiny random models of the decoder families users bring, built in code (nothing downloads), each with
the feature that sets it apart from Llama switched on: sliding windows shorter than the test documents,
soft-capped attention and logits, logit scaling, an lm_head bias, learned absolute positions, dropout."""

import torch

WINDOW = 6  # sliding windows shorter than the documents the tests pack


def _llama_like(cls_config, ids: dict, **extra):
    base = dict(
        **ids, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return cls_config(**{**base, **extra})


def family_configs(tokenizer) -> dict:
    """Config of each family, token ids from `tokenizer`."""
    from transformers import (CohereConfig, Gemma2Config, Gemma3TextConfig, GPT2Config, GraniteConfig, LlamaConfig,
                              MistralConfig, Olmo2Config, Phi3Config, PhiConfig, Qwen2Config, Qwen3Config)  # fmt: skip

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return {
        "llama": _llama_like(LlamaConfig, ids, tie_word_embeddings=True),
        "qwen2": _llama_like(Qwen2Config, ids, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "qwen3": _llama_like(Qwen3Config, ids, head_dim=16),
        "mistral": _llama_like(MistralConfig, ids, sliding_window=WINDOW, head_dim=16),
        "gemma2": _llama_like(Gemma2Config, ids, head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0, query_pre_attn_scalar=16, tie_word_embeddings=True),
        "gemma3": _llama_like(Gemma3TextConfig, ids, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                              num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              final_logit_softcapping=3.0, tie_word_embeddings=True),
        "phi3": _llama_like(Phi3Config, ids),
        "phi": _llama_like(PhiConfig, ids, resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.1),
        "gpt2": GPT2Config(**ids, n_embd=64, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.1,
                           embd_pdrop=0.1, attn_pdrop=0.1),
        "granite": _llama_like(GraniteConfig, ids, logits_scaling=4.0, embedding_multiplier=2.0,
                               residual_multiplier=0.5, attention_multiplier=0.2),
        "cohere": _llama_like(CohereConfig, ids, logit_scale=0.3, tie_word_embeddings=True),
        "olmo2": _llama_like(Olmo2Config, ids),
    }


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "phi", "gpt2", "granite", "cohere", "olmo2"]


def tiny_family(name: str, tokenizer, seed: int = 0):
    """A random-init causal LM of family `name`, sized for CPU tests, token ids from `tokenizer`."""
    from transformers import AutoModelForCausalLM

    config = family_configs(tokenizer)[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if name == "phi":  # Phi-1/2's output layer has a bias; make it matter
        torch.nn.init.normal_(model.lm_head.bias, std=1.0)
    return model
