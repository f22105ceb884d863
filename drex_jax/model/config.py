"""Static model description: a frozen, hashable config read from a Hugging Face config dict.

It is passed to jitted functions as a static argument, so everything in it is a plain
Python scalar or tuple.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency-dependent RoPE scaling."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    rope_scaling: RopeScaling | None = None
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each q and k head, before RoPE
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _require(d: dict, key: str):
    if key not in d or d[key] is None:
        raise ValueError(f"model config is missing required field {key!r}")
    return d[key]


def _rope_from_hf(d: dict) -> tuple[float, RopeScaling | None]:
    """HF keeps RoPE settings in `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or rp
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: 'default', 'llama3'")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a Hugging Face `config.json` dict, rejecting what we cannot run."""
    archs = d.get("architectures") or []
    arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(
        d.get("model_type", ""), d.get("model_type", "<none>")
    )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if d.get("use_sliding_window"):
        raise ValueError("Qwen sliding-window attention (use_sliding_window=true) is not supported")
    if d.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}; supported: 'silu'")
    hidden = int(_require(d, "hidden_size"))
    heads = int(_require(d, "num_attention_heads"))
    kv_heads = int(d.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    head_dim = int(d.get("head_dim") or hidden // heads)
    theta, scaling = _rope_from_hf(d)
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    is_qwen = arch == "Qwen2ForCausalLM"
    attn_bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(_require(d, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_require(d, "intermediate_size")),
        num_layers=int(_require(d, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=True if is_qwen else attn_bias,  # Qwen2: q/k/v biases always, none on o
        o_bias=False if is_qwen else attn_bias,  # Llama and Qwen3: `attention_bias` for all four
        rope_scaling=scaling,
        qk_norm=arch == "Qwen3ForCausalLM",
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )
