"""Model-FLOPs utilization of mcl scoring a ~1B-parameter Llama configuration.

Usage: .venv/bin/python benchmarks/mfu.py [--device auto] [--dtype auto] [--n-samples N] [--tokenizer DIR]

Builds Llama-3.2-1B's shape (16 layers, width 2048, 32 heads, 8 key-value heads, MLP 8192, tied
embeddings) over the SmolLM2 tokenizer's 49,152-token vocabulary, about 1.07B parameters, with random
weights: throughput does not depend on the weights, and nothing is downloaded. It scores Brown
paragraphs with the batches and loss of `mcl score` (`mcl_utils.scoring.prepare` and `score_rows`) and
prints, for a first (cold) and a second (warm) pass over the same batches, and for the model's own forward
passes alone over them (the ceiling for any scorer), tokens per second and the model-FLOPs utilization
(MFU) against two peaks:
the dense matrix-product rate measured on the same device and dtype in the same run, and the datasheet
peak where the device is known.

Model FLOPs follow PaLM (Chowdhery et al. 2022, appendix B) for a forward pass: 2 FLOPs per weight of
every matrix product (the head included, the embedding lookup not) per input position of each row, plus
4 * layers * width * row length for attention; padding positions earn nothing.
"""

from __future__ import annotations

import time

import torch

from mcl_utils.models import LoadedModel, ModelCard, dequantized_checkpoint, resolve_device, resolve_dtype
from mcl_utils.scoring import forward, prepare, score_rows

from common import brown_texts, parser, sync, write_json

# Dense bf16/fp16 tensor-core peaks from NVIDIA's datasheets (without sparsity), FLOP/s.
DATASHEET_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)


def build_llama(device: torch.device, dtype: torch.dtype, tokenizer_from: str) -> LoadedModel:
    """A random-weight Llama-3.2-1B-shaped model with a real tokenizer, ready for the scorer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **LLAMA_1B)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    prefix = tokenizer.bos_token_id
    card = ModelCard(name="llama-1b-shape (random weights)", family="llama", n_params_total=n_params,
                     n_params_non_embedding=n_params - model.get_input_embeddings().weight.numel(),
                     revision="random", dtype=str(dtype).removeprefix("torch."), tokenizer=tokenizer_from,
                     vocab_size=config.vocab_size, context_length=config.max_position_embeddings,
                     prefix_token_id=prefix, prefix_token=tokenizer.convert_ids_to_tokens(prefix),
                     prefix_policy="bos")
    return LoadedModel(model=model, tokenizer=tokenizer, card=card, device=device)


def matmul_weights(model: torch.nn.Module) -> int:
    """Weights that take part in a matrix product per token: every Linear layer, the head included."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def forward_flops(model: torch.nn.Module, row_lengths: list[int]) -> float:
    """PaLM-convention model FLOPs of one forward pass over rows of these (unpadded) lengths."""
    cfg = model.config
    per_token = 2 * matmul_weights(model)
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size
    return float(sum(n * (per_token + attention * n) for n in row_lengths))


def measured_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Best rate of a square dense matrix product on this device and dtype, FLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first product is a warm-up
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """The datasheet's dense tensor-core peak for bf16/fp16 on a known GPU, else None."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_PEAK.items() if key in name), None)


def main() -> None:
    """Score Brown paragraphs with the 1B configuration and print throughput and MFU."""
    ap = parser(__doc__)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--n-samples", type=int, default=None, help="default: 10000 on a GPU, 16 on a CPU")
    ap.add_argument("--tokenizer", default=None,
                    help="a folder with a saved tokenizer (default: SmolLM2's, from its offline package)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    n_samples = args.n_samples or (10000 if device.type == "cuda" else 16)
    tokenizer = args.tokenizer or str(dequantized_checkpoint("smollm2-135m-instruct"))
    loaded = build_llama(device, dtype, tokenizer)
    texts = brown_texts(n_samples)
    rows, batches, budget = prepare(loaded, texts, [str(i) for i in range(len(texts))], None, None)
    seconds = {}
    for phase in ("cold", "warm"):  # the first pass in this process, then the same batches again
        sync(device)
        start = time.perf_counter()
        score_rows(loaded, rows, batches, progress=False)
        sync(device)
        seconds[phase] = time.perf_counter() - start
    sync(device)
    start = time.perf_counter()
    for batch in batches:  # the model's own forward passes over the same batches: the ceiling for a scorer
        forward(loaded, [rows[r] for r in batch])
    sync(device)
    seconds["forward-only"] = time.perf_counter() - start
    n_tokens = sum(r.n_pred for r in rows)
    flops = forward_flops(loaded.model, [len(r.tokens) - 1 for r in rows])
    peak = measured_peak(device, dtype, 8192 if device.type == "cuda" else 2048)
    sheet = datasheet_peak(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    result = {"device": name, "dtype": str(dtype).removeprefix("torch."), "n_params": loaded.card.n_params_total,
              "n_samples": len(texts), "n_tokens": n_tokens, "batch_tokens": budget,
              "model_flops_per_token": flops / n_tokens, "measured_matmul_flops_per_s": peak,
              "datasheet_flops_per_s": sheet}
    print(f"Llama-1B shape ({result['n_params'] / 1e9:.2f}B parameters, random weights), {name}, "
          f"{result['dtype']}, {len(texts)} Brown paragraphs ({n_tokens} tokens, batches of <= {budget} tokens), "
          f"{flops / n_tokens / 1e9:.2f} GFLOP per token; dense matmul rate {peak / 1e12:.3f} TFLOP/s measured"
          + (f", {sheet / 1e12:.0f} datasheet" if sheet else ""))
    for phase, s in seconds.items():
        achieved = flops / s
        phase = phase.replace("-", "_")
        result.update({f"{phase}_seconds": s, f"{phase}_tokens_per_s": n_tokens / s,
                       f"{phase}_achieved_flops_per_s": achieved, f"{phase}_mfu_vs_measured": achieved / peak,
                       f"{phase}_mfu_vs_datasheet": achieved / sheet if sheet else None})
        print(f"  {phase}: {n_tokens / s:,.0f} tokens/s, {achieved / 1e12:.3f} TFLOP/s, MFU {achieved / peak:.1%} of "
              "the measured matmul rate" + (f", {achieved / sheet:.1%} of the datasheet peak" if sheet else ""))
    write_json(result, args.json)


if __name__ == "__main__":
    main()
