"""Scoring throughput and agreement: mcl against lm-evaluation-harness, same model, samples and machine.

Usage: .venv/bin/python benchmarks/scoring.py [--model gguf:smollm2-135m-instruct] [--n-samples 64]

Both score the same Brown evaluation paragraphs with the same weights in the same dtype: mcl through
`mcl_utils.scoring.score_texts`, lm-evaluation-harness through its HF backend's `loglikelihood_rolling`.
lm-evaluation-harness runs at each of several batch sizes and the comparison uses its fastest, so the
peer is measured at its best on this machine. Prints tokens per second, the ratio (goal: mcl >= 1.5x)
and both corpus bits per byte (goal: equal within 1e-3). Loading is excluded from the timings; each
side first scores a warm-up sample. It also times the model's forward passes alone over mcl's batches:
lm-evaluation-harness's time over that is the most any loss computation on those passes could gain.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mcl_utils.corpus import CorpusSpec, load_corpus
from mcl_utils.models import _weights_location, load_model, parse_spec, resolve_device
from mcl_utils.scoring import forward, prepare, score_texts
from mcl_utils.store import corpus_bpb

from common import parser, sync, write_json


def run_mcl(spec: str, texts: list[str], device: str, dtype: str) -> tuple[float, np.ndarray, int, float]:
    """Seconds, per-sample NLL and scored tokens for mcl, and the seconds of its forward passes alone."""
    loaded = load_model(spec, device, dtype)
    score_texts(loaded, texts[:1])
    start = time.perf_counter()
    nll, n_tokens = score_texts(loaded, texts)
    sync(loaded.device)
    seconds = time.perf_counter() - start
    rows, batches, _ = prepare(loaded, texts, [str(i) for i in range(len(texts))], None, None)
    start = time.perf_counter()
    for batch in batches:
        forward(loaded, [rows[r] for r in batch])
    sync(loaded.device)
    return seconds, nll, int(n_tokens.sum()), time.perf_counter() - start


def run_lm_eval(spec: str, texts: list[str], device: str, dtype: str,
                batch_sizes: list[int]) -> dict[int, tuple[float, np.ndarray]]:
    """Seconds and per-sample NLL for lm-evaluation-harness (HF backend, loglikelihood_rolling), per batch size."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    where, kwargs = _weights_location(parse_spec(spec))
    lm = HFLM(pretrained=where, device=device, dtype=dtype, batch_size=batch_sizes[0], **kwargs)
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    lm.loglikelihood_rolling(requests[:1], disable_tqdm=True)
    runs = {}
    for batch_size in batch_sizes:
        lm.batch_size_per_gpu = batch_size  # what HFLM.batch_size reads
        start = time.perf_counter()
        loglik = lm.loglikelihood_rolling(requests, disable_tqdm=True)
        sync(torch.device(device))
        runs[batch_size] = (time.perf_counter() - start, -np.asarray(loglik, dtype=float))
    return runs


def main() -> None:
    """Run both scorers and print the comparison."""
    ap = parser(__doc__)
    ap.add_argument("--model", default="gguf:smollm2-135m-instruct")
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lm-eval-batch-sizes", default="1,2,4,8,16", help="comma-separated; the fastest is used")
    args = ap.parse_args()
    device = str(resolve_device(args.device))
    corpus = load_corpus(CorpusSpec(n_samples=args.n_samples))
    texts = corpus.samples["text"].tolist()
    n_bytes = corpus.samples["text"].str.encode("utf-8").str.len().to_numpy()
    mcl_s, mcl_nll, n_tokens, forward_s = run_mcl(args.model, texts, device, args.dtype)
    runs = run_lm_eval(args.model, texts, device, args.dtype, [int(b) for b in args.lm_eval_batch_sizes.split(",")])
    best_bs = min(runs, key=lambda b: runs[b][0])
    ref_s, ref_nll = runs[best_bs]
    result = {
        "model": args.model, "device": device, "dtype": args.dtype, "n_samples": len(texts),
        "n_tokens": n_tokens, "threads": torch.get_num_threads(),
        "mcl_tokens_per_s": n_tokens / mcl_s, "lm_eval_tokens_per_s": n_tokens / ref_s,
        "speedup": ref_s / mcl_s, "lm_eval_batch_size": best_bs,
        "forward_only_tokens_per_s": n_tokens / forward_s, "speedup_ceiling": ref_s / forward_s,
        "lm_eval_tokens_per_s_by_batch_size": {b: n_tokens / s for b, (s, _) in runs.items()},
        "mcl_bpb": corpus_bpb(mcl_nll, n_bytes), "lm_eval_bpb": corpus_bpb(ref_nll, n_bytes),
        "max_abs_sample_nll_diff": float(np.max(np.abs(mcl_nll - ref_nll))),
    }
    result["abs_bpb_diff"] = abs(result["mcl_bpb"] - result["lm_eval_bpb"])
    print(f"{args.model} on {len(texts)} Brown paragraphs ({n_tokens} tokens), {device}, {args.dtype}")
    print(f"  mcl      {result['mcl_tokens_per_s']:9.0f} tokens/s   {result['mcl_bpb']:.6f} bits/byte")
    print(f"  lm-eval  {result['lm_eval_tokens_per_s']:9.0f} tokens/s   {result['lm_eval_bpb']:.6f} bits/byte"
          f"   (its fastest batch size, {best_bs}; by batch size: "
          + ", ".join(f"{b}: {n_tokens / s:.0f}" for b, (s, _) in runs.items()) + ")")
    print(f"  speed ratio mcl / lm-eval: {result['speedup']:.2f}x (goal >= 1.5x)")
    print(f"  the model's forward passes alone, in mcl's batches: {result['forward_only_tokens_per_s']:.0f} tokens/s, "
          f"so no loss computation on them could exceed {result['speedup_ceiling']:.2f}x")
    print(f"  |bits/byte difference|: {result['abs_bpb_diff']:.2e} (goal <= 1e-3); "
          f"largest per-sample NLL difference {result['max_abs_sample_nll_diff']:.2e} nats")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
