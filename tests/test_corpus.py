"""The Brown corpus, its splits, the evaluation sample and alternative corpora."""

from __future__ import annotations

import pandas as pd
import pytest

from mcl_utils.corpus import (BROWN_GENRES, CorpusSpec, build_domain, load_brown, load_corpus, load_domain,
                               pack_passages, parse_brown_file, table_fingerprint, training_documents)
from mcl_utils.errors import UserError


def test_brown_parquet_is_complete():
    """All 500 texts in 15 genres, about 15.6k paragraphs, none empty."""
    df = load_brown()
    assert df["source_file"].nunique() == 500
    assert set(df["genre"]) == set(BROWN_GENRES.values())
    assert 15_000 < len(df) < 16_500
    assert (df["text"].str.len() > 0).all() and df["doc_id"].is_unique


def test_parse_strips_tags_headlines_and_doubled_marks():
    """Tags go, headlines go, quotes become plain quotes, doubled marks collapse, paragraphs split."""
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ?/. ?/.\n\n\n"
           "Merger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, it/pps won/vbd ./.\n")
    assert parse_brown_file(raw) == ['The jury said "no"?', "However, it won."]


def test_splits_are_disjoint_by_source_file_within_each_genre():
    """Every source file sits in exactly one split, and every genre has files in every split."""
    df = load_brown()
    assert (df.groupby("source_file")["split"].nunique() == 1).all()
    assert (df.groupby("genre")["split"].nunique() == 3).all()


def test_default_evaluation_sample():
    """2,000 test paragraphs of 50+ words, genre-proportional, the same on every call."""
    corpus = load_corpus()
    df = corpus.samples
    assert len(df) == 2000 and (df["split"] == "test").all()
    assert (df["text"].str.split().str.len() >= 50).all()
    eligible = load_brown().query("split == 'test' and n_words >= 50")
    expected = eligible["genre"].value_counts(normalize=True) * 2000
    got = df["genre"].value_counts().reindex(expected.index)
    assert ((got - expected).abs() <= 1).all()
    assert load_corpus().fingerprint == corpus.fingerprint
    assert load_corpus(CorpusSpec(seed=1)).fingerprint != corpus.fingerprint


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".txt"])
def test_local_files(tmp_path, suffix):
    """parquet, jsonl and txt (paragraphs separated by blank lines) all load the same texts."""
    texts = ["first paragraph here", "second one,\nover two lines", "third"]
    path = tmp_path / f"c{suffix}"
    if suffix == ".parquet":
        pd.DataFrame({"text": texts}).to_parquet(path)
    elif suffix == ".jsonl":
        pd.DataFrame({"text": texts}).to_json(path, orient="records", lines=True)
    else:
        path.write_text("\n\n".join(texts) + "\n")
    corpus = load_corpus(CorpusSpec(source=str(path), n_samples=None, min_words=0))
    assert corpus.samples["text"].tolist() == texts
    assert corpus.samples["sample_id"].tolist() == ["c-000000", "c-000001", "c-000002"]


def test_fingerprint_follows_content(tmp_path):
    """Changing one character of one sample changes the fingerprint."""
    path = tmp_path / "c.jsonl"
    fingerprints = []
    for last in ("a", "b"):
        pd.DataFrame({"text": ["one", "two " + last]}).to_json(path, orient="records", lines=True)
        fingerprints.append(load_corpus(CorpusSpec(source=str(path), n_samples=None, min_words=0)).fingerprint)
    assert fingerprints[0] != fingerprints[1]


@pytest.mark.parametrize("case,message", [
    ("missing", "neither 'brown'"),
    ("no_column", "no text column 'text'"),
    ("empty", "no non-empty samples"),
    ("dup_ids", "repeats sample id"),
    ("bad_type", "unknown type"),
])
def test_bad_corpora_give_one_line_errors(tmp_path, case, message):
    """Each bad corpus names the problem and the fix, in one line."""
    path = tmp_path / ("c.csv" if case == "bad_type" else "c.jsonl")
    frames = {"no_column": pd.DataFrame({"body": ["x"]}), "empty": pd.DataFrame({"text": ["", "  "]}),
              "dup_ids": pd.DataFrame({"id": ["a", "a"], "text": ["x", "y"]}),
              "bad_type": pd.DataFrame({"text": ["x"]})}
    if case in frames:
        frames[case].to_json(path, orient="records", lines=True)
    spec = CorpusSpec(source=str(path), n_samples=None, min_words=0, id_column="id" if case == "dup_ids" else None)
    with pytest.raises(UserError, match=message) as info:
        load_corpus(spec)
    assert "fix:" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name, n_docs, fingerprint", [
    ("sotu", 233, "eb2a46c4bb00e5844bb6faeb721f1e6b5f82b1b6ae47a3b90bb2bc4bfb1f1bbd"),
    ("code", 542, "ee786db5cb670de7634b4ba28c4ca0ef62677033c4326748a40a891888fe8d0e"),
])
def test_training_domains_are_complete_split_by_document_and_fingerprinted(name, n_docs, fingerprint):
    """Every document in one split, all three splits used, content as its README records."""
    df = load_domain(name)
    assert df["source_file"].nunique() == n_docs and df["doc_id"].is_unique
    assert (df.groupby("source_file")["split"].nunique() == 1).all()
    assert set(df["split"]) == {"train", "validation", "test"}
    assert table_fingerprint(df) == fingerprint
    train = training_documents(name)
    assert set(train["doc_id"]) == set(df.loc[df["split"] == "train", "doc_id"])


def test_domains_load_as_corpora():
    """`--corpus sotu` and `--corpus code` select test passages like Brown's paragraphs."""
    for name in ("sotu", "code"):
        corpus = load_corpus(CorpusSpec(source=name, n_samples=50))
        assert corpus.name == name and len(corpus.samples) == 50
        assert (corpus.samples["split"] == "test").all()


def test_passages_keep_code_indentation():
    """Packing joins whole units and keeps the indentation of code blocks."""
    assert pack_passages(["a b", "c", "d e f"], " ", min_words=3) == ["a b c", "d e f"]
    df = build_domain("code", {"m.py": "def f():\n    x = 1\n\n    return x\n"})
    assert df["text"].tolist() == ["def f():\n    x = 1\n\n    return x"]


def test_heads_are_prefixes_with_their_own_fingerprint():
    """prefix_fraction keeps each sample's head as its text and the whole text beside it; the corpus of
    heads has its own fingerprint, and the same sample ids."""
    whole = load_corpus(CorpusSpec(n_samples=20))
    heads = load_corpus(CorpusSpec(n_samples=20, prefix_fraction=0.5))
    assert list(heads.samples["sample_id"]) == list(whole.samples["sample_id"])
    assert list(heads.samples["full_text"]) == list(whole.samples["text"])
    assert all(t.startswith(h) and len(h) < len(t) for h, t in zip(heads.samples["text"], whole.samples["text"]))
    assert heads.fingerprint != whole.fingerprint
    with pytest.raises(UserError, match="prefix_fraction must be a number between 0 and 1"):
        CorpusSpec(prefix_fraction=0)
