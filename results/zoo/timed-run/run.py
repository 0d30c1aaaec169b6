"""Train the default zoo from scratch, end to end, and record how long it took and whether every model's
weights equal the committed cards' (training on a CPU is deterministic): writes timed-run.json beside this file.

Training runs as `mcl zoo train experiments/zoo.yaml` in a fresh cache and card folder (tokenized text included),
so nothing committed or cached is touched or reused. 40 to 75 minutes on 2 cores; run it on a machine doing
nothing else. Usage: python results/zoo/timed-run/run.py [--jobs N] [--scratch DIR]"""
import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mcl_utils import zoo
from mcl_utils.corpus import REPO_ROOT
from mcl_utils.store import atomic_path, strict_json

HERE = Path(__file__).resolve().parent
EXPERIMENT = REPO_ROOT / "experiments" / "zoo.yaml"

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="models trained at once (default: CPU cores)")
ap.add_argument("--scratch", type=Path, help="folder for the fresh cache and cards (default: a new temporary one)")
args = ap.parse_args()
scratch = args.scratch or Path(tempfile.mkdtemp(prefix="zoo-timed-run-"))
names = [spec.removeprefix("zoo:") for spec in zoo.experiment_models(EXPERIMENT)]
started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
t0 = time.perf_counter()
subprocess.run([sys.executable, "-m", "mcl_utils.cli", "zoo", "train", str(EXPERIMENT), "--out", str(scratch / "cards"),
                "--jobs", str(args.jobs), "--device", "cpu", "--no-progress"],
               env={**os.environ, "MCL_CACHE": str(scratch / "cache")}, cwd=REPO_ROOT, check=True)
wall_s = time.perf_counter() - t0
models = {}
for name in names:
    fresh, committed = zoo.read_card(name, scratch / "cards"), zoo.read_card(name)
    comparable = committed is not None and committed["recipe_hash"] == fresh["recipe_hash"]
    models[name] = {"recipe_hash": fresh["recipe_hash"], "wall_time_s": fresh["wall_time_s"],
                    "val_bpb": fresh["val_bpb"], "weights_sha256": fresh["weights_sha256"],
                    "same_weights": fresh["weights_sha256"] == committed["weights_sha256"] if comparable else None}  # None: no card to compare
record = {"machine": zoo._cpu_name(), "cpu_cores": os.cpu_count(), "torch": torch.__version__, "jobs": args.jobs,
          "started_utc": started, "wall_s": wall_s, "cpu_s": sum(m["wall_time_s"] for m in models.values()),
          "all_same_weights": all(m["same_weights"] is not False for m in models.values()), "models": models}
with atomic_path(HERE / "timed-run.json") as tmp:
    tmp.write_text(strict_json(record))
print(f"the zoo trained in {wall_s / 60:.1f} min on {record['machine']} ({args.jobs} at a time); "
      f"weights equal to the committed cards: {sum(m['same_weights'] is True for m in models.values())} of "
      f"{sum(m['same_weights'] is not None for m in models.values())} with a card of the same recipe ({len(models)} models)")
