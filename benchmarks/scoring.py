"""Scoring throughput and agreement: mcl against lm-evaluation-harness, same model, samples and machine.

Usage: .venv/bin/python benchmarks/scoring.py [--model gguf:smollm2-135m-instruct] [--n-samples 10000]
       [--shape DIR]   (random weights of the model in DIR: config.json and tokenizer files suffice)

Both score the same Brown paragraphs (all splits: this measures speed, not a result of the book) with the
same weights in the same dtype: mcl through `mcl_utils.scoring.score_texts`, lm-evaluation-harness
through its HF backend's `loglikelihood_rolling`. Each scorer runs twice over all samples: cold (its
first pass in this process, as a user's run) and warm (again). lm-evaluation-harness first picks its
fastest batch size on the first 1,000 samples (of those that fit in memory on all samples), then runs
cold and warm at that size; it runs after mcl,
so its "cold" pass already finds the GPU allocator warm (in its favour). The model's own forward passes
alone over mcl's batches (full logits, warm) are the ceiling a scorer can approach. Loading is excluded.
Goals: mcl cold >= 3x lm-evaluation-harness cold and mcl warm >= 80% of the forward-only rate on a GPU;
both corpus bits per byte equal within 1e-3.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mcl_utils.models import _weights_location, load_model, parse_spec, resolve_device
from mcl_utils.scoring import forward, prepare, score_texts
from mcl_utils.store import corpus_bpb

from common import brown_texts, parser, random_checkpoint, sync, write_json


def timed(fn, device: torch.device) -> tuple[float, object]:
    """Seconds of one call, the device synchronized, and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def run_mcl(spec: str, texts: list[str], device: str, dtype: str) -> dict:
    """Cold and warm seconds, per-sample NLL and scored tokens for mcl; seconds of forward passes alone."""
    loaded = load_model(spec, device, dtype)
    cold_s, (nll, n_tokens) = timed(lambda: score_texts(loaded, texts), loaded.device)
    warm_s, _ = timed(lambda: score_texts(loaded, texts), loaded.device)
    prepare_s, (rows, batches, budget) = timed(
        lambda: prepare(loaded, texts, [str(i) for i in range(len(texts))], None, None), loaded.device)

    def forward_all():
        for batch in batches:
            forward(loaded, [rows[r] for r in batch])
    forward_all()  # warm-up: the forward-only rate is a warm ceiling
    forward_s, _ = timed(forward_all, loaded.device)
    return {"cold_s": cold_s, "warm_s": warm_s, "forward_s": forward_s, "prepare_s": prepare_s, "nll": nll,
            "n_params": loaded.card.n_params_total,
            "n_tokens": int(n_tokens.sum()), "batch_tokens": budget, "n_batches": len(batches)}


def run_lm_eval(spec: str, texts: list[str], device: str, dtype: str, batch_sizes: list[int]) -> dict:
    """lm-evaluation-harness (HF backend, loglikelihood_rolling): its best batch size on 1,000 samples,
    then cold and warm seconds and per-sample NLL over all samples at that size."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    where, kwargs = _weights_location(parse_spec(spec))
    lm = HFLM(pretrained=where, device=device, dtype=dtype, batch_size=batch_sizes[0], **kwargs)
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    dev = torch.device(device)
    by_size = {}
    for batch_size in batch_sizes:
        lm.batch_size_per_gpu = batch_size  # what HFLM.batch_size reads
        try:
            by_size[batch_size], _ = timed(lambda: lm.loglikelihood_rolling(requests[:1000], disable_tqdm=True), dev)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    for best in sorted(by_size, key=by_size.get):  # the fastest that fits in memory on every sample
        lm.batch_size_per_gpu = best
        try:
            cold_s, loglik = timed(lambda: lm.loglikelihood_rolling(requests, disable_tqdm=True), dev)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    warm_s, _ = timed(lambda: lm.loglikelihood_rolling(requests, disable_tqdm=True), dev)
    return {"cold_s": cold_s, "warm_s": warm_s, "nll": -np.asarray(loglik, dtype=float), "batch_size": best,
            "subset_s_by_batch_size": by_size}


def main() -> None:
    """Run both scorers and print the comparison."""
    ap = parser(__doc__)
    ap.add_argument("--model", default="gguf:smollm2-135m-instruct")
    ap.add_argument("--shape", default=None, help="score random weights of the model in this folder instead")
    ap.add_argument("--n-samples", type=int, default=10000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--lm-eval-batch-sizes", default=None,
                    help="comma-separated; the fastest that fits is used (default: 1,2,4,8,16 on a CPU, 16..128 on a GPU)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    sizes = args.lm_eval_batch_sizes or ("16,32,64,128" if device.type == "cuda" else "1,2,4,8,16")
    texts = brown_texts(args.n_samples)
    n_bytes = np.array([len(t.encode("utf-8")) for t in texts])
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"dir:{random_checkpoint(Path(args.shape), Path(tmp), dtype)}" if args.shape else args.model
        mcl = run_mcl(spec, texts, str(device), dtype)
        ref = run_lm_eval(spec, texts, str(device), dtype, [int(b) for b in sizes.split(",")])
    n = mcl["n_tokens"]
    result = {
        "model": args.model if not args.shape else f"random weights shaped like {args.shape}",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": dtype,
        "n_params": mcl["n_params"], "n_samples": len(texts), "n_tokens": n, "threads": torch.get_num_threads(),
        "mcl_batch_tokens": mcl["batch_tokens"], "mcl_batches": mcl["n_batches"],
        "mcl_cold_tokens_per_s": n / mcl["cold_s"], "mcl_warm_tokens_per_s": n / mcl["warm_s"],
        "forward_only_warm_tokens_per_s": n / mcl["forward_s"], "mcl_tokenize_and_plan_s": mcl["prepare_s"],
        "lm_eval_cold_tokens_per_s": n / ref["cold_s"], "lm_eval_warm_tokens_per_s": n / ref["warm_s"],
        "lm_eval_batch_size": ref["batch_size"],
        "lm_eval_subset_seconds_by_batch_size": ref["subset_s_by_batch_size"],
        "speedup_cold": ref["cold_s"] / mcl["cold_s"], "speedup_warm": ref["warm_s"] / mcl["warm_s"],
        "warm_share_of_forward_only": mcl["forward_s"] / mcl["warm_s"],
        "mcl_bpb": corpus_bpb(mcl["nll"], n_bytes), "lm_eval_bpb": corpus_bpb(ref["nll"], n_bytes),
        "max_abs_sample_nll_diff": float(np.max(np.abs(mcl["nll"] - ref["nll"]))),
    }
    result["abs_bpb_diff"] = abs(result["mcl_bpb"] - result["lm_eval_bpb"])
    print(f"{result['model']} on {len(texts)} Brown paragraphs ({n} tokens), {result['device']}, {dtype}")
    print(f"  {'':8} {'cold':>10} {'warm':>10}  tokens/s")
    print(f"  {'mcl':8} {result['mcl_cold_tokens_per_s']:10.0f} {result['mcl_warm_tokens_per_s']:10.0f}"
          f"   {result['mcl_bpb']:.6f} bits/byte")
    print(f"  {'lm-eval':8} {result['lm_eval_cold_tokens_per_s']:10.0f} {result['lm_eval_warm_tokens_per_s']:10.0f}"
          f"   {result['lm_eval_bpb']:.6f} bits/byte (batch size {ref['batch_size']}, its fastest)")
    print(f"  forward passes alone, mcl's batches, warm: {result['forward_only_warm_tokens_per_s']:.0f} tokens/s; "
          f"mcl's tokenizing and batch planning (in each pass): {mcl['prepare_s']:.2f} s")
    print(f"  mcl / lm-eval: {result['speedup_cold']:.2f}x cold, {result['speedup_warm']:.2f}x warm (goal >= 3x cold "
          f"on a GPU); mcl warm / forward-only: {result['warm_share_of_forward_only']:.0%} (goal >= 80%)")
    print(f"  |bits/byte difference|: {result['abs_bpb_diff']:.2e} (goal <= 1e-3); "
          f"largest per-sample NLL difference {result['max_abs_sample_nll_diff']:.2e} nats")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
