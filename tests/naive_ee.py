"""A deliberately naive early-exit decoder in float64 numpy, written independently of the package.

Every position keeps its hidden state at every layer input it reached, H[p][l]; K/V at layer
l are recomputed from those on every use, according to the missing-KV method:
  copy: a position that exited at E uses layer E-1's K/V (from H[p][E-1]) for layers >= E;
  propagate: layer l's own K/V projections applied to the exit hidden state H[p][E];
  recompute: when a later token reaches layer l, every earlier position lacking layer l is
  first pushed through layer l (in position order), extending its H.
"""
import numpy as np


def _np(tree):
    return {k: (_np(v) if isinstance(v, dict) else np.asarray(v, np.float64)) for k, v in tree.items()}


class NaiveEE:
    def __init__(self, params, cfg):
        self.p, self.cfg = _np(params), cfg
        d = cfg.head_dim
        self.inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2) / d))

    def lp(self, l):
        return {k: v[l] for k, v in self.p["layers"].items()}

    def norm(self, x, w):
        return w * x / np.sqrt(np.mean(x * x) + self.cfg.rms_norm_eps)

    def rope(self, x, pos):  # x [heads, D]
        a = pos * self.inv
        x1, x2 = x[:, : len(a)], x[:, len(a):]
        return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], -1)

    def kv(self, l, h, pos):
        c, lp = self.cfg, self.lp(l)
        x = self.norm(h, lp["attn_norm"])
        k, v = x @ lp["wk"], x @ lp["wv"]
        if c.qkv_bias:
            k, v = k + lp["bk"], v + lp["bv"]
        return self.rope(k.reshape(c.num_kv_heads, -1), pos), v.reshape(c.num_kv_heads, -1)

    def layer(self, l, h, pos, keys, values):
        """h [H] at position pos; keys/values: lists over positions 0..pos of [kv, D]."""
        c, lp = self.cfg, self.lp(l)
        x = self.norm(h, lp["attn_norm"])
        q = x @ lp["wq"] + (lp["bq"] if c.qkv_bias else 0)
        q = self.rope(q.reshape(c.num_heads, -1), pos)
        out = []
        for head in range(c.num_heads):
            g = head // c.q_per_kv
            s = np.array([q[head] @ k[g] for k in keys]) / np.sqrt(c.head_dim)
            w = np.exp(s - s.max())
            w /= w.sum()
            out.append(sum(wi * v[g] for wi, v in zip(w, values)))
        h = h + np.concatenate(out) @ lp["wo"]
        x = self.norm(h, lp["mlp_norm"])
        gate = x @ lp["w_gate"]
        return h + ((gate / (1 + np.exp(-gate))) * (x @ lp["w_up"])) @ lp["w_down"]

    def logits(self, h):
        w = self.p["embed"].T if self.cfg.tie_word_embeddings else self.p["lm_head"]
        return self.norm(h, self.p["final_norm"]) @ w

    def generate(self, prompt, exit_layers, thresholds, method, max_new, candidates=None):
        """`candidates`: token ids the ramps score (softmax and argmax over them only)."""
        L = self.cfg.num_layers
        H = []  # H[p][l] = input of layer l at position p
        exit_of = []  # layers completed at exit (L = full)
        margins = []  # |confidence - threshold| of every ramp decision

        def key_value(l, q):
            e = exit_of[q]
            if l < e or (method == "recompute" and l < len(H[q])):  # layer l ran (or runs now) for q
                return self.kv(l, H[q][l], q)
            if method == "copy":
                return self.kv(e - 1, H[q][e - 1], q)
            if method == "propagate":
                return self.kv(l, H[q][e], q)
            raise AssertionError("recompute must have filled this layer")

        def run_layer(l, p):
            if method == "recompute":  # bring every earlier position to layer l first
                for q in range(p):
                    if len(H[q]) == l + 1:
                        kvs = [key_value(l, r) for r in range(q + 1)]
                        H[q].append(self.layer(l, H[q][l], q, *zip(*kvs)))
                        exit_of[q] = max(exit_of[q], l + 1)
                    assert len(H[q]) > l + 1, "a missed position skipped a layer"
            kvs = [key_value(l, r) for r in range(p + 1)]
            H[p].append(self.layer(l, H[p][l], p, *zip(*kvs)))

        out, exits, tokens = [], [], list(prompt)
        for p, t in enumerate(prompt):  # prompt: full depth
            H.append([self.p["embed"][t]])
            exit_of.append(L)
            for l in range(L):
                run_layer(l, p)
        out.append(int(np.argmax(self.logits(H[-1][L]))))
        exits.append(L)
        while len(out) < max_new:
            p = len(tokens) + len(out) - 1
            H.append([self.p["embed"][out[-1]]])
            exit_of.append(L)
            tok = None
            for l in range(L):
                run_layer(l, p)
                if l + 1 in exit_layers and l + 1 < L:
                    r = exit_layers.index(l + 1)
                    z = self.logits(H[p][l + 1])
                    ids = np.arange(len(z)) if candidates is None else np.asarray(candidates)
                    z = z[ids]
                    prob = np.exp(z - z.max())
                    prob /= prob.sum()
                    top = np.sort(prob)[::-1]
                    conf = top[0] - top[1]
                    margins.append(abs(conf - thresholds[r]))
                    if conf > thresholds[r]:
                        tok, exit_of[p] = int(ids[np.argmax(z)]), l + 1
                        break
            if tok is None:
                tok = int(np.argmax(self.logits(H[p][L])))
            out.append(tok)
            exits.append(exit_of[p] if tok is not None and exit_of[p] < L else L)
        return out, exits, min(margins) if margins else np.inf
