"""Issue 26 guard: host cost of Engine.step: a tiny random Llama (vocab = SmolLM2's, so the real tokenizer detokenizes),
where device work is small, batch 32, 256 new tokens each (EOS ignored), full depth, steady state.
Prints ms per step (median of steps after the first round) for the tree on PYTHONPATH."""
import os, sys, time, statistics
import numpy as np, jax
from drex_jax import Engine, GenerationConfig
from drex_jax.model.config import config_from_hf
from drex_jax.model.params import init_params
from transformers import AutoTokenizer
from drex_jax.default_model import default_model_path
tok = AutoTokenizer.from_pretrained(os.path.join(default_model_path(verbose=False), "tokenizer"))
cfg = config_from_hf(dict(architectures=["LlamaForCausalLM"], vocab_size=49152, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          eos_token_id=None))
params = init_params(cfg, jax.random.key(0), scale=0.25)
eng = Engine.from_params(cfg, params, tok, max_slots=32, max_seq_len=512)
rng = np.random.default_rng(0)
prompts = [[int(t) for t in rng.integers(0, 49152, 16)] for _ in range(32)]
gc = GenerationConfig(max_new_tokens=int(sys.argv[1]) if len(sys.argv) > 1 else 256, ignore_eos=True)
out = {}
for rnd in range(3):
    for p in prompts:
        eng.submit(p, gc)
    times = []
    while eng.has_work:
        t0 = time.perf_counter(); eng.step(); times.append(time.perf_counter() - t0)
    q = len(times) // 4
    out[rnd] = (statistics.median(times[1:q]), statistics.median(times[-q:]))
print(f"{sys.argv[2] if len(sys.argv) > 2 else ''} ms/step early tokens {1e3*out[2][0]:.2f}, late tokens {1e3*out[2][1]:.2f}")
