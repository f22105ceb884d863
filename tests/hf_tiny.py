"""Tiny random HF models saved with `save_pretrained`, the independent reference for parity tests."""
from __future__ import annotations

import torch
import transformers

VARIANTS = {
    # name: (arch, heads, kv_heads, tied, llama3 rope scaling)
    "llama_mha_untied": ("llama", 4, 4, False, False),
    "llama_gqa2_tied": ("llama", 4, 2, True, False),
    "llama_mqa_rope3": ("llama", 4, 1, False, True),
    "qwen2_gqa2_untied": ("qwen2", 4, 2, False, False),
    "qwen2_gqa4_tied": ("qwen2", 8, 2, True, False),
    # Qwen3: q/k norms, head_dim set apart from hidden/heads (3 heads x 32 = 96 != hidden 64)
    "qwen3_gqa2_untied": ("qwen3", 4, 2, False, False),
    "qwen3_odd_heads_untied": ("qwen3", 3, 1, False, False),
    "qwen3_gqa3_tied": ("qwen3", 6, 3, True, False),
}


def make_hf_model(arch: str, heads: int, kv_heads: int, tied: bool, rope3: bool, seed: int = 0,
                  layers: int = 3, hidden: int = 64, vocab: int = 128):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 16, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tied, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    if arch == "llama":
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        if rope3:
            rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        cfg = transformers.LlamaConfig(rope_parameters=rope, **common)
        model = transformers.LlamaForCausalLM(cfg)
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                       head_dim=32, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    # HF inits biases / norms to 0 / 1; randomize so the test sees them
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()
