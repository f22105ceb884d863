"""Bad checkpoints give a ValueError / FileNotFoundError that names the problem."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import convert_any, load_checkpoint, load_gguf, load_hf_dir, save_checkpoint
from drex_jax.model import SUPPORTED_ARCHITECTURES
from tests.hf_tiny import make_hf_model


@pytest.fixture()
def hf_dir(tmp_path):
    make_hf_model("llama", 4, 2, False, False).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_missing_dir_and_config(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_dir(str(tmp_path / "nope"))
    os.remove(hf_dir / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_dir(str(hf_dir))


def test_missing_weights_file(hf_dir):
    os.remove(hf_dir / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_dir(str(hf_dir))


def test_truncated_safetensors(hf_dir):
    path = hf_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_hf_dir(str(hf_dir))


def test_unsupported_architecture_lists_supported(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MistralForCausalLM") as e:
        load_hf_dir(str(hf_dir))
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in str(e.value)


def _rewrite(hf_dir, fn):
    tensors = load_file(hf_dir / "model.safetensors")
    fn(tensors)
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})


def test_shape_mismatch_names_tensor(hf_dir):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(hf_dir, lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(ValueError, match=r"up_proj.weight.*shape"):
        load_hf_dir(str(hf_dir))


def test_config_weight_mismatch(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["hidden_size"] = 96
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_hf_dir(str(hf_dir))


def test_integer_dtype_rejected(hf_dir):
    name = "model.norm.weight"
    _rewrite(hf_dir, lambda t: t.__setitem__(name, t[name].astype(np.int32)))
    with pytest.raises(ValueError, match=r"model.norm.weight.*dtype I32"):
        load_hf_dir(str(hf_dir))


def test_missing_tensor_named(hf_dir):
    _rewrite(hf_dir, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"model.layers.2.self_attn.k_proj.weight.*missing"):
        load_hf_dir(str(hf_dir))


def test_truncated_gguf(tmp_path):
    from drex_jax.default_model import default_gguf_path

    data = open(default_gguf_path(), "rb").read(1 << 20)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(ValueError, match="truncated or damaged"):
        load_gguf(str(bad))
    with pytest.raises(FileNotFoundError):
        load_gguf(str(tmp_path / "absent.gguf"))


def test_not_a_checkpoint_and_bad_dtype(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="not a drex_jax checkpoint"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="dtype 'int8' not supported"):
        convert_any(str(hf_dir), str(tmp_path / "out"), dtype="int8")


def test_older_layout_and_incomplete_model_state(tmp_path, hf_dir):
    """A checkpoint in the pre-NNX layout (`params/`) is named as such; a model state missing arrays
    is refused with a ValueError naming them (not left as shapes to fail later)."""
    import shutil

    import jax
    from flax import nnx

    from convert.checkpoint import STATE_DIR
    from drex_jax.model.modules import EETransformer

    cfg, params, _ = load_hf_dir(str(hf_dir))
    dst = tmp_path / "ckpt"
    save_checkpoint(str(dst), cfg, params)
    old = tmp_path / "old"
    shutil.copytree(dst, old)
    shutil.move(str(old / STATE_DIR), str(old / "params"))
    with pytest.raises(FileNotFoundError, match="older drex_jax layout"):
        load_checkpoint(str(old))
    state = nnx.to_pure_dict(nnx.state(EETransformer(cfg, params)))
    del state["final_norm"]
    import orbax.checkpoint as ocp

    shutil.rmtree(dst / STATE_DIR)
    with ocp.StandardCheckpointer() as ck:
        ck.save(str(dst / STATE_DIR), jax.tree.map(np.asarray, state))
    with pytest.raises(ValueError, match=r"lacks 1 arrays.*final_norm"):
        load_checkpoint(str(dst))
