"""The model zoo: training, determinism, resuming after kill -9, scoring, identity and config errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mcl_utils import models, zoo
from mcl_utils.corpus import CorpusSpec, load_corpus
from mcl_utils.errors import UserError
from mcl_utils.scoring import ScoringSettings, score_model
from mcl_utils.store import read_loss_table

from tests import tiny_zoo

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny zoo installed, with its own cache and results directory (restored afterwards)."""
    yield from tiny_zoo.installed(tmp_path, monkeypatch)


def test_tiny_zoo_trains_and_scores(tiny):
    """3 families x 2 sizes train (cards, logs, loss falls) and score as zoo: specs on Brown; the scorer
    reads each one's training context from its config (ALiBi's too, which has no position table)."""
    specs = zoo.expand({"families": ["tinyllama", "tinygpt2", "tinybloom"], "sizes": ["s0", "s1"]})
    zoo.ensure_trained(specs, device="cpu", progress=False, log=lambda _: None)
    corpus = load_corpus(CorpusSpec(n_samples=8))
    for spec in specs:
        card = zoo.read_card(spec.removeprefix("zoo:"))
        log = (tiny / "results" / card["log_file"]).read_text().splitlines()
        assert card["steps"] >= 10 and len(log) > 1 and card["n_params_non_embedding"] > 0
        assert math.isfinite(card["final_train_loss_nats"]) and math.isfinite(card["val_bpb"])
        losses = [float(line.split(",")[2]) for line in log[1:]]
        assert losses[-1] < losses[0] and card["val_nats_per_token"] < math.log(card["config"]["vocab_size"])
        table, prov = read_loss_table(score_model(spec, corpus, tiny / "losses", ScoringSettings(device="cpu")))
        assert len(table) == 8 and prov["model_identity"]["sha256"] == card["weights_sha256"]
        assert prov["model"]["family"] == card["family"] and prov["model"]["context_length"] == 32


def test_same_seed_same_weights_other_seed_differs(tiny):
    """Training twice from scratch gives bit-identical weights; another seed gives other weights."""
    first = zoo.train("tinygpt2-s0", progress=False, log=lambda _: None)["weights_sha256"]
    for run in (tiny / "cache" / "zoo" / "runs").glob("tinygpt2-s0-*"):
        shutil.rmtree(run)
    assert zoo.train("tinygpt2-s0", progress=False, log=lambda _: None)["weights_sha256"] == first
    assert zoo.train("tinygpt2-s0-s1", progress=False, log=lambda _: None)["weights_sha256"] != first


def test_processes_side_by_side_train_one_tokenizer(tiny):
    """Two processes that need a family's tokenizer at once both get it, trained once, nothing left over."""
    code = ("import sys; sys.path.insert(0, %r); from tests import tiny_zoo; tiny_zoo.install(%r); "
            "from mcl_utils import zoo; print(zoo.family_tokenizer(zoo.FAMILIES['tinyllama']))"
            % (str(REPO), str(tiny / "results")))
    env = {**os.environ, "MCL_CACHE": str(tiny / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    paths = {proc.communicate(timeout=300)[0].strip() for proc in procs}
    assert [proc.returncode for proc in procs] == [0, 0] and len(paths) == 1
    tokenizers = tiny / "cache" / "zoo" / "tokenizers"
    assert [p.name for p in tokenizers.iterdir()] == [Path(paths.pop()).name]


def test_kill_during_training_then_resume_gives_identical_weights(tiny):
    """kill -9 after a checkpoint, then resume: the weights equal those of an uninterrupted run."""
    name = "tinyneox-s1"
    model = zoo.parse_name(name)
    run_dir = zoo.checkpoint_dir(model, zoo.recipe(model))
    code = ("import sys, time; sys.path.insert(0, %r); from tests import tiny_zoo; tiny_zoo.install(%r); "
            "from mcl_utils import zoo\n"
            "zoo.train(%r, checkpoint_every=3, progress=False, log=lambda _: None)"
            % (str(REPO), str(tiny / "killed-results"), name))
    env = {**os.environ, "MCL_CACHE": str(tiny / "cache")}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "final").exists()
    step = torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < zoo.recipe(model)["steps"]
    messages = []
    resumed = zoo.train(name, progress=False, log=messages.append)
    assert any(f"resuming at step {step}" in m for m in messages)
    shutil.rmtree(run_dir)
    clean = zoo.train(name, progress=False, log=lambda _: None)
    assert resumed["weights_sha256"] == clean["weights_sha256"]


def test_untrained_zoo_spec_names_the_training_command(tiny):
    """No card: a one-line error naming `mcl zoo train`; a card without checkpoint: the same on loading."""
    with pytest.raises(UserError, match=r"not trained .*fix: run `mcl zoo train tinyllama-s0`"):
        models.model_identity(models.parse_spec("zoo:tinyllama-s0"))
    zoo.train("tinyllama-s0", progress=False, log=lambda _: None)
    assert models.model_identity(models.parse_spec("zoo:tinyllama-s0"))["spec"] == "zoo:tinyllama-s0"
    shutil.rmtree(tiny / "cache" / "zoo" / "runs")
    with pytest.raises(UserError, match=r"no checkpoint on this machine.*mcl zoo train tinyllama-s0"):
        models.load_model("zoo:tinyllama-s0", device="cpu")


def test_card_from_an_older_recipe_is_stale(tiny):
    """A changed recipe (here: the trainer version) makes the card stale: identity asks for retraining."""
    zoo.train("tinygpt2-s0", progress=False, log=lambda _: None)
    card_file = zoo.card_path("tinygpt2-s0")
    card = json.loads(card_file.read_text())
    card_file.write_text(json.dumps({**card, "recipe_hash": "0" * 64}))
    with pytest.raises(UserError, match="older recipe"):
        zoo.identity("tinygpt2-s0")


def test_committed_tokenizer_replaces_a_missing_or_different_cached_one(tiny, monkeypatch):
    """The first card commits the family's tokenizer; a cache without it, or with another one (the unigram
    trainer is not deterministic), gets the committed file back, not a retrained one, and loses its token
    caches; retraining then reproduces the card's weights."""
    family = zoo.FAMILIES["tinyneox"]
    card = zoo.train("tinyneox-s0", progress=False, log=lambda _: None)
    committed = zoo.committed_tokenizer(family) / "tokenizer.json"
    assert committed.is_relative_to(tiny / "results") and models.sha256_file(committed) == card["tokenizer_sha256"]
    monkeypatch.setattr(zoo, "_train_tokenizer", lambda *_: pytest.fail("retrained a committed tokenizer"))
    shutil.rmtree(tiny / "cache" / "zoo")
    assert models.sha256_file(zoo.family_tokenizer(family) / "tokenizer.json") == card["tokenizer_sha256"]
    assert zoo.train("tinyneox-s0", progress=False, log=lambda _: None)["weights_sha256"] == card["weights_sha256"]
    cached = zoo.family_tokenizer(family)
    assert list(cached.glob("tokens-*.npz"))
    (cached / "tokenizer.json").write_text(committed.read_text().replace('"<|unk|>"', '"<|other|>"'))
    assert models.sha256_file(zoo.family_tokenizer(family) / "tokenizer.json") == card["tokenizer_sha256"]
    assert not list(cached.glob("tokens-*.npz"))


def test_family_head_counts_override_the_ladder_and_stay_out_of_the_family_record():
    """Bloom has heads of 8 up to s4 (ALiBi slopes follow the head count) and the ladder's at s5; its head
    counts enter recipes only as each size's resolved heads, so other families keep their recipes."""
    bloom, llama = zoo.FAMILIES["bloom"], zoo.FAMILIES["llama"]
    assert [bloom.shape(f"s{i}").heads for i in range(6)] == [2, 3, 4, 6, 8, 5]
    assert [llama.shape(f"s{i}").heads for i in range(6)] == [2, 3, 2, 3, 4, 5]
    assert "heads" not in bloom.record() and zoo.recipe(zoo.parse_name("bloom-s2"))["size"]["heads"] == 4


def test_measured_budget_times_steps_of_each_model_and_trains_nothing(tiny, monkeypatch):
    """`mcl zoo train --measure`: a few real steps per model, two processes side by side, give each model's
    estimate (seconds per step x its steps) and the longest-first wall time; no checkpoint or card is left."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")  # the workers inherit the tiny zoo installed in this process
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: fork)
    names = ["tinyllama-s0", "tinybloom-s1", "tinyneox-s0"]
    path = zoo.write_budget(names, jobs=2, log=lambda _: None)
    measured = json.loads(path.read_text())
    assert path.name == "budget-cpu.json" and sorted(measured["models"]) == sorted(names)
    for name, entry in measured["models"].items():
        rec = zoo.recipe(zoo.parse_name(name))
        assert entry["step_s"] > 0 and entry["est_s"] == pytest.approx(entry["step_s"] * rec["steps"])
        assert entry["recipe_hash"] == zoo.recipe_hash(rec)
    est = sorted((m["est_s"] for m in measured["models"].values()), reverse=True)
    assert measured["wall_s"] == pytest.approx(max(est[0], est[1] + est[2]))
    assert measured["cpu_s"] == pytest.approx(sum(est)) and measured["jobs"] == 2
    assert not (tiny / "cache" / "zoo" / "runs").exists() and not any(zoo.read_card(n) for n in names)
    subset = zoo.read_budget(names[1:])  # its wall time is recomputed for just these models
    assert subset["wall_s"] == pytest.approx(max(measured["models"][n]["est_s"] for n in names[1:]))
    zoo.FAMILIES["tinyllama"] = dataclasses.replace(zoo.FAMILIES["tinyllama"], lr_ref=0.5)  # a new recipe
    with pytest.raises(UserError, match="no timing of the current recipe of tinyllama-s0; fix: mcl zoo train"):
        zoo.read_budget(names)


def test_timed_run_is_read_only_for_the_recipes_it_trained(tiny):
    """The end-to-end timing of the zoo (results/zoo/timed-run/) is quoted only for models it trained under
    their current recipe; a model it lacks, or one whose recipe changed since, gets a one-line error."""
    name = "tinyllama-s0"
    path = zoo.results_dir() / "timed-run" / "timed-run.json"
    path.parent.mkdir(parents=True)
    trained = {"recipe_hash": zoo.recipe_hash(zoo.recipe(zoo.parse_name(name))), "same_weights": True}
    path.write_text(json.dumps({"wall_s": 60.0, "models": {name: trained}}))
    assert zoo.read_timed_run([name])["wall_s"] == 60.0
    with pytest.raises(UserError, match="no run of the current recipe of tinyneox-s0; fix: python results/zoo"):
        zoo.read_timed_run([name, "tinyneox-s0"])
    zoo.FAMILIES["tinyllama"] = dataclasses.replace(zoo.FAMILIES["tinyllama"], lr_ref=0.5)  # a new recipe
    with pytest.raises(UserError, match="no run of the current recipe of tinyllama-s0"):
        zoo.read_timed_run([name])


@pytest.mark.parametrize("name", ["tinyllama-s0", "tinygpt2-s0", "tinyneox-s0"])
def test_card_rebuilt_from_final_weights_equals_the_first(tiny, name):
    """A deleted card is rebuilt from the trained weights (as a sweep's side-by-side runs are) with the same
    validation loss: every tensor loads, including GPT-NeoX's head, which transformers saves renamed."""
    first = zoo.train(name, progress=False, log=lambda _: None)
    zoo.card_path(name).unlink()
    again = zoo.train(name, progress=False, log=lambda _: None)
    assert again["weights_sha256"] == first["weights_sha256"]
    assert again["val_bpb"] == pytest.approx(first["val_bpb"], rel=1e-6)


@pytest.mark.parametrize("spec, message", [
    ("zoo:nosuch-s1", "unknown zoo family 'nosuch'"),
    ("zoo:llama-s99", "unknown zoo size 's99'"),
    ("zoo:llama", "bad zoo model name"),
])
def test_bad_zoo_specs_give_one_line_errors(spec, message):
    """Unknown family, unknown size, malformed name: one line each."""
    with pytest.raises(UserError, match=message) as err:
        models.parse_spec(spec)
    assert "\n" not in str(err.value)


def test_width_that_does_not_divide_into_heads(monkeypatch):
    """A shape whose width is not a multiple of its heads is refused before anything is built."""
    monkeypatch.setitem(zoo.SIZES, "s42", zoo.Size(width=50, depth=2, heads=4))
    with pytest.raises(UserError, match="width 50 does not divide into 4 heads"):
        zoo.parse_name("llama-s42")


@pytest.mark.parametrize("section, message", [
    ({"families": ["llama"]}, "needs families and sizes"),
    ({"families": ["llama"], "sizes": ["s1"], "extra": 1}, "takes families, sizes and replicas"),
    ({"families": ["llama"], "sizes": ["s1"], "replicas": {"llama": {"sizes": ["s1"]}}}, "need sizes and seeds"),
    ({"families": ["nope"], "sizes": ["s1"]}, "unknown zoo family"),
])
def test_bad_zoo_sections_give_one_line_errors(section, message):
    """The experiment file's zoo section is validated with one-line errors."""
    with pytest.raises(UserError, match=message):
        zoo.expand(section)


def test_zoo_experiments_are_well_formed():
    """The default, classroom and GPU zoos expand and the default meets the issue's shape: 3 families that
    differ in architecture, tokenizer (algorithm or vocabulary size) and mixture, 6+ sizes over 1.5+ decades,
    3 seeds at 2+ sizes."""
    default = zoo.experiment_models(REPO / "experiments" / "zoo.yaml")
    families = {zoo.parse_name(s).family.name for s in default}
    assert len(families) >= 3
    assert len({(f.architecture, f.tokenizer, f.mixture) for f in (zoo.FAMILIES[n] for n in families)}) == 3
    assert len({zoo.FAMILIES[n].architecture for n in families}) == 3
    assert len({(zoo.FAMILIES[n].tokenizer, zoo.FAMILIES[n].vocab_size) for n in families}) == 3  # three vocabularies
    assert len({zoo.FAMILIES[n].mixture for n in families}) == 3
    for family in families:
        sizes = {zoo.parse_name(s).size_name for s in default if zoo.parse_name(s).family.name == family}
        non_embedding = [zoo.count_model(zoo.parse_name(f"{family}-{s}"))[1] for s in sizes]
        assert len(sizes) >= 6 and max(non_embedding) / min(non_embedding) >= 10 ** 1.5
    seeds: dict[tuple[str, str], set[int]] = {}
    for spec in default:
        m = zoo.parse_name(spec)
        seeds.setdefault((m.family.name, m.size_name), set()).add(m.seed)
    assert sum(len(s) >= 3 for s in seeds.values()) >= 2
    classroom = zoo.experiment_models(REPO / "experiments" / "zoo-classroom.yaml")
    assert len(classroom) == 6
    assert zoo.experiment_models(REPO / "experiments" / "zoo-gpu.yaml")


def test_sweep_records_runs_and_fits_a_rule(tiny):
    """A sweep over 2 sizes x 2 learning rates writes every run and the fitted rule the family then uses."""
    result = zoo.sweep("tinygpt2", ["s0", "s1"], [3e-3, 3e-2], progress=False, log=lambda _: None)
    assert len(result["runs"]) == 4 and all(math.isfinite(r["val_bpb"]) for r in result["runs"])
    assert zoo.lr_rule(zoo.FAMILIES["tinygpt2"])["source"] == "tinygpt2.json"
    assert zoo.recipe(zoo.parse_name("tinygpt2-s0"))["lr"] == pytest.approx(
        zoo.peak_lr(zoo.FAMILIES["tinygpt2"], 16, result["rule"]))


def test_wall_time_packs_the_longest_runs_first():
    """Runs of 3, 2, 2 and 1 s take 8 s one at a time and 4 s two at a time (3+1 beside 2+2)."""
    import pandas as pd

    budget = pd.DataFrame({"model": ["a", "b", "c", "d", "total"], "est_s": [2.0, 3.0, 1.0, 2.0, 8.0]})
    assert zoo.wall_time_s(budget, 1) == 8.0 and zoo.wall_time_s(budget, 2) == 4.0


def test_fit_lr_rule_finds_the_minimum_of_each_width_and_the_power_between_them():
    """A loss parabola in log lr with its minimum at 8e-3 (width 16) and 2e-3 (width 64): exponent 1."""
    def runs(best):
        return [(lr, (math.log(lr / best)) ** 2) for lr in (best / 4, best / 2, best * 0.9, best * 2, best * 4)]

    rule = zoo.fit_lr_rule({16: runs(8e-3), 64: runs(2e-3)}, default_exponent=0.5)
    assert rule["lr_exponent"] == pytest.approx(1.0, abs=0.05)
    assert rule["lr_ref"] == pytest.approx(2e-3, rel=0.05)
    edge = zoo.fit_lr_rule({16: [(1e-3, 3.0), (2e-3, 2.0)]}, default_exponent=0.5)
    assert edge["best"]["16"]["on_grid_edge"] and edge["lr_exponent"] == 0.5
    rising = zoo.fit_lr_rule({16: runs(2e-3), 64: runs(8e-3)}, default_exponent=0.5)  # wider wants more
    assert rising["lr_exponent"] == 0.0 and rising["lr_ref"] == pytest.approx(8e-3, rel=0.05)


def test_experiment_zoo_section_expands_to_models(tiny):
    """An experiment's zoo section becomes zoo: specs after its models; listing one twice is refused."""
    from mcl_utils.pipeline import load_experiment

    spec = {"name": "tinyzoo", "models": ["gguf:gemma-3-270m"],
            "zoo": {"families": ["tinyllama", "tinygpt2"], "sizes": ["s0"],
                    "replicas": {"tinygpt2": {"sizes": ["s0"], "seeds": [1, 2]}}}}
    path = tiny / "tinyzoo.yaml"
    path.write_text(json.dumps(spec))
    assert load_experiment(path).models == ("gguf:gemma-3-270m", "zoo:tinyllama-s0", "zoo:tinygpt2-s0",
                                            "zoo:tinygpt2-s0-s1", "zoo:tinygpt2-s0-s2")
    path.write_text(json.dumps({**spec, "models": ["zoo:tinyllama-s0"]}))
    with pytest.raises(UserError, match="listed twice"):
        load_experiment(path)


def test_parallel_training_gives_the_weights_of_serial_training(tiny, monkeypatch):
    """Two models trained side by side in worker processes (one thread each) end with the same weights as
    when trained one after the other."""
    import multiprocessing

    specs = ["zoo:tinyllama-s0", "zoo:tinygpt2-s0"]
    fork = multiprocessing.get_context("fork")  # the workers inherit the tiny zoo installed in this process
    monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: fork)
    lines: list[str] = []
    zoo.ensure_trained(specs, device="cpu", progress=False, log=lines.append, jobs=2, threads=1)
    assert sum("trained in" in line for line in lines) == 2
    parallel = {s: zoo.read_card(s.removeprefix("zoo:"))["weights_sha256"] for s in specs}
    zoo.ensure_trained(specs, device="cpu", progress=False, log=lambda _: None, force=True, threads=1)
    assert {s: zoo.read_card(s.removeprefix("zoo:"))["weights_sha256"] for s in specs} == parallel


def test_token_mixtures_recompute_only_families_whose_tables_changed(tiny, monkeypatch):
    """`mcl zoo mix` keeps a family's mixtures while its models' loss tables are those the file was built
    from, so a changed family is recomputed without running the others (whose weights may be gone)."""
    from mcl_utils import pipeline

    path = tiny / "mix.yaml"
    path.write_text(json.dumps({"name": "mix", "models": [], "analyses": [],
                                "zoo": {"families": ["tinyllama", "tinygpt2"], "sizes": ["s0", "s1"]},
                                "corpus": {"source": "brown", "n_samples": 8}, "scoring": {"device": "cpu"}}))
    exp = pipeline.load_experiment(path, results_dir=tiny / "results", generated_dir=tiny / "generated")
    zoo.ensure_trained(exp.models, device="cpu", progress=False, log=lambda _: None)
    for spec in exp.models:  # in this process, where the tiny families are installed
        score_model(spec, pipeline.experiment_corpus(exp), exp.losses_dir, exp.scoring, progress=False)
    runs: list[str] = []
    real = pipeline.cached_token_losses
    monkeypatch.setattr(pipeline, "cached_token_losses", lambda spec, *a, **k: runs.append(spec) or real(spec, *a, **k))
    first = json.loads(pipeline.token_mixtures(exp, progress=False, log=lambda _: None).read_text())
    assert len(runs) == 4 and set(first["families"]) == {"tinyllama", "tinygpt2"}
    runs.clear()
    lines: list[str] = []
    again = pipeline.token_mixtures(exp, progress=False, log=lines.append)
    assert runs == [] and sum("cached" in line for line in lines) == 2
    stale = json.loads(again.read_text())
    stale["inputs"]["zoo:tinygpt2-s0"] = "an older table"
    again.write_text(json.dumps(stale))
    assert json.loads(pipeline.token_mixtures(exp, progress=False, log=lambda _: None).read_text()) == {
        **first, "created_utc": json.loads(again.read_text())["created_utc"]}
    assert runs == ["zoo:tinygpt2-s0", "zoo:tinygpt2-s1"]
