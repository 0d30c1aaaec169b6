"""The `mcl` command line: help, one-line errors, scoring and caching."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcl_utils.cli import main
from mcl_utils.store import read_loss_table


def test_help_explains_specs_and_corpora(capsys):
    """`mcl score --help` lists every model spec form, the corpora, the output and an example."""
    with pytest.raises(SystemExit) as info:
        main(["score", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for needle in ("gguf:smollm2-135m-instruct", "hf:<repo_id>", "dir:<path>", "brown", ".jsonl", "nll_nats",
                   "resumes", "example:"):
        assert needle in out


@pytest.mark.parametrize("argv,message", [
    (["score", "--model", "nonsense"], "unknown model spec 'nonsense'"),
    (["score", "--model", "dir:/nonexistent"], "no config.json"),
    (["score", "--model", "gguf:gemma-3-270m", "--corpus", "missing.jsonl"], "neither 'brown'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    """Bad input prints one line naming problem and fix, exits 2 and writes nothing."""
    assert main(argv + ["--out", "/nonexistent/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "fix:" in err and "\n" not in err
    assert not Path("/nonexistent/out").exists()


def test_score_then_cached(tmp_path, tiny_llama, tiny_gpt2, jsonl_corpus, capsys):
    """Two models score into two tables; running again reuses both without touching them."""
    argv = ["score", "--model", f"dir:{tiny_llama}", "--model", f"dir:{tiny_gpt2}", "--corpus",
            str(jsonl_corpus), "--id-column", "id", "--min-words", "0", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    tables = sorted(tmp_path.glob("*.parquet"))
    assert len(tables) == 2 and first.count("tokens/s") == 2
    mtimes = [p.stat().st_mtime_ns for p in tables]
    table, prov = read_loss_table(tables[0])
    assert len(table) == 8 and prov["corpus"]["n_samples"] == 8
    assert main(argv) == 0
    assert capsys.readouterr().out.count("(cached)") == 2
    assert [p.stat().st_mtime_ns for p in tables] == mtimes
