"""The offline-model cache is verified, not trusted: a manifest of the dequantized checkpoint's files is
checked before use (once per process while sizes and mtimes hold), and damage rebuilds it from the verified
GGUF; a damaged GGUF concatenation is rebuilt; temporary folders of killed writers are removed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mcl_utils import models
from mcl_utils.errors import UserError
from tests.conftest import FAKE_GGUF_BYTES

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def dequantize_log(monkeypatch, tiny_llama, fake_gguf):
    """Replace the transformers dequantization of gguf:fake by a copy of the tiny Llama; log each call."""
    calls: list[Path] = []

    def fake(src: Path, out_dir: Path) -> None:
        assert src.read_bytes() == FAKE_GGUF_BYTES  # only ever from the verified GGUF
        calls.append(out_dir)
        shutil.copytree(tiny_llama, out_dir)

    monkeypatch.setattr(models, "_dequantize", fake)
    return calls


def _flip_last_byte(path: Path) -> None:
    """Flip one bit of a file, keeping its size."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [
    lambda d: _flip_last_byte(d / "model.safetensors"),
    lambda d: (d / "tokenizer.json").write_text("{}"),
    lambda d: (d / "tokenizer.json").unlink(),
    lambda d: (d / "extra.bin").write_bytes(b"planted"),
    lambda d: (d / models.MANIFEST).unlink(),
    lambda d: (d / models.MANIFEST).write_text("{not json"),
], ids=["weight bit flip", "tokenizer damaged", "tokenizer deleted", "file added", "manifest deleted",
        "manifest damaged"])
def test_damaged_checkpoint_is_rebuilt(dequantize_log, tiny_llama, damage):
    """Any change to the dequantized checkpoint is caught before use and rebuilt from the GGUF."""
    folder = models.dequantized_checkpoint("fake")
    original = (folder / "model.safetensors").read_bytes()
    damage(folder)
    assert models.dequantized_checkpoint("fake") == folder and len(dequantize_log) == 2
    assert (folder / "model.safetensors").read_bytes() == original
    assert not (folder / "extra.bin").exists() and (folder / "tokenizer.json").read_bytes() == (
        tiny_llama / "tokenizer.json").read_bytes()


def test_verification_is_memoized_on_size_and_mtime(dequantize_log, monkeypatch):
    """After one verified use, another in the same process hashes nothing; a file whose mtime changed is
    hashed again (and only that file)."""
    folder = models.dequantized_checkpoint("fake")
    models.dequantized_checkpoint("fake")
    hashed: list[Path] = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p, *a: hashed.append(p) or real(p, *a))
    models.dequantized_checkpoint("fake")
    assert hashed == []
    os.utime(folder / "config.json", ns=(1, 1))
    models.dequantized_checkpoint("fake")
    assert [p.name for p in hashed] == ["config.json"] and len(dequantize_log) == 1


KILLED_DEQUANTIZER = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from mcl_utils import models
    from tests.conftest import register_fake
    register_fake(Path(sys.argv[1]))
    def dies_half_way(src, out_dir):
        out_dir.mkdir()
        (out_dir / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    models._dequantize = dies_half_way
    models.dequantized_checkpoint("fake")
""")


def test_killed_dequantization_leaves_nothing_after_the_next_start(dequantize_log, fake_gguf):
    """A dequantization killed mid-write leaves a temporary folder; the next use removes it and builds."""
    killed = subprocess.run([sys.executable, "-c", KILLED_DEQUANTIZER, str(fake_gguf)], cwd=REPO,
                            env=os.environ.copy(), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    parent = models.cache_root() / "dequantized"
    assert [p.name for p in parent.iterdir() if ".tmp-" in p.name]
    folder = models.dequantized_checkpoint("fake")
    assert [p.name for p in parent.iterdir()] == [folder.name] and len(dequantize_log) == 1


def test_damaged_gguf_concatenation_is_rebuilt(fake_gguf):
    """The cached concatenation of a multi-part GGUF that no longer matches its pin is rebuilt from the
    package's parts (a rerun fixes it, no reinstall needed)."""
    path = models.gguf_file("fake")
    _flip_last_byte(path)
    assert models.gguf_file("fake") == path and path.read_bytes() == FAKE_GGUF_BYTES


def test_damaged_package_part_says_reinstall(fake_gguf):
    """When the package's own parts are damaged, re-concatenating cannot help: the error says reinstall."""
    _flip_last_byte(fake_gguf / "fake_gguf_parts" / "b.part")
    with pytest.raises(UserError, match="installed package is damaged; fix: reinstall"):
        models.gguf_file("fake")
    assert not list((models.cache_root() / "gguf").glob("*.gguf*"))


def test_dir_spec_is_normalized():
    """dir:x, dir:x/ and dir:./x are one model."""
    assert {models.parse_spec(s).name for s in ("dir:x", "dir:x/", "dir:./x", "dir:x//")} == {"dir:x"}
