"""What heads of 8 cost at s4 and s5: seconds per training step with the ladder's heads of 16 (4 and 6 heads)
against heads of 8 (8 and 12), one thread, alternated, the fastest of `--repeats` timings of about 5 s each.

Bloom's attention computes its scores, causal mask and softmax head by head (transformers has no fused
kernel for it), so more, narrower heads cost more at the same width. Writes step-times.json beside this file.
Usage: python speed.py [--repeats 3] (run it on a machine doing nothing else, or one zoo training beside it)."""
import argparse
import dataclasses
import json
from pathlib import Path

from mcl_utils import zoo

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--repeats", type=int, default=3)
args = ap.parse_args()
bloom = zoo.FAMILIES["bloom"]
variants = {"ladder": dataclasses.replace(bloom, heads=()),
            "eights": dataclasses.replace(bloom, heads=tuple((s, zoo.SIZES[s].width // 8) for s in zoo.SIZES))}
sizes = {}
for size in ("s4", "s5"):
    timings = {label: [] for label in variants}
    for _ in range(args.repeats):
        for label, family in variants.items():
            zoo.FAMILIES["bloom"] = family
            timings[label].append(zoo.measure_step_s(f"bloom-{size}", seconds=5, repeats=1)["step_s"])
    best = {label: min(t) for label, t in timings.items()}
    sizes[size] = {**{f"{label}_heads": family.shape(size).heads for label, family in variants.items()},
                   "ladder_step_s": best["ladder"], "eights_step_s": best["eights"],
                   "eights_slowdown": best["eights"] / best["ladder"], "timings": timings}
    print(size, sizes[size], flush=True)
out = {"machine": zoo._cpu_name(), "threads": 1, "seconds_timed": 5, "repeats": args.repeats, "sizes": sizes}
(Path(__file__).parent / "step-times.json").write_text(json.dumps(out, indent=1) + "\n")
