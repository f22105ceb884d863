"""Issue 16 runs: the roofline grid with segment calls (calibrates the cost model), then the
ee-efficiency grid one (ramps, batch) part at a time, saving after each part.
Usage: python -m benchmarks.ee_grid_parts OUT_DIR"""
import json, os, sys, time
from drex_jax.bench import roofline, ee_efficiency as ee
out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/big"; os.makedirs(out, exist_ok=True)
t0 = time.time()
r = roofline.run_roofline(None, quick=False, steps=5, hf=False)
json.dump(r, open(f"{out}/roofline_full.json", "w"), indent=2)
open(f"{out}/roofline_full.md", "w").write(roofline.markdown(r))
roofline.plot(r, f"{out}/roofline_full.png")
print("roofline done", time.time() - t0, flush=True)
parts = []
for ramps in ((8, 15, 22), (15,)):
    for batch in (32, 8):
        g = {"exit_shares": (0.1, 0.3, 0.5, 0.7), "ramps": (ramps,), "batches": (batch,), "contexts": (128, 512)}
        res = ee.run_ee_efficiency(None, new_tokens=16, grid=g)
        parts.append(res)
        merged = dict(parts[0]); merged["rows"] = [row for p in parts for row in p["rows"]]
        json.dump(merged, open(f"{out}/ee_efficiency.json", "w"), indent=2)
        print("ee part done", ramps, batch, time.time() - t0, flush=True)
