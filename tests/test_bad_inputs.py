"""Bad inputs, tried as a demanding user would, through the `mcl` command line: each one exits with code 2
and one line naming the problem and the fix, with no traceback, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mcl_utils.cli import main
from tests.conftest import TEXTS, build_tokenizer

Build = Callable[[Path, Path], dict]  # (tmp folder, tiny llama checkpoint) -> option changes


def _file(name: str, content: bytes) -> Build:
    """A corpus file with the given bytes."""
    def build(tmp: Path, _: Path) -> dict:
        (tmp / name).write_bytes(content)
        return {"--corpus": str(tmp / name), "--id-column": None}
    return build


def _frame(name: str, frame: pd.DataFrame) -> Build:
    """A parquet corpus holding a data frame."""
    def build(tmp: Path, _: Path) -> dict:
        frame.to_parquet(tmp / name)
        return {"--corpus": str(tmp / name), "--id-column": None}
    return build


def _truncated_parquet(tmp: Path, _: Path) -> dict:
    """A valid parquet corpus cut in half."""
    pd.DataFrame({"text": TEXTS}).to_parquet(tmp / "cut.parquet")
    data = (tmp / "cut.parquet").read_bytes()
    (tmp / "cut.parquet").write_bytes(data[: len(data) // 2])
    return {"--corpus": str(tmp / "cut.parquet"), "--id-column": None}


def _model(edit: Callable[[Path], None]) -> Build:
    """A copy of the tiny Llama checkpoint, damaged by `edit`."""
    def build(tmp: Path, llama: Path) -> dict:
        copy = Path(shutil.copytree(llama, tmp / "model"))
        edit(copy)
        return {"--model": f"dir:{copy}"}
    return build


def _edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite model.safetensors after changing its tensors."""
    from safetensors.torch import load_file, save_file

    def edit(path: Path) -> None:
        tensors = load_file(path / "model.safetensors")
        change(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return edit


def _truncate_weights(path: Path) -> None:
    """Cut the weights file in half."""
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickle_weights(path: Path) -> None:
    """Replace safetensors by a pickle that runs code on load (weights_only loading refuses it)."""
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save({**tensors, "payload": shutil.copy}, path / "pytorch_model.bin")


def _bert(head: str) -> Build:
    """A tiny BERT encoder checkpoint, as a masked LM or as an LM head model left bidirectional."""
    def build(tmp: Path, _: Path) -> dict:
        import transformers
        from transformers import AutoTokenizer, BertConfig

        out = tmp / "bert"
        build_tokenizer(out, with_bos=True)
        config = BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(out)), hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
        getattr(transformers, head)(config).save_pretrained(out)
        return {"--model": f"dir:{out}"}
    return build


def _out(kind: str) -> Build:
    """An --out that is a file, lies under a file, or cannot be written."""
    def build(tmp: Path, _: Path) -> dict:
        (tmp / "a-file").write_text("not a folder")
        where = {"file": tmp / "a-file", "under": tmp / "a-file" / "losses", "unwritable": Path("/sys/mcl-out")}
        return {"--out": str(where[kind])}
    return build


def _options(changes: dict) -> Build:
    """Plain option changes."""
    return lambda tmp, llama: changes


CUDA = torch.cuda.is_available()
SCORE_CASES = [
    ("max-length -1", _options({"--max-length": "-1"}), "max_length must be a positive number of tokens"),
    ("max-length 0", _options({"--max-length": "0"}), "max_length must be a positive number of tokens"),
    ("batch-tokens 0", _options({"--batch-tokens": "0"}), "batch_tokens must be a positive number of tokens"),
    ("batch-tokens -5", _options({"--batch-tokens": "-5"}), "batch_tokens must be a positive number of tokens"),
    ("n-samples -1", _options({"--n-samples": "-1"}), "n_samples must be a positive number"),
    ("seed -1", _options({"--seed": "-1"}), "seed must be zero or more"),
    ("min-words -3", _options({"--min-words": "-3"}), "min_words must be zero or more"),
    ("device gpu0", _options({"--device": "gpu0"}), "unknown device 'gpu0'"),
    ("device meta", _options({"--device": "meta"}), "unknown device 'meta'"),
    pytest.param("device cuda without CUDA", _options({"--device": "cuda"}), "torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA"), id="device cuda without CUDA"),
    pytest.param("device cuda:3 without CUDA", _options({"--device": "cuda:3"}), "torch sees no CUDA GPU",
                 marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA"), id="device cuda:3 without CUDA"),
    ("dtype float64", _options({"--dtype": "float64"}), "unknown dtype 'float64'"),
    ("corrupt parquet", _file("bad.parquet", b"PAR1 this is not parquet PAR1"), "is not a readable parquet file"),
    ("truncated parquet", _truncated_parquet, "is not a readable parquet file"),
    ("malformed jsonl", _file("bad.jsonl", b'{"text": "fine"}\n{"text": oops\n'), "is not UTF-8 JSON lines"),
    ("non-UTF-8 jsonl", _file("latin1.jsonl", '{"text": "café au lait"}\n'.encode("latin-1")),
     "is not UTF-8 JSON lines"),
    ("non-UTF-8 txt", _file("latin1.txt", "Un café.\n\nDeux cafés.\n".encode("latin-1")), "is not UTF-8 text"),
    ("empty txt", _file("empty.txt", b""), "is empty"),
    ("empty jsonl", _file("empty.jsonl", b""), "is empty"),
    ("blank txt", _file("blank.txt", b"\n\n   \n\t\n"), "has no non-empty samples"),
    ("all-null text column", _frame("null.parquet", pd.DataFrame({"text": [None, None]}, dtype=object)),
     "has no non-empty samples"),
    ("numeric text column", _frame("numbers.parquet", pd.DataFrame({"text": [1.5, 2.5]})),
     "holds float64 values such as '1.5'"),
    ("missing text column", _frame("other.parquet", pd.DataFrame({"body": TEXTS})), "has no text column 'text'"),
    ("unknown corpus type", _file("texts.csv", b"text\nhello\n"), "has unknown type '.csv'"),
    ("corpus is a folder", lambda tmp, _: {"--corpus": str(tmp)}, "nor an existing file"),
    ("out is a file", _out("file"), "is a file"),
    ("out under a file", _out("under"), "is under the file"),
    ("out unwritable", _out("unwritable"), "is not writable"),
    ("truncated safetensors", _model(_truncate_weights), "cannot load dir:"),
    ("corrupt safetensors", _model(lambda p: (p / "model.safetensors").write_bytes(b"\x08" + b"\0" * 300)),
     "cannot load dir:"),
    ("missing LM head", _model(_edit_weights(lambda t: t.pop("lm_head.weight"))),
     "1 missing (e.g. lm_head.weight)"),
    ("unexpected weight", _model(_edit_weights(lambda t: t.update(extra=torch.zeros(3)))),
     "1 unexpected (e.g. extra)"),
    ("mis-shaped weight", _model(_edit_weights(lambda t: t.update({"lm_head.weight": torch.zeros(7, 32)}))),
     "cannot load dir:"),
    ("pickle checkpoint", _model(_pickle_weights), "cannot load dir:"),
    ("corrupt config.json", _model(lambda p: (p / "config.json").write_text("{not json")), "cannot load dir:"),
    ("no tokenizer", _model(lambda p: (p / "tokenizer.json").unlink()), "cannot load dir:"),
    ("BERT masked LM", _bert("BertForMaskedLM"), "not a causal language model"),
    ("BERT LM head, bidirectional", _bert("BertLMHeadModel"), "is not causal"),
    ("unknown spec", _options({"--model": "llama"}), "unknown model spec 'llama'"),
    ("dir without checkpoint", lambda tmp, _: {"--model": f"dir:{tmp}"}, "no config.json"),
]


def _argv(tmp: Path, llama: Path, corpus: Path, changes: dict) -> list[str]:
    """`mcl score` on the tiny Llama and the test corpus, with option changes (None drops an option)."""
    options = {"--model": f"dir:{llama}", "--corpus": str(corpus), "--id-column": "id", "--min-words": "0",
               "--out": str(tmp / "out"), "--device": "cpu", **changes}
    return ["score", *[x for k, v in options.items() if v is not None for x in (k, v)], "--no-progress"]


def _files(root: Path) -> set[str]:
    """Every path under a folder, except the lock and model caches (which are not the user's)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if "cache" not in p.relative_to(root).parts}


def _assert_one_line_error(capfd, argv: list[str], message: str) -> str:
    """Run the CLI: exit code 2, and stderr's message is one line with the problem and the fix."""
    assert main(argv) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("mcl: error:")]
    assert len(errors) == 1, err[-3000:]
    assert message in errors[0] and "fix:" in errors[0], errors[0]
    assert "Traceback" not in err and "LOAD REPORT" not in err, err[-3000:]
    assert err.rstrip("\n").splitlines()[-1] == errors[0]
    return errors[0]


@pytest.mark.parametrize("name,build,message", [pytest.param(*c, id=c[0]) if type(c) is tuple else c
                                                for c in SCORE_CASES])
def test_bad_score_input(name, build, message, tmp_path, tiny_llama, jsonl_corpus, capfd, monkeypatch):
    """`mcl score` with one bad input: exit 2, one line, nothing written (no out folder, no temp file)."""
    monkeypatch.setenv("MCL_CACHE", str(tmp_path / "cache"))
    changes = build(tmp_path, tiny_llama)
    before = _files(tmp_path)
    _assert_one_line_error(capfd, _argv(tmp_path, tiny_llama, jsonl_corpus, changes), message)
    assert _files(tmp_path) == before


EXPERIMENT_CASES = [
    ("n_samples -5", lambda d: d["corpus"].update(n_samples=-5), "corpus: corpus n_samples must be"),
    ("n_samples ten", lambda d: d["corpus"].update(n_samples="ten"), "corpus n_samples must be"),
    ("seed text", lambda d: d["corpus"].update(seed="x"), "corpus seed must be"),
    ("min_words float", lambda d: d["corpus"].update(min_words=2.5), "corpus min_words must be"),
    ("source number", lambda d: d["corpus"].update(source=7), "corpus source must be"),
    ("max_length -1", lambda d: d["scoring"].update(max_length=-1), "scoring: max_length must be a positive"),
    ("batch_tokens text", lambda d: d["scoring"].update(batch_tokens="many"), "batch_tokens must be a positive"),
    ("device gpu0", lambda d: d["scoring"].update(device="gpu0"), "unknown device 'gpu0'"),
    ("dtype double", lambda d: d["scoring"].update(dtype="double"), "unknown dtype 'double'"),
    ("dir:x and dir:x/", lambda d: d.update(models=["dir:x", "dir:x/"]), "a model is listed twice"),
    ("dir:x and dir:./x", lambda d: d.update(models=["dir:x", "dir:./x"]), "a model is listed twice"),
]


@pytest.mark.parametrize("name,edit,message", EXPERIMENT_CASES, ids=[c[0] for c in EXPERIMENT_CASES])
def test_bad_experiment_input(name, edit, message, tmp_path, capfd):
    """`mcl run` on an experiment file with one bad value: exit 2, one line naming the file, nothing run."""
    data = {"name": "bad", "models": ["dir:x"], "corpus": {"source": "brown"}, "scoring": {"device": "cpu"}}
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    before = _files(tmp_path)
    assert str(path) in _assert_one_line_error(capfd, ["run", str(path)], message)
    assert _files(tmp_path) == before


def test_non_utf8_experiment_file(tmp_path, capfd):
    """An experiment file that is not UTF-8 is a one-line error, not a UnicodeDecodeError."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\nmodels: [dir:x]\n".encode("latin-1"))
    _assert_one_line_error(capfd, ["run", str(path)], "is not UTF-8 text")


def test_dropped_samples_are_reported(tmp_path, tiny_llama, capfd, monkeypatch):
    """Empty samples and (with --min-words) short ones are left out, and the CLI says how many."""
    monkeypatch.setenv("MCL_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS + ["", "   "]) + "\n")
    argv = _argv(tmp_path, tiny_llama, corpus, {"--id-column": None, "--min-words": "5"})
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "7 samples scored; left out 2 empty, 1 under 5 words" in err


def test_own_file_keeps_short_samples_by_default(tmp_path):
    """The 50-word minimum is Brown's default; a user's own file keeps every non-empty sample."""
    from mcl_utils.corpus import CorpusSpec, load_corpus

    path = tmp_path / "short.txt"
    path.write_text("One short paragraph.\n\nAnother one.\n")
    assert len(load_corpus(CorpusSpec(source=str(path), n_samples=None)).samples) == 2
    assert CorpusSpec().min_words_used == 50
