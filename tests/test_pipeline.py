"""`mcl run`: experiment files, papermill stages, caching, and errors that name the notebook and cell."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from mcl_utils.errors import UserError
from mcl_utils.models import parse_spec
from mcl_utils.pipeline import execute, execution_report, load_experiment, run
from tests.conftest import TEXTS, build_tiny_model


def _experiment(tmp_path: Path, models: list[str], name: str = "tiny") -> Path:
    """An experiment file over a small genre-labelled corpus."""
    corpus = tmp_path / "corpus.parquet"
    pd.DataFrame({"text": TEXTS * 2, "genre": ["news", "fiction"] * len(TEXTS)}).to_parquet(corpus)
    spec = {"name": name, "description": "tiny random models", "models": models,
            "corpus": {"source": str(corpus), "n_samples": None, "min_words": 0},
            "scoring": {"device": "cpu", "dtype": "float32", "max_length": 32}, "bootstrap_resamples": 20}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(path: Path, tmp_path: Path) -> list[str]:
    """Run the pipeline into tmp_path, returning its progress lines."""
    lines: list[str] = []
    exp = load_experiment(path, results_dir=tmp_path / "results", generated_dir=tmp_path / "generated")
    run(exp, log=lines.append)
    return lines


def test_run_scores_analyses_and_then_caches(tmp_path, tiny_llama, tiny_gpt2):
    """First run executes every stage; a second run executes nothing; adding a model scores only it."""
    path = _experiment(tmp_path, [f"dir:{tiny_llama}", f"dir:{tiny_gpt2}"])
    first = _run(path, tmp_path)
    assert sum("scored" in line for line in first) == 2
    assert {line.split("]")[0] for line in first[2:4]} == {"[oracle", "[laws"}  # side by side: either may end first
    assert all("executed" in line for line in first[2:4])
    book = tmp_path / "generated" / "tiny"
    assert {p.name for p in book.glob("*.ipynb")} == {"score-llama0.ipynb", "score-gpt20.ipynb", "oracle.ipynb",
                                                     "laws.ipynb", "status.ipynb"}
    oracle_nb = nbformat.read(book / "oracle.ipynb", as_version=4)
    assert any("remove-input" in c.metadata.get("tags", []) for c in oracle_nb.cells
               if "injected-parameters" in c.metadata.get("tags", []))
    assert len(pd.read_parquet(tmp_path / "results" / "tiny" / "oracle.parquet")) == 3
    fits = json.loads((tmp_path / "results" / "tiny" / "fits.json").read_text())
    assert not fits["laws"]["single models"]["fitted"]
    assert "needs at least 4 points, got 2" in fits["laws"]["single models"]["reason"]
    report = execution_report(book)
    assert set(report["notebook"]) == {"score-llama0.ipynb", "score-gpt20.ipynb", "oracle.ipynb", "laws.ipynb"}
    assert (report["seconds"] > 0).all()
    assert _run(path, tmp_path) == [f"[score]  dir:{tiny_llama}: cached (" + next(
        (tmp_path / "results" / "losses").glob("llama0--*.parquet")).name + ")",
        f"[score]  dir:{tiny_gpt2}: cached (" + next((tmp_path / "results" / "losses").glob("gpt20--*")).name + ")",
        "[oracle]  cached", "[laws]  cached", "[status] cached"]
    third = build_tiny_model(tmp_path / "llama-b", "llama", seed=1)
    added = _run(_experiment(tmp_path, [f"dir:{tiny_llama}", f"dir:{tiny_gpt2}", f"dir:{third}"]), tmp_path)
    assert added[0].startswith(f"[score]  dir:{tiny_llama}: cached")
    assert added[1].startswith(f"[score]  dir:{tiny_gpt2}: cached")
    assert added[2].startswith(f"[score]  dir:{third}: scored")
    assert {line.split("]")[0] for line in added[3:5]} == {"[oracle", "[laws"}
    assert all("executed" in line for line in added[3:5])


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(colour="red"), "unknown key"),
    (lambda d: d.update(models=[]), "non-empty list"),
    (lambda d: d.update(models=["nonsense"]), "unknown model spec"),
    (lambda d: d["corpus"].update(sample=3), "unknown corpus setting"),
    (lambda d: d["scoring"].update(gpu=True), "unknown scoring setting"),
    (lambda d: d.update(name="has space"), "simple identifier"),
    (lambda d: d.update(analyses=["telepathy"]), "unknown analyses"),
    (lambda d: d.update(bootstrap_resamples=0), "positive integer"),
    (lambda d: d["scoring"].update(gpus_per_model=0), "gpus_per_model must be a positive integer"),
    (lambda d: d["scoring"].update(gpus_per_model={"dir:y": 2}), r"gpus_per_model names \['dir:y'\], which are not"),
    (lambda d: d.update(prefix_fraction=1.5), "prefix_fraction must be a number between 0 and 1"),
    (lambda d: d.update(analyses=["realizable"]), "realizable analysis needs each sample's head scored"),
    (lambda d: d.update(analyses=["merging_law"]), r"read a merging study; fix: add a merging: section"),
    (lambda d: d.update(merging={"family": "llama", "domains": ["sotu", "poetry"]}), "at least 2 distinct known"),
    (lambda d: d.update(merging={"sizes": ["s1"], "experts": 3}), r"unknown merging setting\(s\) \['experts'\]"),
])
def test_bad_experiments_are_one_line_errors(tmp_path, edit, message):
    """Each mistake in an experiment file names the problem and the fix."""
    path = _experiment(tmp_path, ["dir:x"])
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=message) as info:
        load_experiment(path)
    assert "fix:" in str(info.value) and "\n" not in str(info.value)


def test_default_experiment_is_valid():
    """The committed default experiment loads: two offline models on the Brown sample."""
    exp = load_experiment(Path(__file__).resolve().parent.parent / "experiments" / "offline-llms.yaml")
    assert exp.models == ("gguf:smollm2-135m-instruct", "gguf:gemma-3-270m") and exp.corpus.n_samples == 2000


def test_merging_experiments_are_valid():
    """The merging study (5 sizes spanning a decade of non-embedding parameters, 6 domains) and its
    classroom tier (2 sizes, 4 domains) load, their bases are the experiments' zoo models."""
    from mcl_utils import zoo

    root = Path(__file__).resolve().parent.parent / "experiments"
    study, classroom = (load_experiment(root / f) for f in ("merging.yaml", "merging-classroom.yaml"))
    for exp, n_sizes, n_domains in ((study, 5, 6), (classroom, 2, 4)):
        assert len(exp.merging.sizes) == n_sizes and len(exp.merging.domains) == n_domains
        assert {f"zoo:{b}" for b in exp.merging.bases} == set(exp.models)
    params = [zoo.count_model(zoo.parse_name(b))[1] for b in study.merging.bases]
    assert max(params) / min(params) >= 10


# Hub families of the paper-scale experiments and their transformers architectures (model_type); a
# model outside these families fails the test until its architecture is checked and added here.
PAPER_FAMILIES = {"Qwen/Qwen2.5-": "qwen2", "EleutherAI/pythia-": "gpt_neox", "meta-llama/Llama-3.": "llama",
                  "google/gemma-2-": "gemma2", "HuggingFaceTB/SmolLM2-": "llama", "allenai/OLMo-2-": "olmo2"}
UNPINNED = {"hf:allenai/OLMo-2-0325-32B"}  # no public source of its commit: resolved and recorded at scoring


def test_paper_scale_experiments_are_valid(tmp_path):
    """Both paper-scale files load; every model is a Hub id of a family transformers implements natively
    (no remote code), pinned to a commit or a Pythia checkpoint branch, the same models in both files."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    root = Path(__file__).resolve().parent.parent / "experiments"
    brown, wikitext = (load_experiment(root / f, results_dir=tmp_path) for f in
                       ("paper-scale.yaml", "paper-scale-wikitext.yaml"))
    assert brown.models == wikitext.models and brown.scoring == wikitext.scoring
    assert brown.corpus.source == "brown" and wikitext.corpus.source == "hf:Salesforce/wikitext:wikitext-103-raw-v1"
    assert brown.scoring.dtype == "bfloat16"  # explicit: cache keys must not depend on the head node's hardware
    per_family = dict.fromkeys(PAPER_FAMILIES, 0)
    for spec in brown.models:
        parsed = parse_spec(spec)
        assert parsed.scheme == "hf" and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", parsed.target), spec
        (family,) = [f for f in PAPER_FAMILIES if parsed.target.startswith(f)]
        per_family[family] += 1
        if parsed.target.startswith("EleutherAI/pythia-"):
            assert parsed.revision == "step143000", spec
        elif spec not in UNPINNED:
            assert re.fullmatch(r"[0-9a-f]{40}", parsed.revision or ""), spec
        assert brown.scoring.gpus_for(spec) == (2 if re.search(r"-7[02]B$", parsed.target) else 1), spec
    assert min(per_family.values()) >= 3 and set(PAPER_FAMILIES.values()) <= set(CONFIG_MAPPING_NAMES)
    assert UNPINNED <= set(brown.models)


def _notebook(path: Path, *sources: str) -> Path:
    """A notebook with a parameters cell and the given code cells."""
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params] + [nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_unknown_notebook_parameter_is_an_error(tmp_path):
    """Passing a parameter the notebook does not declare is refused before anything runs."""
    nb = _notebook(tmp_path / "n.ipynb", "print(x)")
    with pytest.raises(UserError, match=r"has no parameter\(s\) \['y'\].*use \['x'\]"):
        execute(nb, tmp_path / "out" / "n.ipynb", {"y": 2})
    assert not (tmp_path / "out").exists()


def test_failing_notebook_names_notebook_and_cell(tmp_path):
    """A failing cell stops the run with the notebook, the cell and the error; no output is published."""
    nb = _notebook(tmp_path / "boom.ipynb", "y = x + 1", "raise ValueError('bad data')")
    # Cell 4 as numbered in the executed copy: parameters, papermill's injected parameters, y = ..., raise.
    with pytest.raises(UserError, match=r"notebook boom.ipynb failed in cell 4 \(ValueError: bad data\)"):
        execute(nb, tmp_path / "out" / "boom.ipynb", {"x": 2})
    assert not (tmp_path / "out" / "boom.ipynb").exists()
    assert (tmp_path / "out" / "boom.failed.ipynb").exists()
    shutil.rmtree(tmp_path / "out")
