"""Merging throughput: mcl_utils.merging against mergekit on the same checkpoints, in one run.

Usage: .venv/bin/python benchmarks/merging.py [--width 512] [--depth 8] [--experts 4] [--method ties]
                                              [--repeats 2] [--json out.json]

Builds a random Llama base of the given shape and `--experts` experts (the base plus seeded noise), all
saved as safetensors checkpoints, then merges every non-empty subset of the experts (2^K - 1 merges), as
the merging study does, in two ways:
  * mcl: load the base and the experts once, prepare each expert once (TIES trims it), then merge each subset
    in memory (mcl_utils.merging, as the study does);
  * mergekit: `run_merge` once per subset with the same operator and settings (mergekit reads its inputs
    and writes its output to disk every time: that is how it is used).
Each side runs `--repeats` times after a warm-up; the fastest run of each is compared (goal: mcl >= 5x).
The outputs of the last merge are compared too: the share of entries that differ, and the largest difference
(TIES: entries whose magnitudes tie at the trim threshold may be kept by one side and not the other).
If the merging study has run (results/merging-laws/), its evaluation throughput per base size is printed:
tokens per second scoring the merged models on the evaluation texts, from each part's provenance.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

import torch

from mcl_utils import merging

from common import parser, write_json

MERGEKIT = {"average": ("linear", {"weight": 1.0}, {"normalize": True}),
            "task_arithmetic": ("task_arithmetic", None, {}),
            "ties": ("ties", {"weight": 1.0, "density": merging.TIES_DENSITY}, {"normalize": True})}


def build(root: Path, width: int, depth: int, n_experts: int) -> tuple[Path, list[Path]]:
    """A random Llama base and experts (base plus seeded noise), saved with a tokenizer-free config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=width, intermediate_size=int(8 * width / 3) // 8 * 8,
                         num_hidden_layers=depth, num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 64), tie_word_embeddings=True)
    net = LlamaForCausalLM(config)
    base = root / "base"
    net.save_pretrained(base, safe_serialization=True)
    experts = []
    for i in range(n_experts):
        g = torch.Generator().manual_seed(i + 1)
        expert = LlamaForCausalLM(config)
        expert.load_state_dict(net.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        experts.append(root / f"expert{i}")
        expert.save_pretrained(experts[-1], safe_serialization=True)
    return base, experts


def run_mcl(base: Path, experts: list[Path], method: str, subsets: list[tuple[int, ...]]) -> tuple[float, dict]:
    """Seconds to load once, prepare each expert once (TIES trims it) and merge every subset in memory, as
    the study does; the last merge."""
    start = time.perf_counter()
    base_state = merging.load_state(base)
    prepared = merging.study_operator(method, 1).prepare(base_state, [merging.load_state(e) for e in experts])
    for subset in subsets:
        out = merging.study_operator(method, len(subset)).combine(base_state, merging.select(prepared, subset))
    return time.perf_counter() - start, out


def run_mergekit(base: Path, experts: list[Path], method: str, subsets: list[tuple[int, ...]],
                 root: Path) -> tuple[float, dict]:
    """Seconds for mergekit to merge every subset (one run_merge each, from and to disk); the last merge."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    name, params, top = MERGEKIT[method]
    start = time.perf_counter()
    for subset in subsets:
        p = params or {"weight": merging.TA_TOTAL / len(subset)}
        config = MergeConfiguration.model_validate({
            "merge_method": name, "dtype": "float32", **({} if name == "linear" else {"base_model": str(base)}),
            "models": [{"model": str(experts[j]), "parameters": p} for j in subset], "parameters": top})
        run_merge(config, str(root / "mergekit-out"), MergeOptions(copy_tokenizer=False, write_model_card=False,
                                                                   quiet=True))
    return time.perf_counter() - start, merging.load_state(root / "mergekit-out")


def study_throughput() -> list[dict]:
    """Evaluation tokens per second of the study's merged models, per base size (from part provenance)."""
    rows = []
    for path in sorted(Path("results/merging-laws").glob("losses-*.parquet")):
        _, prov = merging.read_part(path)
        rows.append({"size": prov["size"], "method": prov["method"], "merges": prov["n_merges"],
                     "wall_s": round(prov["wall_time_s"], 1), "tokens_per_s": round(prov["tokens_per_s"])})
    return rows


def main() -> None:
    """Run both sides, print the figures and the ratio."""
    ap = parser(__doc__)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--method", choices=sorted(MERGEKIT), default="ties")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, experts = build(root, args.width, args.depth, args.experts)
        n_params = sum(t.numel() for t in merging.load_state(base).values())
        subsets = [c for k in range(1, args.experts + 1) for c in itertools.combinations(range(args.experts), k)]
        run_mcl(base, experts, args.method, subsets[:1])  # warm-up
        run_mergekit(base, experts, args.method, subsets[:1], root)
        mcl_s, mk_s = [], []
        for _ in range(args.repeats):  # interleaved, so load from elsewhere hurts both alike
            seconds, ours = run_mcl(base, experts, args.method, subsets)
            mcl_s.append(seconds)
            seconds, theirs = run_mergekit(base, experts, args.method, subsets, root)
            mk_s.append(seconds)
    diff = max(float((ours[n] - theirs[n]).abs().max()) for n in theirs)
    # TIES keeps the top 20% of each tensor by magnitude; where magnitudes tie at the threshold, torch.topk
    # and mergekit's argsort may keep different entries: count the entries that differ at all
    differing = sum(int(((ours[n] - theirs[n]).abs() > 1e-6).sum()) for n in theirs) / n_params
    result = {"method": args.method, "n_params": n_params, "n_experts": args.experts, "n_merges": len(subsets),
              "mcl_s": min(mcl_s), "mergekit_s": min(mk_s), "mcl_merges_per_s": len(subsets) / min(mcl_s),
              "mergekit_merges_per_s": len(subsets) / min(mk_s), "ratio": min(mk_s) / min(mcl_s),
              "max_abs_difference": diff, "share_of_entries_differing": differing,
              "threads": torch.get_num_threads(), "study": study_throughput()}
    print(f"{args.method} on a {n_params / 1e6:.1f}M-parameter Llama, {len(subsets)} merges of {args.experts} experts:")
    print(f"  mcl      {result['mcl_s']:.2f} s  ({result['mcl_merges_per_s']:.2f} merges/s)")
    print(f"  mergekit {result['mergekit_s']:.2f} s  ({result['mergekit_merges_per_s']:.2f} merges/s)")
    print(f"  ratio    {result['ratio']:.1f}x (goal >= 5x); entries that differ: {differing:.1e} of all "
          f"(largest difference {diff:.2e}: ties at the trim threshold)")
    for row in result["study"]:
        print(f"  study {row['size']:>3} {row['method']:<16} {row['merges']:>3} merges scored in {row['wall_s']:>6} s,"
              f" {row['tokens_per_s']:,} tokens/s")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
