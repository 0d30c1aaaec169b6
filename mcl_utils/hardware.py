"""Hardware tiers: how long scoring a study takes on CPU cores, one GPU, a node or a Ray cluster, predicted
from scoring throughput measured on this project's machines (loss-table provenance and benchmarks/)."""

from __future__ import annotations

import heapq
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mcl_utils.errors import UserError
from mcl_utils.store import read_provenance

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "results" / "benchmarks"
# Memory a model takes beyond its weights while scoring: activations of one batch and allocator slack.
MEMORY_OVERHEAD = 1.1


@dataclass(frozen=True)
class Tier:
    """A hardware tier: which measured device it is made of, how many, and each one's memory for weights."""

    name: str
    device: str  # a device name as the measurements record it ("cpu (...)" or the GPU's name)
    n_devices: int
    memory_gib: float
    bytes_per_param: int  # 2 for bfloat16 on GPUs, 4 for float32 on CPUs


def nominal_params(spec: str) -> float:
    """The parameter count a Hub model's name states (Qwen/Qwen2.5-0.5B -> 5e8, EleutherAI/pythia-70m -> 7e7)."""
    sizes = re.findall(r"(?<![\w.])(\d+(?:\.\d+)?)([mMbB])(?![a-zA-Z])", spec.split(":", 1)[-1].split("@")[0])
    if not sizes:
        raise UserError(f"{spec}: its name states no size such as 0.5B or 70M; fix: give its parameter count")
    value, unit = sizes[-1]
    return float(value) * (1e9 if unit.lower() == "b" else 1e6)


def measured_rates(losses_dir: Path, benchmarks_dir: Path = BENCHMARKS) -> pd.DataFrame:
    """Scoring throughput measured here: per device and model size, tokens/s and the model FLOP/s they mean
    (2 FLOPs per parameter per token, the convention the predictions use too)."""
    rows = []
    for path in sorted(Path(losses_dir).glob("*.parquet")):
        prov = read_provenance(path)
        if prov.get("tokens_per_s"):
            rows.append({"device": prov["device"], "dtype": prov["model"]["dtype"], "source": path.name,
                         "n_params": prov["model"]["n_params_total"], "tokens_per_s": prov["tokens_per_s"],
                         "what": f"mcl score {prov['model']['name']}"})
    for path in sorted(Path(benchmarks_dir).glob("*.json")):
        result = json.loads(path.read_text())
        warm = result.get("warm_tokens_per_s") or result.get("mcl_warm_tokens_per_s")
        if "n_params" in result and warm:
            rows.append({"device": result["device"], "dtype": result["dtype"], "source": path.name,
                         "n_params": result["n_params"], "tokens_per_s": warm, "what": "benchmark, warm pass"})
    table = pd.DataFrame(rows, columns=["device", "dtype", "source", "n_params", "tokens_per_s", "what"])
    table["model_flops_per_s"] = 2 * table["n_params"] * table["tokens_per_s"]
    return table


def flops_rate(rates: pd.DataFrame, device: str, n_params: float) -> float:
    """Model FLOP/s for a model of n_params on a device: interpolated in log-log between measured sizes,
    held at the nearest measured size beyond them."""
    points = rates[rates["device"] == device].groupby("n_params")["model_flops_per_s"].max()
    if points.empty:
        raise UserError(f"no measured scoring rate on {device!r}; fix: run benchmarks/ on it")
    log_rate = np.interp(math.log(n_params), np.log(points.index.to_numpy(float)), np.log(points.to_numpy()))
    return float(np.exp(log_rate))


def devices_needed(tier: Tier, n_params: float) -> int | None:
    """Devices of a tier one model needs for its weights and scoring (None: more than the tier has)."""
    need = math.ceil(n_params * tier.bytes_per_param * MEMORY_OVERHEAD / (tier.memory_gib * 2**30))
    return need if need <= tier.n_devices else None


def schedule_hours(jobs: Sequence[tuple[float, int]], n_devices: int) -> float:
    """Wall-clock hours to run jobs of (hours, devices) on n_devices: longest first, each on the devices
    that free up first (Ray's one task per model, as `mcl run --ray` runs them)."""
    free = [0.0] * n_devices
    end = 0.0
    for hours, need in sorted(jobs, reverse=True):
        taken = [heapq.heappop(free) for _ in range(need)]
        finish = max(taken) + hours
        for _ in range(need):
            heapq.heappush(free, finish)
        end = max(end, finish)
    return end


def study_hours(specs: Sequence[str], tokens_per_model: float, tiers: Sequence[Tier],
                rates: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predicted hours of scoring each model on each tier, and each tier's wall-clock and device hours for
    the whole list (models that do not fit a tier are left out of its totals and counted)."""
    per_model, totals = [], []
    for tier in tiers:
        jobs = []
        for spec in specs:
            n_params = nominal_params(spec)
            need = devices_needed(tier, n_params)
            hours = None if need is None else tokens_per_model / flops_rate(rates, tier.device, n_params) * (
                2 * n_params) / 3600
            per_model.append({"tier": tier.name, "model": spec, "n_params": n_params, "devices": need,
                              "hours": hours})
            if need is not None:
                jobs.append((hours, need))
        totals.append({"tier": tier.name, "devices": tier.n_devices, "models": len(jobs),
                       "models_that_do_not_fit": len(specs) - len(jobs),
                       "wall_hours": schedule_hours(jobs, tier.n_devices),
                       "device_hours": sum(h * n for h, n in jobs)})
    return pd.DataFrame(per_model), pd.DataFrame(totals)
