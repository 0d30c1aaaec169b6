"""Two processes on one cache entry: a loss table scored (and killed, and resumed) under two batch plans at
once, and two first-use dequantizations into an empty cache, and workers checking one new output folder at once. Each
ends with correct, complete results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from mcl_utils.scoring import Checkpoint, ScoringSettings, score_model
from mcl_utils.store import read_loss_table
from tests.test_resume import _corpus

REPO = Path(__file__).resolve().parent.parent
PLANS = (40, 64)  # --batch-tokens of the two runs: one cache key, two batch plans

# Scores in a child process, pausing after each checkpointed batch (so that two children overlap), and
# SIGKILLs itself after its own `kill_after`-th batch (0: never).
SCORER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import mcl_utils.scoring as scoring
    from mcl_utils.corpus import CorpusSpec, load_corpus
    batch_tokens, kill_after, model, corpus_path, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                                         sys.argv[4], sys.argv[5])
    append, mine = scoring.Checkpoint.append, []
    def slow_append(self, b, *args):
        append(self, b, *args)
        mine.append(b)
        time.sleep(0.1)
        if len(mine) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    scoring.Checkpoint.append = slow_append
    corpus = load_corpus(CorpusSpec(source=corpus_path, id_column="id", n_samples=None, min_words=0))
    settings = scoring.ScoringSettings(device="cpu", dtype="float32", max_length=16, batch_tokens=batch_tokens)
    print(scoring.score_model(model, corpus, Path(out), settings, progress=False))
""")


def _settings(batch_tokens: int) -> ScoringSettings:
    """The test settings under one batch plan (batch_tokens is not part of the cache key)."""
    return ScoringSettings(device="cpu", dtype="float32", max_length=16, batch_tokens=batch_tokens)


def _spawn(batch_tokens: int, kill_after: int, model: str, corpus_path: Path, out: Path) -> subprocess.Popen:
    """Start one scoring child."""
    return subprocess.Popen([sys.executable, "-c", SCORER, str(batch_tokens), str(kill_after), model,
                             str(corpus_path), str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


@pytest.fixture()
def reference(tmp_path, tiny_llama):
    """The corpus, the model spec, and the table an undisturbed run writes."""
    corpus = _corpus(tmp_path / "c.jsonl")
    model = f"dir:{tiny_llama}"
    table, _ = read_loss_table(score_model(model, corpus, tmp_path / "ref", _settings(PLANS[0]), progress=False))
    return corpus, model, table


def _assert_close(table: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Same samples and token counts; losses equal up to float32 batching noise (corruption is nats)."""
    pd.testing.assert_frame_equal(table, reference, check_exact=False, rtol=0, atol=1e-4)


def test_two_runs_with_two_batch_plans_both_finish_correctly(tmp_path, reference):
    """Two `mcl score` runs of one cache key with different batch budgets, at once: both succeed, and the
    one table they leave holds the right values."""
    corpus, model, ref = reference
    out = tmp_path / "out"
    children = [_spawn(plan, 0, model, tmp_path / "c.jsonl", out) for plan in PLANS]
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-2000:]
    (path,) = out.glob("*.parquet")
    _assert_close(read_loss_table(path)[0], ref)
    assert not list(out.glob("*.partial.jsonl"))


def test_two_killed_runs_with_two_batch_plans_resume_correctly(tmp_path, reference):
    """Two runs of one cache key under different batch plans, both killed mid-way, then resumed under
    either plan: the resumed table is right (no batch of one plan is ever read as the other's)."""
    corpus, model, ref = reference
    for resume_plan in PLANS:
        out = tmp_path / f"out-{resume_plan}"
        children = [_spawn(plan, 4, model, tmp_path / "c.jsonl", out) for plan in PLANS]
        for child in children:
            _, stderr = child.communicate(timeout=300)
            assert child.returncode == -9, stderr[-2000:]
        resumed, _ = read_loss_table(score_model(model, corpus, out, _settings(resume_plan), progress=False))
        _assert_close(resumed, ref)


def test_checkpoint_refuses_records_of_another_plan(tmp_path):
    """A record appended under one header by a run with another plan fails its checksum and is not used;
    neither is anything after it."""
    path = tmp_path / "x.partial.jsonl"
    mine = Checkpoint(path, {"cache_key": "k", "plan": "A"})
    other = Checkpoint(path, {"cache_key": "k", "plan": "B"})
    mine.append(0, [1.0], [3], 0.1)
    other.append(1, [99.0], [3], 0.1)  # the file exists, so it lands under plan A's header
    mine.append(2, [2.0], [3], 0.1)
    done, _ = mine.load()
    assert done == {0: ([1.0], [3])}
    assert len(path.read_text().splitlines()) == 2  # header and the one good record; appends start clean


def test_checkpoint_refuses_an_edited_record(tmp_path):
    """A record whose numbers were changed on disk fails its checksum."""
    path = tmp_path / "x.partial.jsonl"
    Checkpoint(path, {"cache_key": "k", "plan": "A"}).append(0, [1.25], [3], 0.1)
    path.write_text(path.read_text().replace("1.25", "1.5"))
    assert Checkpoint(path, {"cache_key": "k", "plan": "A"}).load() == ({}, 0.0)


# Dequantizes the fake offline model of tests/conftest.py in a child process (slowly, so that
# two children overlap), logging each dequantization it does.
DEQUANTIZER = textwrap.dedent("""
    import shutil, sys, time
    from pathlib import Path
    from mcl_utils import models
    from tests.conftest import register_fake
    source, package_root, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    register_fake(package_root)
    def slow_dequantize(src, out_dir):
        with open(log, "a") as f:
            f.write("dequantized\\n")
        time.sleep(1.0)
        shutil.copytree(source, out_dir)
    models._dequantize = slow_dequantize
    print(models.dequantized_checkpoint("fake"))
""")


def test_two_first_use_dequantizations(tmp_path, tiny_llama, fake_gguf):
    """Two processes needing the same offline model in an empty cache: one dequantizes, both use it,
    and no temporary folder remains."""
    log = tmp_path / "log.txt"
    env = {**os.environ, "MCL_CACHE": str(tmp_path / "cache")}
    children = [subprocess.Popen([sys.executable, "-c", DEQUANTIZER, str(tiny_llama), str(fake_gguf), str(log)],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    outputs = []
    for child in children:
        stdout, stderr = child.communicate(timeout=300)
        assert child.returncode == 0, stderr[-2000:]
        outputs.append(stdout.strip())
    assert outputs[0] == outputs[1] and log.read_text().count("dequantized") == 1
    folder = Path(outputs[0])
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def _check_folder_many_times(path: str) -> int:
    """Check one folder for writing 1,000 times (a worker of the test below); how many checks refused it."""
    from mcl_utils.errors import UserError
    from mcl_utils.store import check_writable_dir

    refused = 0
    for _ in range(1000):
        try:
            check_writable_dir(Path(path), "output folder")
        except UserError:
            refused += 1
    return refused


def test_processes_checking_one_new_folder_at_once_all_find_it_writable(tmp_path):
    """Ray workers check a not-yet-existing output folder at once; each check creates it and removes what it
    created, so one check can remove the folder another has just made: none may call it not writable, and no
    probe file is left (empty folders may be: which check created them is a race)."""
    import multiprocessing

    folder = tmp_path / "results" / "losses"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        assert pool.map(_check_folder_many_times, [str(folder)] * 4) == [0, 0, 0, 0]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
