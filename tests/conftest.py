import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA compiles took 57 % of the default suite's time (1,898 programs, most of them for tiny test models,
# measured 2026-11-30): LLVM's cheap pipeline compiles them ~30 % faster (dots still call the same
# runtime GEMMs), and a
# persistent cache lets the slow pass and later runs reuse what an earlier run compiled. The product
# itself compiles at XLA's defaults; DREX_TEST_XLA_DEFAULTS=1 runs the suite that way too.
if os.environ.get("DREX_TEST_XLA_DEFAULTS") != "1":
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                        "--xla_llvm_disable_expensive_passes=true"]).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
if os.environ.get("DREX_TEST_XLA_DEFAULTS") != "1":
    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "DREX_TEST_XLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "drex_jax", "xla-test-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model():
    """(cfg, params, tokenizer) of the bundled SmolLM2, converted once into $DREX_JAX_CACHE."""
    from convert import load_checkpoint
    from drex_jax.default_model import default_model_path

    return load_checkpoint(default_model_path())


@pytest.fixture(scope="session")
def hf_gguf_model():
    """`transformers`' own fp32 load of the bundled GGUF: the independent reference."""
    import torch
    import transformers

    from drex_jax.default_model import default_gguf_path

    path = default_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama():
    """(cfg, params) of a small random Llama (GQA 4:2, 3 layers) for fast engine tests."""
    from drex_jax.model.config import config_from_hf
    from drex_jax.model.params import init_params

    cfg = config_from_hf(dict(
        architectures=["LlamaForCausalLM"], vocab_size=101, hidden_size=64, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=None,
    ))
    return cfg, init_params(cfg, jax.random.key(0), scale=0.25)


@pytest.fixture(scope="session")
def tiny4():
    """(cfg, params) of a small random Qwen2 (4 layers, biases) for early-exit tests."""
    from drex_jax.model.config import config_from_hf
    from drex_jax.model.params import init_params

    cfg = config_from_hf(dict(
        architectures=["Qwen2ForCausalLM"], vocab_size=61, hidden_size=32, intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ))
    return cfg, init_params(cfg, jax.random.key(3), scale=0.3)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Free each test module's compiled programs: every XLA CPU executable holds a few memory
    mappings, and a session that compiles thousands of them hits the kernel's map limit
    (vm.max_map_count) and crashes inside the compiler."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()
    if os.environ.get("DREX_TEST_MAPS"):
        with open("/proc/self/maps") as f:
            print(f"\n[memory maps after module: {sum(1 for _ in f)}]")
