"""Nothing wrong is ever cached: loss tables and analysis results are reused only while their content
matches the hash recorded when they were written, and a stage's key covers every file it reads; leftovers
of killed runs are cleaned on the next start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mcl_utils import pipeline
from mcl_utils.cli import main
from mcl_utils.store import LOSS_SCHEMA, PROVENANCE_KEY, read_loss_table
from tests.conftest import TEXTS

REPO = Path(__file__).resolve().parent.parent


def _score_argv(model: Path, corpus: Path, out: Path) -> list[str]:
    """`mcl score` of one tiny model on the test corpus."""
    return ["score", "--model", f"dir:{model}", "--corpus", str(corpus), "--id-column", "id", "--min-words", "0",
            "--out", str(out), "--device", "cpu", "--dtype", "float32", "--no-progress"]


def _rewrite(path: Path, change) -> None:
    """Rewrite a loss table's rows (keeping its provenance, as an edit in pandas would)."""
    table = pq.read_table(path)
    frame = change(table.to_pandas())
    edited = pa.Table.from_pandas(frame, schema=LOSS_SCHEMA, preserve_index=False)
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), path)


def _drop_content_hash(path: Path) -> None:
    """A table as written before content hashes existed."""
    table = pq.read_table(path)
    prov = json.loads(table.schema.metadata[PROVENANCE_KEY])
    del prov["content_sha256"]
    pq.write_table(table.replace_schema_metadata({PROVENANCE_KEY: json.dumps(prov).encode()}), path)


def _nan_first(frame: pd.DataFrame) -> pd.DataFrame:
    """The first loss replaced by NaN."""
    return frame.assign(nll_nats=[np.nan, *frame["nll_nats"].iloc[1:]])


def _truncate(path: Path) -> None:
    """Cut the file in half."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", [
    lambda p: _rewrite(p, lambda f: f.assign(nll_nats=f["nll_nats"] + 1.0)),
    lambda p: _rewrite(p, _nan_first),
    lambda p: _rewrite(p, lambda f: f.iloc[2:]),
    lambda p: _rewrite(p, lambda f: f.assign(n_bytes=f["n_bytes"] * 2)),
    _truncate,
    _drop_content_hash,
], ids=["values edited", "a NaN", "rows deleted", "byte counts edited", "truncated file", "no content hash"])
def test_damaged_loss_table_is_rescored(damage, tmp_path, tiny_llama, jsonl_corpus, capsys):
    """A cached table that no longer matches its content hash is not reused: `mcl score` rescores it and
    prints the true bits per byte."""
    argv = _score_argv(tiny_llama, jsonl_corpus, tmp_path / "out")
    assert main(argv) == 0
    first = capsys.readouterr().out
    (path,) = (tmp_path / "out").glob("*.parquet")
    reference, _ = read_loss_table(path)
    damage(path)
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "(cached)" not in second and second.split(" bits/byte")[0] == first.split(" bits/byte")[0]
    pd.testing.assert_frame_equal(read_loss_table(path)[0], reference, check_exact=True)
    assert main(argv) == 0 and "(cached)" in capsys.readouterr().out


def test_finished_checkpoint_next_to_its_table_is_removed(tmp_path, tiny_llama, jsonl_corpus, capsys):
    """A .partial.jsonl left beside a finished table (a kill between the two) goes on the next start."""
    argv = _score_argv(tiny_llama, jsonl_corpus, tmp_path / "out")
    assert main(argv) == 0
    (path,) = (tmp_path / "out").glob("*.parquet")
    partial = path.with_name(path.name + ".partial.jsonl")
    partial.write_text('{"cache_key": "x", "plan": "y"}\n')
    assert main(argv) == 0 and "(cached)" in capsys.readouterr().out
    assert not partial.exists()


KILLED_AFTER_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import mcl_utils.scoring as scoring
    from mcl_utils.corpus import CorpusSpec, load_corpus
    write = scoring.write_loss_table
    def write_then_die(*args):
        write(*args)
        os.kill(os.getpid(), signal.SIGKILL)
    scoring.write_loss_table = write_then_die
    corpus = load_corpus(CorpusSpec(source=sys.argv[2], id_column="id", n_samples=None, min_words=0))
    settings = scoring.ScoringSettings(device="cpu", dtype="float32", batch_tokens=40)
    scoring.score_model(sys.argv[1], corpus, Path(sys.argv[3]), settings, progress=False)
""")


def test_kill_between_table_and_checkpoint_removal(tmp_path, tiny_llama, jsonl_corpus):
    """Killed after the table was written but before its checkpoint was removed: the next start reuses the
    table and removes the checkpoint."""
    from mcl_utils.corpus import CorpusSpec, load_corpus
    from mcl_utils.scoring import ScoringSettings, score_model

    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_WRITE, f"dir:{tiny_llama}", str(jsonl_corpus),
                             str(out)], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list(out.glob("*.partial.jsonl"))) == 1
    (table,) = out.glob("*.parquet")
    written = table.stat().st_mtime_ns
    corpus = load_corpus(CorpusSpec(source=str(jsonl_corpus), id_column="id", n_samples=None, min_words=0))
    path = score_model(f"dir:{tiny_llama}", corpus, out, ScoringSettings(device="cpu", dtype="float32",
                                                                         batch_tokens=40), progress=False)
    assert path == table and table.stat().st_mtime_ns == written  # the killed run's table, reused
    assert not list(out.glob("*.partial.jsonl"))


def test_window_planner_refuses_a_non_positive_window():
    """rolling_windows with max_length < 1 fails at once (it used to loop forever, growing memory)."""
    code = "from mcl_utils.scoring import rolling_windows; rolling_windows([1, 2, 3], 0, -1)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "max_length must be at least 1" in done.stderr


# ---------------------------------------------------------------- analysis stages


def _experiment(tmp_path: Path, models: list[str]) -> Path:
    """A tiny experiment running only the oracle stage, its corpus given relative to its own folder."""
    folder = tmp_path / "exp"
    folder.mkdir()
    pd.DataFrame({"text": TEXTS * 2, "genre": ["news", "fiction"] * len(TEXTS)}).to_parquet(folder / "c.parquet")
    spec = {"name": "tiny", "models": models, "corpus": {"source": "c.parquet", "n_samples": None},
            "scoring": {"device": "cpu", "dtype": "float32", "max_length": 32}, "analyses": ["oracle"],
            "bootstrap_resamples": 20}
    (folder / "tiny.yaml").write_text(yaml.safe_dump(spec))
    return folder / "tiny.yaml"


def test_analysis_outputs_are_checked_before_reuse(tmp_path, tiny_llama, tiny_gpt2):
    """Deleting or editing a stage's results file, or editing its corpus file, reruns the stage."""
    path = _experiment(tmp_path, [f"dir:{tiny_llama}", f"dir:{tiny_gpt2}"])
    exp = pipeline.load_experiment(path, results_dir=tmp_path / "results", generated_dir=tmp_path / "book")

    def oracle_line() -> str:
        lines: list[str] = []
        pipeline.run(exp, log=lines.append)
        return next(line for line in lines if line.startswith("[oracle]"))

    assert "executed" in oracle_line()
    assert oracle_line() == "[oracle]  cached"
    (exp.out_dir / "oracle.json").unlink()
    assert "executed" in oracle_line()
    pools = pd.read_parquet(exp.out_dir / "oracle.parquet")
    pools.assign(oracle_bpb=pools["oracle_bpb"] * 0.5).to_parquet(exp.out_dir / "oracle.parquet")
    assert "executed" in oracle_line()
    corpus = pd.read_parquet(tmp_path / "exp" / "c.parquet")
    corpus.assign(genre="all").to_parquet(tmp_path / "exp" / "c.parquet")  # same texts, new metadata
    assert "executed" in oracle_line()
    assert oracle_line() == "[oracle]  cached"


@pytest.mark.parametrize("stage, relative", [("laws", "data/published/fits.csv"),
                                             ("scaling", "results/zoo/gpt2-bytes/gpt2-s0.json"),
                                             ("scaling", "results/zoo/gpt2-v2/logs/gpt2-s3.csv"),
                                             ("scaling", "results/zoo/gpt2-v2/losses/gpt2-s3--0.parquet")])
def test_stage_key_covers_the_files_it_reads(tmp_path, monkeypatch, stage, relative):
    """Editing a file a stage reads (published data; a probe's card, log or loss table in a subfolder of
    results/zoo/) changes that stage's key; the oracle stage's, which does not read it, is unmoved."""
    root = tmp_path / "repo"
    path = root / relative
    path.parent.mkdir(parents=True)
    path.write_text("first")
    exp_path = tmp_path / "e.yaml"
    exp_path.write_text(yaml.safe_dump({"name": "e", "models": ["dir:x"]}))
    exp = pipeline.load_experiment(exp_path)
    monkeypatch.setattr(pipeline, "REPO_ROOT", root)
    notebooks = [tmp_path / f"{name}.ipynb" for name in (stage, "oracle")]
    for notebook in notebooks:
        notebook.write_text("{}")
    keys = [pipeline.analysis_key(exp, notebook, {}) for notebook in notebooks]
    path.write_text("second")
    assert pipeline.analysis_key(exp, notebooks[0], {}) != keys[0]
    assert pipeline.analysis_key(exp, notebooks[1], {}) == keys[1]


def test_stage_key_is_the_same_in_every_clone(tmp_path, monkeypatch):
    """Two clones at different paths give a stage the same key, so executed notebooks committed in one
    are current in the other."""
    exp_path = tmp_path / "e.yaml"
    exp_path.write_text(yaml.safe_dump({"name": "e", "models": ["dir:x"]}))
    exp = pipeline.load_experiment(exp_path)
    notebook = tmp_path / "scaling.ipynb"
    notebook.write_text("{}")
    keys = []
    for clone in ("here", "elsewhere"):
        card = tmp_path / clone / "results" / "zoo" / "llama-s0.json"
        card.parent.mkdir(parents=True)
        card.write_text("{}")
        monkeypatch.setattr(pipeline, "REPO_ROOT", tmp_path / clone)
        keys.append(pipeline.analysis_key(exp, notebook, {}))
    assert keys[0] == keys[1]


def test_every_data_file_a_notebook_reads_is_a_declared_input():
    """Each `data/...` path named in an analysis notebook matches one of its stage's input patterns."""
    import fnmatch
    import re

    for name in pipeline.ANALYSES:
        source = (REPO / "notebooks" / f"{name}.ipynb").read_text()
        for used in set(re.findall(r"data/[\w./*-]+", source)):
            assert any(fnmatch.fnmatch(used, p) for p in pipeline.STAGE_INPUTS[name]), (name, used)


def test_relative_paths_resolve_against_the_experiment_file(tmp_path, tiny_llama, monkeypatch):
    """A relative corpus path and dir: model in an experiment mean the same wherever the command runs."""
    path = _experiment(tmp_path, ["dir:model", "dir:model/"])
    with pytest.raises(Exception, match="listed twice"):
        pipeline.load_experiment(path)
    data = yaml.safe_load(path.read_text())
    data["models"] = ["dir:model"]
    path.write_text(yaml.safe_dump(data))
    seen = []
    for cwd in (tmp_path, REPO):
        monkeypatch.chdir(cwd)
        exp = pipeline.load_experiment(Path(os.path.relpath(path, cwd)))
        seen.append((exp.corpus.source, exp.models))
    assert seen[0] == seen[1] == (str(tmp_path / "exp" / "c.parquet"), (f"dir:{tmp_path / 'exp' / 'model'}",))


def test_stale_kernel_folders_are_removed(monkeypatch, tmp_path):
    """Kernel socket folders of killed runs (no atexit on SIGKILL/SIGTERM) are removed by the next run."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"mcl-kernels-{dead.pid}-abcd1234").mkdir()
    (tmp_path / f"mcl-kernels-{os.getpid()}-live0000").mkdir()
    pipeline._socket_dir.cache_clear()
    try:
        mine = pipeline._socket_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"mcl-kernels-{os.getpid()}-live0000",
                                                                     mine.name])
    finally:
        pipeline._socket_dir.cache_clear()
