"""All-pools oracle throughput: mcl's engine against a per-pool numpy loop and a memory-bandwidth pass.

Usage: .venv/bin/python benchmarks/oracle.py [--n-models 16] [--n-samples 10000]

Synthetic losses (gamma-distributed, seeded) for n models on m samples; every one of the 2^n - 1 pools
gets its summed oracle loss three ways, in one process on this machine:
  * mcl: `oracle.all_pool_nll_sums` (halves built by doubling, then one elementwise minimum per pool);
  * peer: the straightforward loop, `nll[:, pool].min(axis=1).sum()` for each pool;
  * floor: the time to stream 2^n x m float64 values once at this machine's measured memory bandwidth
    (what any method that materializes every pool's per-sample minima must at least pay).
Prints seconds, ratios, and checks that mcl and the loop agree exactly. Goal: mcl under 2 s for 16 models
and 10,000 samples on 2 cores.
"""

from __future__ import annotations

import os
import time

import numpy as np

from mcl_utils.oracle import all_pool_nll_sums

from common import parser, write_json


def loop_sums(nll: np.ndarray) -> np.ndarray:
    """The peer: one numpy reduction per pool."""
    n = nll.shape[1]
    out = np.empty(2**n - 1)
    for mask in range(1, 2**n):
        out[mask - 1] = nll[:, [j for j in range(n) if mask >> j & 1]].min(axis=1).sum()
    return out


def bandwidth_bytes_per_s(n_bytes: int = 2**30, repeats: int = 3) -> float:
    """Read bandwidth of this machine: the best of a few sums over a 1 GiB array."""
    data = np.ones(n_bytes // 8)
    best = min(_timed(data.sum) for _ in range(repeats))
    return data.nbytes / best


def _timed(fn) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Time the three and print the comparison."""
    ap = parser(__doc__)
    ap.add_argument("--n-models", type=int, default=16)
    ap.add_argument("--n-samples", type=int, default=10_000)
    args = ap.parse_args()
    nll = np.random.default_rng(0).gamma(5.0, 20.0, (args.n_samples, args.n_models))
    all_pool_nll_sums(nll[:100])  # warm-up
    start = time.perf_counter()
    ours = all_pool_nll_sums(nll)
    mcl_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = loop_sums(nll)
    loop_s = time.perf_counter() - start
    bandwidth = bandwidth_bytes_per_s()
    floor_s = (2**args.n_models - 1) * args.n_samples * 8 / bandwidth
    result = {"n_models": args.n_models, "n_samples": args.n_samples, "cores": os.cpu_count(),
              "mcl_s": mcl_s, "loop_s": loop_s, "bandwidth_GB_per_s": bandwidth / 1e9, "bandwidth_pass_s": floor_s,
              "speedup_vs_loop": loop_s / mcl_s, "mcl_over_bandwidth_pass": mcl_s / floor_s,
              "max_abs_diff": float(np.max(np.abs(ours - theirs)))}
    print(f"all {2**args.n_models - 1:,} pools of {args.n_models} models x {args.n_samples:,} samples, "
          f"{os.cpu_count()} cores")
    print(f"  mcl engine         {mcl_s:8.2f} s   (goal < 2 s)")
    print(f"  per-pool loop      {loop_s:8.2f} s   -> mcl is {result['speedup_vs_loop']:.1f}x faster")
    print(f"  bandwidth pass     {floor_s:8.2f} s   ({bandwidth / 1e9:.1f} GB/s; mcl takes "
          f"{result['mcl_over_bandwidth_pass']:.2f}x that)")
    print(f"  largest difference mcl vs loop: {result['max_abs_diff']:.1e} nats")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
