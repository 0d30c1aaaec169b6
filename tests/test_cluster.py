"""Scoring on Ray: tables identical to a serial run's, and a killed worker's model rescored on rerun, alone.

One local Ray instance (2 CPUs, no dashboard) serves the whole module. Its workers run a setup hook that
SIGKILLs the worker scoring a model named victim* right after its first checkpointed batch, once."""

from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mcl_utils.cli import main
from mcl_utils.cluster import connect, score_on_ray
from mcl_utils.corpus import Corpus, CorpusSpec, load_corpus
from mcl_utils.errors import UserError
from mcl_utils.pipeline import load_experiment, run
from mcl_utils.scoring import ScoringSettings, score_model, target
from mcl_utils.store import read_loss_table
from tests.conftest import TEXTS, build_tiny_model

KILL_MARKER = "MCL_TEST_KILL_MARKER"
SETTINGS = ScoringSettings(device="cpu", dtype="float32", batch_tokens=128, max_length=32)  # 5 batches a model


def _corpus(path: Path) -> Corpus:
    """The eight test texts as a corpus with explicit ids."""
    pd.DataFrame({"id": [f"t{i}" for i in range(len(TEXTS))], "text": TEXTS}).to_json(path, orient="records",
                                                                                    lines=True)
    return load_corpus(CorpusSpec(source=str(path), id_column="id", n_samples=None, min_words=0))


def kill_victim_once() -> None:
    """Ray worker setup hook: a worker whose model is named victim* dies by SIGKILL after its first
    checkpointed batch, the first time only (the marker file records that it happened)."""
    import mcl_utils.scoring as scoring

    marker = Path(os.environ[KILL_MARKER])
    append = scoring.Checkpoint.append

    def append_then_die(self, b, *args):
        append(self, b, *args)
        if self.path.name.startswith("victim") and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    scoring.Checkpoint.append = append_then_die


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A local Ray instance for this module, with the killing setup hook in every worker."""
    import ray

    marker = tmp_path_factory.mktemp("ray") / "victim-killed"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             object_store_memory=200 << 20,
             runtime_env={"worker_process_setup_hook": f"{__name__}.kill_victim_once",
                          # the hook runs before Ray puts the driver's directory on the workers' path
                          "env_vars": {KILL_MARKER: str(marker), "PYTHONPATH": str(Path(__file__).parent.parent)}})
    yield marker
    ray.shutdown()


@dataclass
class FirstRun:
    """Three models sent to Ray at once, the middle one's worker killed: what the run left behind."""

    corpus: Corpus
    specs: list[str]
    victim: str
    out: Path
    error: UserError
    log: list[str]
    mtimes: dict[str, int]


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory, tiny_llama, tiny_gpt2) -> FirstRun:
    """Score a tiny Llama, a victim (killed after its first batch) and a tiny GPT-2 as Ray tasks."""
    tmp = tmp_path_factory.mktemp("first-run")
    victim = f"dir:{build_tiny_model(tmp / 'victim', 'llama', seed=3)}"
    specs = [f"dir:{tiny_llama}", victim, f"dir:{tiny_gpt2}"]
    corpus, out, log = _corpus(tmp / "c.jsonl"), tmp / "losses", []
    with pytest.raises(UserError) as info:
        score_on_ray(specs, corpus, out, SETTINGS, log=log.append)
    mtimes = {s: p.stat().st_mtime_ns for s in specs if (p := target(s, corpus, out, SETTINGS).path).exists()}
    return FirstRun(corpus, specs, victim, out, info.value, log, mtimes)


def test_ray_tables_equal_serial_tables(first_run, tmp_path):
    """The models scored as Ray tasks, in worker processes, have the serial run's files, keys and values."""
    run = first_run
    scored = [line for line in run.log if " scored in " in line]
    assert len(scored) == 2 and all(int(line.rsplit(" pid ", 1)[1]) != os.getpid() for line in scored)
    for spec in (run.specs[0], run.specs[2]):
        reference_path = score_model(spec, run.corpus, tmp_path, SETTINGS, progress=False)
        path = target(spec, run.corpus, run.out, SETTINGS).path
        assert path.name == reference_path.name
        (table, prov), (reference, ref_prov) = read_loss_table(path), read_loss_table(reference_path)
        assert prov["cache_key"] == ref_prov["cache_key"]
        pd.testing.assert_frame_equal(table, reference, check_exact=True)


def test_killed_worker_is_rescored_on_rerun_and_only_it(first_run, ray_local, tmp_path):
    """The killed worker fails the run naming its model, after the others finished; a rerun scores that
    model alone, resuming from its checkpoint, and leaves the other tables untouched."""
    run = first_run
    message = str(run.error)
    assert re.match(r"1 of 3 model\(s\) failed on Ray: dir:\S+/victim \(WorkerCrashedError", message)
    assert "\n" not in message and "run the same command again" in message
    assert ray_local.exists() and [line for line in run.log if "FAILED" in line][0].startswith(
        f"[score]  {run.victim}: FAILED")
    victim_path = target(run.victim, run.corpus, run.out, SETTINGS).path
    partial = victim_path.with_name(victim_path.name + ".partial.jsonl")
    assert set(run.mtimes) == {run.specs[0], run.specs[2]}
    assert len(partial.read_text().splitlines()) == 2  # header + the one batch before the kill

    rerun: list[str] = []
    score_on_ray(run.specs, run.corpus, run.out, SETTINGS, log=rerun.append)
    assert [line.split(": ")[1].split()[0] for line in rerun] == ["cached", "cached", "scored"]
    assert rerun[2].startswith(f"[score]  {run.victim}: scored")
    assert {s: target(s, run.corpus, run.out, SETTINGS).path.stat().st_mtime_ns for s in run.mtimes} == run.mtimes
    table, prov = read_loss_table(victim_path)
    assert prov["resumed_batches"] == 1 and not partial.exists()
    reference, _ = read_loss_table(score_model(run.victim, run.corpus, tmp_path, SETTINGS, progress=False))
    pd.testing.assert_frame_equal(table, reference, check_exact=True)


def test_task_error_names_model_and_cause(ray_local, tmp_path, tiny_llama):
    """A model that fails inside its task is reported with the worker's one-line error."""
    corpus = _corpus(tmp_path / "c.jsonl")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"^1 of 2 model\(s\) failed on Ray: dir:\S+/broken \(cannot load") as info:
        score_on_ray([f"dir:{tiny_llama}", f"dir:{broken}"], corpus, tmp_path / "out", SETTINGS, log=lambda _: None)
    assert "\n" not in str(info.value)


def test_auto_dtype_that_would_change_keys_is_refused(ray_local, tmp_path, tiny_llama, monkeypatch):
    """dtype auto on a GPU-less driver with GPU workers would give other cache keys: refused up front."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 8.0})
    with pytest.raises(UserError, match="set dtype: bfloat16"):
        score_on_ray([f"dir:{tiny_llama}"], _corpus(tmp_path / "c.jsonl"), tmp_path / "out", ScoringSettings())


def test_unreachable_cluster_and_missing_ray_are_one_line_errors(monkeypatch):
    """No Ray at the address, or Ray not installed: one line naming the problem and the fix."""
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a process without this module's instance
    with pytest.raises(UserError, match=r"cannot connect to the Ray cluster at '127.0.0.1:1'.*fix: start it"):
        with connect("127.0.0.1:1"):
            pass
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"--ray needs Ray, which is not installed; fix: pip install"):
        with connect():
            pass


def test_cli_run_takes_ray_with_or_without_address(monkeypatch, tmp_path):
    """`mcl run EXP --ray` starts a local instance; `--ray ADDRESS` connects; without it, no Ray."""
    import mcl_utils.pipeline as pipeline

    calls = []
    monkeypatch.setattr(pipeline, "load_experiment", lambda path: path)
    monkeypatch.setattr(pipeline, "run_all", lambda exps, force, ray: calls.append((exps, ray)))
    for argv in (["x.yaml"], ["x.yaml", "--ray"], ["x.yaml", "--ray", "10.0.0.1:6379"]):
        assert main(["run", *argv]) == 0
    assert calls == [(["x.yaml"], None), (["x.yaml"], "local"), (["x.yaml"], "10.0.0.1:6379")]
    assert main(["run", "x.yaml", "y.yaml"]) == 0 and calls[-1] == (["x.yaml", "y.yaml"], None)


def test_run_with_ray_scores_then_runs_the_other_stages(ray_local, tmp_path, tiny_llama, tiny_gpt2):
    """The pipeline with `ray` scores through Ray tasks (no scoring notebooks), then runs the later
    stages as it does without Ray."""
    corpus = _corpus(tmp_path / "c.jsonl")
    spec = {"name": "tiny-ray", "models": [f"dir:{tiny_llama}", f"dir:{tiny_gpt2}"], "analyses": [],
            "corpus": {"source": str(tmp_path / "c.jsonl"), "id_column": "id", "n_samples": None, "min_words": 0},
            "scoring": {k: getattr(SETTINGS, k) for k in ("device", "dtype", "batch_tokens", "max_length")}}
    (tmp_path / "tiny-ray.yaml").write_text(yaml.safe_dump(spec))
    exp = load_experiment(tmp_path / "tiny-ray.yaml", results_dir=tmp_path / "results",
                          generated_dir=tmp_path / "generated")
    lines: list[str] = []
    run(exp, log=lines.append, ray="local")
    assert [line.split(": ")[1].split(" on ")[0][:9] for line in lines[:2]] == ["scored in"] * 2
    assert lines[2].startswith("[status] executed")
    assert {p.name for p in exp.book_dir.glob("*.ipynb")} == {"status.ipynb"}
    assert all(target(m, corpus, exp.losses_dir, exp.scoring).cached for m in exp.models)
