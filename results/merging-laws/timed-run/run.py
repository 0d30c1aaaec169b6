"""Run the merging study from scratch on the trained zoo, end to end, and record how long it took and whether
every expert and every part equals the committed ones (CPU work is deterministic): writes timed-run.json here.

The study runs as `mcl merge study experiments/merging.yaml --force` in a fresh clone of this repository and a
fresh cache, into which only the trained zoo bases are copied: every expert is fine-tuned, every subset merged
and scored, as `make book FORCE=1` does after training the zoo. Nothing committed or cached here is touched.
About 50 to 80 minutes on 2 cores (the host's speed varies by day); run it on a machine doing nothing else.
Usage: python results/merging-laws/timed-run/run.py [--jobs N] [--scratch DIR]"""
import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

from mcl_utils import merging, zoo
from mcl_utils.corpus import REPO_ROOT
from mcl_utils.pipeline import load_experiment
from mcl_utils.store import atomic_path, cache_root, strict_json

HERE = Path(__file__).resolve().parent
EXPERIMENT = Path("experiments") / "merging.yaml"

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--jobs", type=int, default=os.cpu_count(), help="parts computed at once (default: CPU cores)")
ap.add_argument("--scratch", type=Path, help="folder for the clone and the fresh cache (default: a new temporary one)")
args = ap.parse_args()
scratch = args.scratch or Path(tempfile.mkdtemp(prefix="merging-timed-run-"))
clone, cache = scratch / "repo", scratch / "cache"
subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(clone)], check=True)
settings = load_experiment(REPO_ROOT / EXPERIMENT).merging
for base in settings.bases:  # the trained zoo, checked against its cards, is the study's starting point
    final = zoo.weights_dir(base)
    shutil.copytree(final, cache / final.relative_to(cache_root()))
started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
t0 = time.perf_counter()
subprocess.run([sys.executable, "-m", "mcl_utils.cli", "merge", "study", str(EXPERIMENT), "--force",
                "--jobs", str(args.jobs), "--no-progress"],
               env={**os.environ, "MCL_CACHE": str(cache), "PYTHONPATH": str(clone)}, cwd=clone, check=True)
wall_s = time.perf_counter() - t0
experts = {}
for name in (merging.expert_name(b, d) for b in settings.bases for d in settings.domains):
    fresh, committed = (json.loads(zoo.card_path(name, root).read_text())
                        for root in (clone / "results" / "experts", merging.EXPERT_RESULTS))
    experts[name] = {"wall_time_s": fresh["wall_time_s"], "weights_sha256": fresh["weights_sha256"],
                     "same_weights": fresh["weights_sha256"] == committed["weights_sha256"]}
parts = {}
for size in settings.sizes:
    for method in (merging.BASE_PART, *settings.methods):
        fresh_path = merging.part_path(clone / "results" / "merging-laws", size, method)
        fresh, committed = pd.read_parquet(fresh_path), pd.read_parquet(merging.part_path(HERE.parent, size, method))
        provenance = json.loads(pq.read_schema(fresh_path).metadata[merging.PROVENANCE_KEY])
        parts[f"{size}/{method}"] = {"wall_time_s": provenance["wall_time_s"], "same_losses": fresh.equals(committed)}
record = {"machine": zoo._cpu_name(), "cpu_cores": os.cpu_count(), "torch": torch.__version__, "jobs": args.jobs,
          "started_utc": started, "wall_s": wall_s,
          "finetune_cpu_s": sum(e["wall_time_s"] for e in experts.values()),
          "parts_cpu_s": sum(p["wall_time_s"] for p in parts.values()),
          "all_same": (all(e["same_weights"] for e in experts.values())
                       and all(p["same_losses"] for p in parts.values())),
          "experts": experts, "parts": parts}
with atomic_path(HERE / "timed-run.json") as tmp:
    tmp.write_text(strict_json(record))
print(f"the merging study ran in {wall_s / 60:.1f} min on {record['machine']} ({args.jobs} at a time); "
      f"experts with the committed weights: {sum(e['same_weights'] for e in experts.values())} of {len(experts)}; "
      f"parts with the committed losses: {sum(p['same_losses'] for p in parts.values())} of {len(parts)}")
