"""GGUF file (llama.cpp format, e.g. the bundled SmolLM2 Q4_1) -> drex_jax params.

Quantized tensors are dequantized to fp32 with `gguf.quants.dequantize`, the same routine
`transformers` uses, so both see identical weights. llama.cpp stores Llama Q/K rows permuted
for its interleaved RoPE; we undo that to get HF's split-half layout.
"""
from __future__ import annotations

import os

import numpy as np

from drex_jax.model.config import config_from_hf
from convert.assemble import assemble_params

# our param path -> GGUF tensor name ('{i}' = layer)
_GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
    "layers/attn_norm": "blk.{i}.attn_norm.weight",
    "layers/wq": "blk.{i}.attn_q.weight",
    "layers/wk": "blk.{i}.attn_k.weight",
    "layers/wv": "blk.{i}.attn_v.weight",
    "layers/wo": "blk.{i}.attn_output.weight",
    "layers/bq": "blk.{i}.attn_q.bias",
    "layers/bk": "blk.{i}.attn_k.bias",
    "layers/bv": "blk.{i}.attn_v.bias",
    "layers/mlp_norm": "blk.{i}.ffn_norm.weight",
    "layers/w_gate": "blk.{i}.ffn_gate.weight",
    "layers/w_up": "blk.{i}.ffn_up.weight",
    "layers/w_down": "blk.{i}.ffn_down.weight",
}
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` on Q/K rows ([out, in] layout)."""
    out = w.shape[0]
    return w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_reader(path: str):
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"cannot read GGUF file {path!r} (truncated or damaged?): {e}") from e


def gguf_hf_config(reader) -> dict:
    """An HF-style config dict from GGUF metadata (then validated by `config_from_hf`)."""

    def field(key, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture", "<none>")
    if arch not in _ARCH:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCH)}")
    names = {t.name for t in reader.tensors}
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return {
        "architectures": [_ARCH[arch]],
        "vocab_size": int(field(f"{arch}.vocab_size", int(embd.shape[1]))),
        "hidden_size": int(field(f"{arch}.embedding_length")),
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": int(field(f"{arch}.attention.head_count")),
        "num_key_value_heads": int(field(f"{arch}.attention.head_count_kv")),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
    }


def load_gguf(path: str, dtype: str = "float32", with_tokenizer: bool = False):
    """Returns (ModelConfig, params as numpy arrays, tokenizer or None)."""
    import gguf

    from convert.hf_safetensors import _np_dtype

    reader = _open_reader(path)
    cfg = config_from_hf(gguf_hf_config(reader))
    tensors = {t.name: t for t in reader.tensors}
    np_dtype = _np_dtype(dtype)

    def get(name: str, n_rot_heads: int | None) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"tensor {name!r} is missing from GGUF file {path!r}")
        t = tensors[name]
        try:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"cannot dequantize {name!r} ({t.tensor_type.name}) in {path!r}: {e}") from e
        a = np.asarray(a, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if n_rot_heads is not None and cfg.architecture == "LlamaForCausalLM":
            a = _unpermute_rows(a, n_rot_heads)
        return a

    rot_heads = {"layers/wq": cfg.num_heads, "layers/wk": cfg.num_kv_heads}
    params = assemble_params(cfg, _GGUF_NAMES.__getitem__, lambda path, name: get(name, rot_heads.get(path)),
                             np_dtype, "GGUF")
    tok = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return cfg, params, tok
