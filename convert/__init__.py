"""Checkpoint conversion: HF safetensors / GGUF -> drex_jax params, saved as orbax checkpoints."""
from convert.checkpoint import load_checkpoint, save_checkpoint
from convert.gguf_file import load_gguf
from convert.hf_safetensors import load_hf_dir

__all__ = ["load_checkpoint", "save_checkpoint", "load_gguf", "load_hf_dir", "convert_any"]


def convert_any(src: str, dst: str, dtype: str = "float32") -> str:
    """Convert an HF safetensors directory or a .gguf file at `src` into a checkpoint at `dst`."""
    import os

    if not os.path.exists(src):
        raise FileNotFoundError(f"conversion source {src!r} does not exist")
    if src.endswith(".gguf"):
        cfg, params, tok = load_gguf(src, dtype=dtype, with_tokenizer=True)
    else:
        cfg, params, tok = load_hf_dir(src, dtype=dtype, with_tokenizer=True)
    save_checkpoint(dst, cfg, params, tokenizer=tok)
    return dst
