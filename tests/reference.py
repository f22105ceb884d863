"""Plain unbatched, cache-free greedy decoding: the independent reference for engine tests."""
import numpy as np

from drex_jax.model import forward


def greedy_reference(params, cfg, prompt: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """Re-runs the dense causal forward on the whole sequence for every new token. The sequence is
    right-padded to a fixed width (causal attention makes the padding invisible) to avoid recompiles."""
    seq = list(prompt)
    width = 1 << (len(prompt) + max_new_tokens - 1).bit_length()
    out = []
    for _ in range(max_new_tokens):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(seq)] = seq
        tok = int(np.argmax(np.asarray(forward(params, cfg, padded))[0, len(seq) - 1]))
        out.append(tok)
        seq.append(tok)
        if tok in stop_ids:
            break
    return out
