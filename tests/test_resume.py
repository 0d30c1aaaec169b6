"""A scoring run killed at any point resumes and writes exactly the table an uninterrupted run writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from mcl_utils.corpus import CorpusSpec, load_corpus
from mcl_utils.scoring import ScoringSettings, score_model
from mcl_utils.store import read_loss_table
from tests.conftest import TEXTS

SETTINGS = ScoringSettings(device="cpu", dtype="float32", batch_tokens=40, max_length=16)

# Runs score_model in a child process that SIGKILLs itself at a chosen point: after batch K is
# checkpointed, after the last batch, or in the middle of writing the final table (before its rename).
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import pyarrow.parquet as pq
    import mcl_utils.scoring as scoring
    from mcl_utils.corpus import CorpusSpec, load_corpus
    from tests.test_resume import SETTINGS
    where, k, model, corpus_path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    if where == "batch":
        append = scoring.Checkpoint.append
        def killing_append(self, b, *args):
            append(self, b, *args)
            if len(self.path.read_text().splitlines()) - 1 >= k:
                os.kill(os.getpid(), signal.SIGKILL)
        scoring.Checkpoint.append = killing_append
    elif where == "aggregate":  # every batch is checkpointed, no table yet
        scoring.per_sample = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    else:
        def killing_write(table, where, **kw):
            Path(where).write_bytes(b"PAR1 half")
            os.kill(os.getpid(), signal.SIGKILL)
        pq.write_table = killing_write
    corpus = load_corpus(CorpusSpec(source=corpus_path, id_column="id", n_samples=None, min_words=0))
    scoring.score_model(model, corpus, Path(out), SETTINGS, progress=False)
""")


def _corpus(path: Path):
    """The test corpus with long samples, so that there are windows and many batches."""
    pd.DataFrame({"id": [f"t{i}" for i in range(16)], "text": [t * 2 for t in TEXTS] * 2}).to_json(
        path, orient="records", lines=True)
    return load_corpus(CorpusSpec(source=str(path), id_column="id", n_samples=None, min_words=0))


@pytest.mark.parametrize("where,k", [("batch", 1), ("batch", 7), ("aggregate", 0), ("write", 0)])
def test_killed_run_resumes_to_identical_table(tmp_path, tiny_llama, where, k):
    """SIGKILL after batch k (or mid-write), then rerun: the table equals an uninterrupted run's."""
    corpus_path = tmp_path / "c.jsonl"
    corpus = _corpus(corpus_path)
    model = f"dir:{tiny_llama}"
    reference, _ = read_loss_table(score_model(model, corpus, tmp_path / "ref", SETTINGS, progress=False))
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLER, where, str(k), model, str(corpus_path), str(out)],
                            cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not list(out.glob("*.parquet")), "a killed run must leave no loss table behind"
    partial = list(out.glob("*.partial.jsonl"))
    assert len(partial) == 1
    n_checkpointed = len(partial[0].read_text().splitlines()) - 1
    if where == "batch":
        assert n_checkpointed == k
    resumed, prov = read_loss_table(score_model(model, corpus, out, SETTINGS, progress=False))
    pd.testing.assert_frame_equal(resumed, reference, check_exact=True)
    assert prov["resumed_batches"] == n_checkpointed
    assert not partial[0].exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_torn_checkpoint_line_is_dropped(tmp_path, tiny_llama):
    """A checkpoint whose last line was cut mid-write resumes from the last whole batch."""
    corpus = _corpus(tmp_path / "c.jsonl")
    model = f"dir:{tiny_llama}"
    reference, _ = read_loss_table(score_model(model, corpus, tmp_path / "ref", SETTINGS, progress=False))
    out = tmp_path / "out"
    path = score_model(model, corpus, out, SETTINGS, progress=False)
    path.unlink()
    # Rebuild a checkpoint by hand: header, two batches, and a torn third line.
    ref_partial = path.with_name(path.name + ".partial.jsonl")
    scoring_log = []
    import mcl_utils.scoring as scoring

    original = scoring.Checkpoint.append
    scoring.Checkpoint.append = lambda self, b, *a: scoring_log.append((self, b, a))
    try:
        score_model(model, corpus, tmp_path / "scratch", SETTINGS, progress=False)
    finally:
        scoring.Checkpoint.append = original
    for self, b, args in scoring_log[:2]:
        scoring.Checkpoint(ref_partial, self.header).append(b, *args)
    with open(ref_partial, "a") as f:
        f.write('{"b": 2, "nll": [1.0, 2')
    resumed, prov = read_loss_table(score_model(model, corpus, out, SETTINGS, progress=False))
    assert prov["resumed_batches"] == 2
    pd.testing.assert_frame_equal(resumed, reference, check_exact=True)
