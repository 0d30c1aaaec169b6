"""Law-fitting speed: a fit with 1,000 bootstrap resamples, and one fit against Chinchilla's published recipe.

Usage: .venv/bin/python benchmarks/laws.py [--n-resamples 1000] [--n-samples 10000]

Per-sample losses are simulated (seeded) so that their bits per byte follow a known law exactly
(`laws.simulate_samples`); each bootstrap resample reweights the samples and refits, as the book does.
  * power law with floor, 12 points (a frontier of pool budgets): point fit + n bootstrap refits;
  * Chinchilla form, 9 model sizes x 8 token counts: point fit + n bootstrap refits;
  * peer: Chinchilla's Approach 3 as published (L-BFGS from each of its 4,500 grid starts, summed
    Huber), one fit on the same Chinchilla-form points, against mcl's one fit; both objectives printed.
Goal: a fit with 1,000 resamples under 30 s on 2 cores.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from mcl_utils import laws

from common import parser, write_json


def timed_bootstrap(form: laws.LawForm, truth: dict, points: pd.DataFrame, n_samples: int,
                    n_resamples: int) -> tuple[float, laws.Bootstrap, laws.Fit]:
    """Seconds for a point fit plus n bootstrap refits over simulated samples (simulation included)."""
    start = time.perf_counter()
    point, boot, _ = laws.recovery(form, truth, points, n_samples, n_resamples)
    return time.perf_counter() - start, boot, point


def main() -> None:
    """Time the fits and print the comparison."""
    ap = parser(__doc__)
    ap.add_argument("--n-resamples", type=int, default=1000)
    ap.add_argument("--n-samples", type=int, default=10_000)
    args = ap.parse_args()
    budgets = pd.DataFrame({"x": np.logspace(8, 10.5, 12)})
    power_s, power_boot, _ = timed_bootstrap(laws.POWER_LAW, {"E": 0.9, "A": 40.0, "alpha": 0.3}, budgets,
                                             args.n_samples, args.n_resamples)
    chinchilla_truth = pd.read_csv("data/published/chinchilla_fits.csv").iloc[1].drop("source").astype(float)
    grid = pd.DataFrame([(n, d) for n in np.logspace(7.6, 10.2, 9) for d in np.logspace(9.7, 11.7, 8)],
                        columns=["N", "D"])
    chin_s, chin_boot, chin_point = timed_bootstrap(laws.CHINCHILLA, chinchilla_truth.to_dict(), grid,
                                                    2000, args.n_resamples)
    points = chin_point.points.rename(columns={"bpb": "loss"})
    start = time.perf_counter()
    ours = laws.fit(laws.CHINCHILLA, points, "loss")
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    recipe = laws.chinchilla_recipe(points, "loss", reduce="sum", starts="grid")
    recipe_s = time.perf_counter() - start
    result = {"n_resamples": args.n_resamples, "power_law_s": power_s,
              "power_law_failures": power_boot.failures, "chinchilla_s": chin_s,
              "chinchilla_failures": chin_boot.failures, "one_fit_s": ours_s, "recipe_one_fit_s": recipe_s,
              "speedup_vs_recipe": recipe_s / ours_s, "objective": ours.objective,
              "recipe_objective": recipe["objective"]}
    print(f"fit + {args.n_resamples:,} bootstrap resamples (goal < 30 s):")
    print(f"  power law, 12 points, {args.n_samples:,} samples      {power_s:7.1f} s"
          f"   ({len(power_boot.params)} fitted, failures {power_boot.failures or 'none'})")
    print(f"  Chinchilla form, 72 points, 2,000 samples   {chin_s:7.1f} s"
          f"   ({len(chin_boot.params)} fitted, failures {chin_boot.failures or 'none'})")
    print("one Chinchilla-form fit:")
    print(f"  mcl (VarPro grid + refine)                  {ours_s:7.3f} s   objective {ours.objective:.6g}")
    print(f"  Chinchilla recipe (L-BFGS, 4,500 starts)    {recipe_s:7.3f} s   objective {recipe['objective']:.6g}")
    print(f"  -> mcl is {result['speedup_vs_recipe']:.0f}x faster")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
