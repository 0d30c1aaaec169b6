"""Quality bars of the default zoo with its largest size 96 wide, as it was before s5 became 80 wide (recipe v2):
s0 to s4 from the committed loss tables, s5 from this folder's. Writes quality-bars.json beside this file.

Usage (from the repository root): python results/zoo/s5-width96/check.py"""
import json
from pathlib import Path

import numpy as np

from mcl_utils import laws, zoo
from mcl_utils.pipeline import experiment_matrix, experiment_summary, load_experiment, write_json
from mcl_utils.store import load_matrix, loss_table_path, read_loss_table

HERE = Path(__file__).parent
exp = load_experiment("experiments/zoo.yaml")
matrix, _, _ = experiment_matrix(exp)
fingerprint = matrix.provenance[0]["corpus"]["fingerprint"]
keys = matrix.cache_keys()
committed = [loss_table_path(exp.losses_dir, spec.removeprefix("zoo:"), keys[spec]) for spec in matrix.models
             if zoo.parse_name(spec.removeprefix("zoo:")).seed == 0 and not spec.endswith("-s5")]
wide = [p for p in sorted((HERE / "losses").glob("*.parquet"))
        if read_loss_table(p)[1]["corpus"]["fingerprint"] == fingerprint]  # the 96-wide s5 of each family
m = load_matrix(committed + wide)
sizes = zoo.provenance_sizes(m)
results = laws.family_laws(m, sizes, exp.bootstrap_resamples)
bars = laws.quality_bars(results)
ne = sizes["n_params_non_embedding"]
decades = float(np.log10(ne.max() / ne.min()))
cards = {c.stem: json.loads(c.read_text()) for c in sorted(HERE.glob("*-s5.json"))}
write_json(HERE / "quality-bars.json", {
    "experiment": experiment_summary(exp), "quality_bars": bars.to_dict("records"),
    "laws": {f: r.summary() for f, r in results.items()}, "decades": decades,
    "brown_bpb": m.corpus_bpb().to_dict(), "s5_val_bpb": {n: c["val_bpb"] for n, c in cards.items()},
    "inputs": m.cache_keys()})
print(bars.to_string(index=False))
print(f"{decades:.2f} decades of non-embedding parameters; wrote {HERE / 'quality-bars.json'}")
