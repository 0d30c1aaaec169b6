"""Merging: the four operators on hand-checked tensors and their identities, mergekit's answers on the same
checkpoints, merged checkpoints scored through `mcl score`, the study on a tiny zoo, and its analyses."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mcl_utils import laws, merging
from mcl_utils.cli import main
from mcl_utils.errors import UserError
from mcl_utils.merging import Average, Dare, TaskArithmetic, Ties
from mcl_utils.store import read_loss_table

BASE = {"w": torch.zeros(4), "b": torch.tensor([1.0, -1.0])}
E1 = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5]), "b": torch.tensor([2.0, -1.0])}
E2 = {"w": torch.tensor([3.0, 2.0, -1.0, 0.5]), "b": torch.tensor([0.0, -3.0])}


def close(a: dict, b: dict, atol: float = 1e-6) -> bool:
    """Two state dicts with the same tensors, equal within atol."""
    return a.keys() == b.keys() and all(torch.allclose(a[n], b[n], atol=atol) for n in a)


def test_operators_on_hand_checked_tensors():
    """Each operator's answer on two 4-entry experts, worked out by hand."""
    assert close(Average().merge(BASE, [E1, E2]), {"w": torch.tensor([2.0, 0.0, 1.0, 0.5]),
                                                   "b": torch.tensor([1.0, -2.0])})
    # task vectors: w (1,-2,3,.5) and (3,2,-1,.5); b (1,0) and (-1,-2)
    assert close(TaskArithmetic(0.5).merge(BASE, [E1, E2]), {"w": torch.tensor([2.0, 0.0, 1.0, 0.5]),
                                                             "b": torch.tensor([1.0, -2.0])})
    # TIES, density 0.5: w keeps (0,-2,3,0) and (3,2,0,0); sum (3,0,3,0) elects + everywhere (0 elects +);
    # agreeing entries: 3 | 2 | 3 | none -> (3,2,3,0). b keeps one of two: (1,0) and (0,-2); sum (1,-2)
    # elects (+,-): means 1 and -2 -> b = (1,-1) + (1,-2) = (2,-3).
    assert close(Ties(0.5, 1.0).merge(BASE, [E1, E2]), {"w": torch.tensor([3.0, 2.0, 3.0, 0.0]),
                                                        "b": torch.tensor([2.0, -3.0])})
    assert close(Ties(0.5, 0.5).merge(BASE, [E1, E2]), {"w": torch.tensor([1.5, 1.0, 1.5, 0.0]),
                                                        "b": torch.tensor([1.5, -2.0])})
    # DARE with a seeded mask: every kept entry is rescaled by 1/(1-p), dropped ones are 0
    p = 0.5
    out = Dare(p, 1.0, seed=3).merge(BASE, [E1])["w"]
    assert all(float(o) in (0.0, float(v) / (1 - p)) for o, v in zip(out, E1["w"]))
    assert torch.equal(out, Dare(p, 1.0, seed=3).merge(BASE, [E1])["w"])  # same seed, same mask


def random_state(seed: int, scale: float = 1.0) -> dict:
    """A small random state dict (three tensors)."""
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(shape, generator=g) for n, shape in
            (("embed", (7, 5)), ("proj", (5, 5)), ("norm", (5,)))}


def test_operator_identities():
    """Average of identical experts is that expert; TA with scale 0 is the base; TIES with density 1 and
    agreeing signs is TA with 1/k; DARE with drop 0 is TA, and its mean over seeds tends to TA."""
    base, expert = random_state(0), random_state(1)
    assert close(Average().merge(base, [expert, expert, expert]), expert)
    experts = [random_state(s) for s in (2, 3, 4)]
    assert close(TaskArithmetic(0.0).merge(base, experts), base)
    same_sign = [{n: base[n] + (i + 1) * (expert[n] - base[n]).abs() for n in base} for i in range(3)]
    assert close(Ties(1.0, 1.0).merge(base, same_sign), TaskArithmetic(1 / 3).merge(base, same_sign), atol=1e-5)
    assert close(Dare(0.0, 0.4).merge(base, experts), TaskArithmetic(0.4).merge(base, experts))
    ta = TaskArithmetic(1 / 3).merge(base, experts)
    mean = {n: torch.stack([Dare(0.3, 1 / 3, seed=s).merge(base, experts)[n] for s in range(400)]).mean(0)
            for n in base}
    assert close(mean, ta, atol=0.08) and not close(Dare(0.3, 1 / 3, seed=0).merge(base, experts), ta, atol=0.08)


@pytest.mark.parametrize("call, message", [
    (lambda: Average().merge(BASE, []), "no experts given"),
    (lambda: Average().merge(BASE, [{"w": E1["w"]}]), "other tensors than the base"),
    (lambda: Average().merge(BASE, [{"w": torch.zeros(3), "b": E1["b"]}]), "has shape (3,)"),
    (lambda: Ties(0.0), "density must be in (0, 1]"),
    (lambda: Dare(1.0), "drop rate must be in [0, 1)"),
    (lambda: merging.study_operator("slerp", 2), "unknown merge method 'slerp'"),
    (lambda: merging.MergingSettings(domains=("sotu",)), "at least 2 distinct known domains"),
    (lambda: merging.MergingSettings(sizes="s1"), "sizes must be a non-empty list"),
    (lambda: merging.MergingSettings(eval_samples=1), "eval_samples must be an integer >= 2"),
])
def test_bad_merges_are_one_line_errors(call, message):
    """Bad operators, experts and settings are refused with the problem and the fix."""
    with pytest.raises(UserError) as err:
        call()
    assert message in str(err.value) and "fix:" in str(err.value) and "\n" not in str(err.value)


def make_experts(root: Path, base_dir: Path, k: int) -> list[Path]:
    """k 'experts' of a tiny checkpoint: its weights plus seeded noise, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(k):
        net = AutoModelForCausalLM.from_pretrained(base_dir)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        out = root / f"expert{i}"
        net.save_pretrained(out, safe_serialization=True)
        for f in base_dir.glob("tokenizer*"):
            shutil.copy(f, out)
        dirs.append(out)
    return dirs


def mergekit_merge(root: Path, base_dir: Path, experts: list[Path], method: str, parameters: dict,
                   top: dict | None = None) -> dict:
    """mergekit's merge of the same checkpoints (run in this process), as a state dict."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate({
        "merge_method": method, "dtype": "float32", **({} if method == "linear" else {"base_model": str(base_dir)}),
        "models": [{"model": str(e), "parameters": parameters} for e in experts], "parameters": top or {}})
    out = root / f"mergekit-{method}"
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return merging.load_state(out)


def test_operators_match_mergekit(tmp_path, tiny_llama):
    """On the same tiny Llama checkpoints, our operators give mergekit's tensors (its linear merge with
    equal weights, task_arithmetic with weight lambda, ties with density and normalize, dare_linear at
    density 1: its random masks use another generator and an L1 rescale, so the seeded DARE is checked
    against the 1/(1-p) rule above instead)."""
    pytest.importorskip("mergekit")
    experts = make_experts(tmp_path, tiny_llama, 3)
    base, states = merging.load_state(tiny_llama), [merging.load_state(e) for e in experts]
    base_only = {n: t for n, t in base.items()}
    checks = [
        (Average(), "linear", {"weight": 1.0}, {"normalize": True}),
        (TaskArithmetic(0.8 / 3), "task_arithmetic", {"weight": 0.8 / 3}, {}),
        (Ties(0.2, 1.0), "ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}),
        (Dare(0.0, 1 / 3), "dare_linear", {"weight": 1 / 3, "density": 1.0}, {"normalize": False}),
    ]
    for op, method, params, top in checks:
        ours = op.merge(base_only, states)
        theirs = mergekit_merge(tmp_path, tiny_llama, experts, method, params, top)
        assert close(ours, theirs, atol=1e-6), method


def test_merged_checkpoint_scores_through_mcl(tmp_path, tiny_llama, jsonl_corpus, capsys):
    """A TIES merge saved by `mcl merge models` loads and scores as a dir: spec like any checkpoint."""
    experts = make_experts(tmp_path, tiny_llama, 2)
    out = tmp_path / "merged"
    argv = ["merge", "models", str(out), "--base", str(tiny_llama), "--experts", *map(str, experts),
            "--method", "ties", "--density", "0.5"]
    assert main(argv) == 0
    card = (out / "mcl-merge.json").read_text()
    assert '"density": 0.5' in card and '"method": "ties"' in card
    assert main(["score", "--model", f"dir:{out}", "--corpus", str(jsonl_corpus), "--id-column", "id",
                 "--min-words", "0", "--out", str(tmp_path / "losses"), "--no-progress"]) == 0
    table, prov = read_loss_table(next((tmp_path / "losses").glob("*.parquet")))
    assert len(table) == 8 and np.isfinite(table["nll_nats"]).all()
    merged = merging.load_state(out)
    expected = Ties(0.5).merge(merging.load_state(tiny_llama), [merging.load_state(e) for e in experts])
    assert close({n: merged[n] for n in expected}, expected)


@pytest.fixture
def tiny_study(tmp_path, monkeypatch):
    """The tiny zoo installed (tests/tiny_zoo.py), expert cards sent to tmp_path, and a small study."""
    from tests import tiny_zoo

    monkeypatch.setattr(merging, "EXPERT_RESULTS", tmp_path / "experts")
    monkeypatch.setitem(merging.FINETUNE, "steps", 20)
    for _ in tiny_zoo.installed(tmp_path, monkeypatch):
        settings = merging.MergingSettings(family="tinyllama", sizes=("s0", "s1"),
                                           domains=("brown-press", "code"), eval_samples=4)
        yield settings, tmp_path / "study"


def test_study_runs_resumes_and_matches_the_scorer(tiny_study):
    """The study fine-tunes, merges and scores every subset; a rerun computes nothing; a deleted part alone
    is recomputed; the base's and each expert's losses equal `mcl score`'s path on the same texts."""
    from mcl_utils import zoo
    from mcl_utils.models import load_model
    from mcl_utils.scoring import score_texts

    settings, out = tiny_study
    messages: list[str] = []
    merging.run_study(settings, out, log=messages.append, progress=False)
    study = merging.load_study(settings, out)
    assert len(study.losses) == 2 * 5 and study.losses[("s1", "ties")][1].shape == (3, 8)
    samples = merging.eval_table(settings)
    base_nll, _ = score_texts(load_model("zoo:tinyllama-s1", device="cpu", dtype="float32"), samples["text"].tolist())
    assert np.allclose(study.losses[("s1", "base")][1][0], base_nll, rtol=1e-6)
    expert = load_model(f"dir:{merging.expert_dir('tinyllama-s1', 'code')}", device="cpu", dtype="float32")
    assert np.allclose(study.experts("s1")[1], score_texts(expert, samples["text"].tolist())[0], rtol=1e-6)
    card = zoo.read_card("tinyllama-s1-code", merging.EXPERT_RESULTS)
    assert card["steps"] == 20 and card["domain"] == "code" and card["recipe"]["base"]["spec"] == "zoo:tinyllama-s1"

    messages.clear()
    merging.run_study(settings, out, log=messages.append, progress=False)
    assert sum(m.startswith("[merge]") and m.endswith("cached") for m in messages) == 10 and any("0 parts to compute" in m for m in messages)
    victim = merging.part_path(out, "s0", "dare")
    before = {p: p.stat().st_mtime_ns for p in out.glob("losses-*.parquet") if p != victim}
    victim.unlink()
    merging.run_study(settings, out, log=lambda _: None, progress=False)
    assert victim.exists() and all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert np.array_equal(merging.load_study(settings, out).losses[("s0", "dare")][1], study.losses[("s0", "dare")][1])


def test_study_analyses(tiny_study):
    """Per-merge tables, curves, ensembles and the gap with its interval are computed from the study's
    losses, and agree with direct computations on them."""
    settings, out = tiny_study
    merging.run_study(settings, out, log=lambda _: None, progress=False)
    study = merging.load_study(settings, out)
    table = merging.merge_table(study)
    assert set(table["method"]) == {"base", *settings.methods} and len(table) == 2 * (1 + 4 * 3)
    masks, nll = study.losses[("s0", "average")]
    row = table[(table["size"] == "s0") & (table["method"] == "average") & (table["subset"] == 3)].iloc[0]
    press = study.samples["domain"].to_numpy() == "brown-press"
    j = list(masks).index(3)
    expected = nll[j, press].sum() / (np.log(2) * study.samples["n_bytes"].to_numpy()[press].sum())
    assert np.isclose(row["brown-press"], expected) and np.isclose(row["in_domain"], row["cross_domain"])
    curve = merging.curves(table)
    assert (curve.groupby(["method", "size"]).size() == 2).all()
    assert curve.loc[curve["k"] == 2, "variance"].eq(0).all()
    ens = merging.ensemble_table(study)
    assert (ens["oracle"] <= ens["mixture"] + 1e-12).all() and (ens["oracle"] <= ens["best_expert"] + 1e-12).all()
    assert np.allclose(ens.loc[ens["k"] == 1, "mixture"], ens.loc[ens["k"] == 1, "average"])
    gap = merging.paired_gap(study, "s1", "ties", "mixture", n_resamples=50)
    assert len(gap) == 2 and (gap["lo"] <= gap["gap_bpb"]).all() and (gap["gap_bpb"] <= gap["hi"]).all()
    same = merging.paired_gap(study, "s1", "ties", "ties", n_resamples=20)
    assert np.allclose(same[["gap_bpb", "lo", "hi", "gap_pct"]], 0)
    weighted = merging.merge_table(study, merging.stratified_weights(study, 3))
    assert weighted["resample"].nunique() == 3 and len(weighted) == 3 * len(table)


def test_k_fraction_and_variance_shapes():
    """k90 reads the monotone envelope; the variance shapes are exact on data built from them."""
    assert merging.k_fraction([1.0, 0.5, 0.2, 0.1, 0.1]) == 4  # k = 3 realizes 0.8 of the 0.9 gain (89%)
    assert merging.k_fraction([1.0, 1.2, 0.95, 0.9], 0.5) == 3 and np.isnan(merging.k_fraction([1.0, 1.1]))
    k = np.arange(1, 6)
    curve = pd.DataFrame({"method": "ties", "size": "s1", "N": 0.1, "k": k,
                          "variance": 0.3 * (6 - k) / (k * 5)})
    row = merging.variance_slopes(curve, 6).iloc[0]
    assert row["rms_log_error_finite_population"] < 1e-12 < row["rms_log_error_inverse_k"] and row["slope"] < -1
    assert row["best_shape"] == "finite_population" and np.isclose(row["drop_1_to_2"], (5 / 5) / (4 / 10))
    squared = merging.variance_slopes(curve.assign(variance=0.3 / k**2), 6).iloc[0]
    assert squared["best_shape"] == "inverse_k_squared" and np.isclose(squared["slope"], -2)


def test_merging_law_refit_recovers_table3(tmp_path):
    """The law fitted to per-(N, k) means simulated from Table 3's code domain (weights proportional to k)
    recovers its parameters; the forecast from k in {1, 2, 3} predicts k = 9 closely."""
    truth = pd.read_csv(Path(__file__).resolve().parent.parent / "data" / "published" /
                        "merging_law_table3_average.csv").set_index("domain").loc["code"]
    params = {p: float(truth[p]) for p in laws.MERGING.param_names}
    grid = pd.DataFrame([(n, k) for n in (0.5, 1.5, 3, 7, 14, 32) for k in range(1, 10)], columns=["N", "k"])
    grid["loss"] = laws.MERGING.predict(params, grid)
    grid["method"], grid["size"] = "average", grid["N"].astype(str)
    fitted = merging.fit_merging_law(grid)
    assert all(np.isclose(fitted.params[p], params[p], rtol=2e-2, atol=2e-3) for p in params)
    pred = merging.forecast(grid)
    assert len(pred) == 6 and pred["relative_error"].abs().max() < 1e-3


def test_expert_fine_tuning_resumes_to_the_same_weights(tiny_study, monkeypatch, tmp_path):
    """An expert stopped mid-run resumes from its checkpoint and ends with the weights of an uninterrupted
    run (in another cache); its card records the base, domain and recipe."""
    from mcl_utils import zoo

    zoo.ensure_trained(["zoo:tinyllama-s0"], device="cpu", progress=False, log=lambda _: None)
    stopped = merging.finetune("tinyllama-s0", "code", progress=False, stop_after=10, checkpoint_every=5,
                               log=lambda _: None)
    assert stopped == {"name": "tinyllama-s0-code", "stopped_at": 10}
    messages: list[str] = []
    resumed = merging.finetune("tinyllama-s0", "code", progress=False, checkpoint_every=5, log=messages.append)
    assert any("resuming at step 10" in m for m in messages)
    run_dir = merging.expert_run_dir("tinyllama-s0", "code")
    shutil.copytree(Path(zoo.weights_dir("tinyllama-s0")).parent, tmp_path / "other" / "zoo" / "runs" /
                    Path(zoo.weights_dir("tinyllama-s0")).parent.name)
    shutil.copytree(zoo.family_tokenizer(zoo.FAMILIES["tinyllama"]).parent,
                    tmp_path / "other" / "zoo" / "tokenizers", dirs_exist_ok=True)
    monkeypatch.setenv("MCL_CACHE", str(tmp_path / "other"))
    straight = merging.finetune("tinyllama-s0", "code", progress=False, log=lambda _: None)
    assert merging.expert_run_dir("tinyllama-s0", "code") != run_dir
    assert straight["weights_sha256"] == resumed["weights_sha256"] and straight["recipe_hash"] == resumed["recipe_hash"]


@pytest.mark.parametrize("argv, message", [
    (["merge", "study", "experiments/zoo.yaml"], "has no merging section"),
    (["merge", "models", "/tmp/never", "--base", "/nonexistent", "--experts", "/nonexistent2"],
     "has no model.safetensors"),
])
def test_merge_command_errors(argv, message, capsys):
    """Bad `mcl merge` input is one line naming the problem and the fix, exit code 2, nothing written."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "fix:" in err and "\n" not in err
    assert not Path("/tmp/never").exists()
