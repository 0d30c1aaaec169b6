"""Training throughput: the zoo's training loop against transformers.Trainer, same model, data and machine.

Usage: .venv/bin/python benchmarks/training.py [--model llama-s3] [--steps 40] [--repeats 2] [--device cpu]
                                               [--threads N] [--compile] [--jobs N]

Both train the same freshly initialized zoo model (same seed) for the same number of optimizer steps on
the same rows of the family's training stream, with the same batch, optimizer (AdamW, same betas, weight
decay groups), learning-rate schedule and gradient clipping: the zoo through `mcl_utils.zoo._train_loop`
(what `mcl zoo train` runs, checkpoints off), Trainer through `Trainer.train` with a plain dataset of
those rows and that optimizer and schedule (no evaluation, no saving, no reporting). Trainer's models
shift labels inside, so its rows predict 255 tokens where the zoo's predict 256. The zoo is timed by its
loop's own clock, from the first step to the last (its token stream, built once per run, comes before);
Trainer by the wall time of `Trainer.train`. Each side runs `--repeats` times, interleaved, after one
warm-up run each; the fastest run of each is compared, so load from other processes hurts both alike.
Prints tokens per second, the ratio (goal: zoo >= 1.3x Trainer on a CPU) and each side's mean training
loss over the last 10 steps (they should nearly agree: the same model learns the same rows the same way).
On CUDA it also reports the model-FLOPs utilization of the zoo's loop against the GPU's dense bf16 peak
given by --peak-tflops. With --compile a third contender runs the zoo's loop on a `torch.compile`d model
(the compile itself is left out of its time): how much of a step is Python and framework overhead that a
faster loop could remove, and how much is the arithmetic that every loop, Trainer's included, must do.

With --jobs N (a CPU, N > 1) it also compares the two ways of using the whole machine: the zoo trains N
models at once in N processes of one thread each (what `mcl zoo train` does), Trainer trains one model on N
threads (what it does by default); each side's throughput is all tokens trained over the time from the first
loop's start to the last loop's end. Tiny models use cores better side by side than together, so this ratio
is the zoo's real advantage on a small machine; the one-thread ratio above is the loop's alone.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from mcl_utils import zoo
from mcl_utils.models import resolve_device

from common import parser, sync, write_json


class Rows(torch.utils.data.Dataset):
    """The zoo stream's first rows as Trainer examples (inputs and labels: Trainer's models shift labels)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i, :-1], "labels": self.rows[i, :-1]}


def fresh_model(model: zoo.ZooModel, dev: torch.device) -> torch.nn.Module:
    """A freshly initialized zoo model (same seed, so the same weights every time) on `dev`."""
    return zoo.build_model(model, zoo._load_tokenizer(zoo.family_tokenizer(model.family))).to(dev)


def run_zoo(model: zoo.ZooModel, rec: dict, steps: int, dev: torch.device,
            net: torch.nn.Module | None = None) -> tuple[float, float]:
    """Seconds of the zoo's loop for `steps` steps (on `net`, else a fresh model), and its mean loss over
    the last logged interval."""
    net = net if net is not None else fresh_model(model, dev)
    stream = zoo.TokenStream(model.family, rec["steps"] * rec["batch_rows"])
    with tempfile.TemporaryDirectory() as tmp:
        state = zoo._train_loop(model.name, model.family, rec, net, dev, Path(tmp), stream, checkpoint_every=10**9,
                                progress=False, stop_after=steps, log=lambda _: None)
    sync(dev)
    # the loop's own clock: from its first step to its last (the token stream is built before it)
    return state["elapsed_s"], state["log"][-1]["loss_nats"] if state["log"] else float("nan")


def run_trainer(model: zoo.ZooModel, rec: dict, steps: int, dev: torch.device) -> tuple[float, float]:
    """Seconds of Trainer.train for `steps` steps on the same rows and settings, and its last logged loss."""
    from transformers import Trainer, TrainingArguments

    net = fresh_model(model, dev)
    rows = zoo.TokenStream(model.family, rec["steps"] * rec["batch_rows"]).rows(0, steps * rec["batch_rows"])
    family = model.family
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=rec["batch_rows"], max_steps=steps,
            learning_rate=rec["lr"], warmup_steps=rec["warmup_steps"], lr_scheduler_type="cosine",
            adam_beta1=family.betas[0], adam_beta2=family.betas[1], weight_decay=family.weight_decay,
            max_grad_norm=family.grad_clip, logging_steps=zoo.LOG_EVERY, save_strategy="no", eval_strategy="no",
            report_to=[], disable_tqdm=True, use_cpu=dev.type == "cpu", bf16=dev.type == "cuda",
            dataloader_num_workers=0, seed=model.seed)
        matrices = [p for p in net.parameters() if p.dim() >= 2]
        vectors = [p for p in net.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": matrices, "weight_decay": family.weight_decay},
                                 {"params": vectors, "weight_decay": 0.0}],
                                lr=rec["lr"], betas=family.betas, fused=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: zoo.lr_at(step, rec) / rec["lr"])
        trainer = Trainer(model=net, args=args, train_dataset=Rows(rows), optimizers=(opt, schedule))
        start = time.perf_counter()
        trainer.train()
        sync(dev)
        seconds = time.perf_counter() - start  # Trainer.train: its set-up of the loop counts, as ours does
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return seconds, losses[-1] if losses else float("nan")


def side_by_side(name: str, steps: int) -> dict:
    """One of --jobs concurrent zoo runs (a spawned process, one thread, after a warm-up): its loop's window."""
    torch.set_num_threads(1)
    model, dev = zoo.parse_name(name), torch.device("cpu")
    rec = zoo.recipe(model)
    run_zoo(model, rec, 2, dev)
    seconds, _ = run_zoo(model, rec, steps, dev)
    end = time.time()
    return {"start": end - seconds, "end": end}


def whole_machine(model: zoo.ZooModel, rec: dict, steps: int, jobs: int, tokens: int, repeats: int) -> dict:
    """The zoo's `jobs` models at once (one thread each) against Trainer's one model on `jobs` threads, each
    `repeats` times, interleaved; the fastest of each."""
    threads, zoo_runs, trainer_runs = torch.get_num_threads(), [], []
    for _ in range(repeats):
        windows = zoo.in_processes(side_by_side, [dict(name=model.name, steps=steps)] * jobs, jobs)
        zoo_runs.append(max(w["end"] for w in windows) - min(w["start"] for w in windows))
        torch.set_num_threads(jobs)
        run_trainer(model, rec, 2, torch.device("cpu"))  # warm-up on this thread count
        trainer_runs.append(run_trainer(model, rec, steps, torch.device("cpu"))[0])
        torch.set_num_threads(threads)
    zoo_s, trainer_s = min(zoo_runs), min(trainer_runs)
    return {"jobs": jobs, "zoo_side_by_side_tokens_per_s": jobs * tokens / zoo_s,
            "trainer_threads_tokens_per_s": tokens / trainer_s, "whole_machine_speedup": jobs * trainer_s / zoo_s,
            "zoo_side_by_side_seconds_by_run": zoo_runs, "trainer_threads_seconds_by_run": trainer_runs}


def main() -> None:
    """Run both loops, interleaved, and print the comparison."""
    ap = parser(__doc__)
    ap.add_argument("--model", default="llama-s3", help="a zoo model name (default: llama-s3)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="also time the zoo's loop on a torch.compile'd model")
    ap.add_argument("--jobs", type=int, default=1,
                    help="also compare the whole machine: N zoo models at once against Trainer on N threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    model = zoo.parse_name(args.model)
    rec = zoo.recipe(model)
    steps = min(args.steps, rec["steps"])
    tokens = steps * rec["batch_rows"] * model.family.context
    run_zoo(model, rec, 2, dev), run_trainer(model, rec, 2, dev)  # warm-up: imports, allocator, kernels
    compiled = None
    if args.compile:  # one compiled model, warmed up (compiled) here; each timed run restarts it from scratch
        fresh = fresh_model(model, dev)
        initial = {k: v.clone() for k, v in fresh.state_dict().items()}
        compiled = torch.compile(fresh)
        run_zoo(model, rec, 2, dev, compiled)
    zoo_runs, trainer_runs, compiled_runs = [], [], []
    for _ in range(args.repeats):
        zoo_runs.append(run_zoo(model, rec, steps, dev))
        trainer_runs.append(run_trainer(model, rec, steps, dev))
        if compiled is not None:
            fresh.load_state_dict(initial)
            compiled_runs.append(run_zoo(model, rec, steps, dev, compiled))
    zoo_s, zoo_loss = min(zoo_runs)
    trainer_s, trainer_loss = min(trainer_runs)
    total, non_embedding = zoo.count_model(model)
    result = {"model": args.model, "device": str(dev), "threads": torch.get_num_threads(), "steps": steps,
              "batch_rows": rec["batch_rows"], "context": model.family.context, "tokens": tokens,
              "n_params_total": total, "n_params_non_embedding": non_embedding,
              "zoo_tokens_per_s": tokens / zoo_s, "trainer_tokens_per_s": tokens / trainer_s,
              "speedup": trainer_s / zoo_s, "zoo_last_loss_nats": zoo_loss, "trainer_last_loss_nats": trainer_loss,
              "zoo_seconds_by_run": [s for s, _ in zoo_runs], "trainer_seconds_by_run": [s for s, _ in trainer_runs]}
    if compiled_runs:
        compiled_s, compiled_loss = min(compiled_runs)
        result.update(compiled_tokens_per_s=tokens / compiled_s, compiled_speedup=trainer_s / compiled_s,
                      compiled_last_loss_nats=compiled_loss, compiled_seconds_by_run=[s for s, _ in compiled_runs])
    if args.jobs > 1 and dev.type == "cpu":
        result.update(whole_machine(model, rec, steps, args.jobs, tokens, args.repeats))
    if dev.type == "cuda":
        result["zoo_mfu"] = zoo.flops_per_token(model) * tokens / zoo_s / (args.peak_tflops * 1e12)
    print(f"zoo:{args.model} ({total:,} parameters, {non_embedding:,} non-embedding), {steps} steps of "
          f"{rec['batch_rows']} x {model.family.context} tokens, {dev}, {result['threads']} threads")
    print(f"  zoo loop  {result['zoo_tokens_per_s']:9.0f} tokens/s   last mean loss {zoo_loss:.4f} nats/token")
    print(f"  Trainer   {result['trainer_tokens_per_s']:9.0f} tokens/s   last logged loss {trainer_loss:.4f} nats/token")
    if compiled_runs:
        print(f"  compiled  {result['compiled_tokens_per_s']:9.0f} tokens/s   last mean loss {compiled_loss:.4f} "
              f"nats/token (zoo loop, torch.compile'd model)")
    print(f"  speed ratio zoo / Trainer: {result['speedup']:.2f}x (goal >= 1.3x on a CPU)")
    if compiled_runs:
        print(f"  speed ratio compiled zoo / Trainer: {result['compiled_speedup']:.2f}x")
    if "jobs" in result:
        print(f"  whole machine: {args.jobs} zoo models at once (1 thread each) "
              f"{result['zoo_side_by_side_tokens_per_s']:.0f} tokens/s, Trainer on {args.jobs} threads "
              f"{result['trainer_threads_tokens_per_s']:.0f} tokens/s: {result['whole_machine_speedup']:.2f}x")
    if "zoo_mfu" in result:
        print(f"  zoo model-FLOPs utilization: {100 * result['zoo_mfu']:.2f}% of {args.peak_tflops:g} TFLOP/s")
    write_json(result, args.json)


if __name__ == "__main__":
    main()
