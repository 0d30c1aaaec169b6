"""Model merging: the four operators on state dicts (Average, Task Arithmetic, TIES, DARE), domain experts
fine-tuned from zoo bases, the merging study (every subset of the experts merged with every operator and
scored on every domain's test text), and its analyses (the merging law, the spread across subsets, k90,
the three-point forecast, merging against ensembles of the same experts)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import math
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mcl_utils import laws, zoo
from mcl_utils.corpus import BROWN_MIN_WORDS, domain_documents, domain_names, table_fingerprint
from mcl_utils.errors import UserError
from mcl_utils.models import cache_root, sha256_file
from mcl_utils.store import atomic_path, canonical_json, file_lock, strict_json

# Bump when a change to this module can change an expert's weights or a merge's losses: the study reruns.
MERGING_VERSION = "1"
StateDict = dict[str, torch.Tensor]

# ---------------------------------------------------------------- operators


def _check_experts(base: StateDict, experts: Sequence[StateDict]) -> None:
    """Refuse an empty expert list, or experts whose tensors differ from the base's in name or shape."""
    if not experts:
        raise UserError("nothing to merge: no experts given; fix: pass at least one expert")
    for i, expert in enumerate(experts):
        if expert.keys() != base.keys():
            diff = sorted(set(expert) ^ set(base))[:3]
            raise UserError(f"expert {i} has other tensors than the base (e.g. {diff}); fix: merge experts "
                            "fine-tuned from this base")
        bad = next((n for n in base if expert[n].shape != base[n].shape), None)
        if bad is not None:
            raise UserError(f"expert {i}: tensor {bad} has shape {tuple(expert[bad].shape)}, the base "
                            f"{tuple(base[bad].shape)}; fix: merge experts fine-tuned from this base")


TaskVectors = dict[str, torch.Tensor]  # tensor name -> the experts' task vectors, stacked: (k, *shape), float32


def task_vectors(base: StateDict, experts: Sequence[StateDict]) -> TaskVectors:
    """The experts' task vectors theta_i - theta_0, per tensor stacked along a new first axis, in float32."""
    _check_experts(base, experts)
    return {n: torch.stack([e[n].float() for e in experts]) - base[n].float() for n in base}


def select(vectors: TaskVectors, indices: Sequence[int]) -> TaskVectors:
    """The task vectors of some of the experts (a subset, by position)."""
    idx = torch.as_tensor(list(indices))
    return {n: v.index_select(0, idx) for n, v in vectors.items()}


def trim(vectors: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each task vector's largest-magnitude entries (max(1, int(density * n)) of n; mergekit's count),
    zero the rest."""
    if density >= 1:
        return vectors
    flat = vectors.reshape(len(vectors), -1)
    keep = max(1, int(density * flat.shape[1]))
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.abs().topk(keep, dim=1).indices, True)
    return (flat * mask).reshape(vectors.shape)


class _Operator:
    """A merge in two steps: `prepare` turns each expert into the task vector the operator uses (the same
    whatever subset the expert is merged in, so a study prepares each expert once), `combine` merges the
    prepared vectors of one subset into the base."""

    def prepare(self, base: StateDict, experts: Sequence[StateDict]) -> TaskVectors:
        """The experts' task vectors as this operator uses them (plain differences unless it says otherwise)."""
        return task_vectors(base, experts)

    def combine(self, base: StateDict, vectors: TaskVectors) -> StateDict:
        """The merged state dict from prepared task vectors."""
        raise NotImplementedError

    def merge(self, base: StateDict, experts: Sequence[StateDict]) -> StateDict:
        """The merged state dict."""
        return self.combine(base, self.prepare(base, experts))


@dataclass(frozen=True)
class Average(_Operator):
    """The plain mean of the experts' weights, no base: theta = (1/k) sum_i theta_i."""

    def prepare(self, base: StateDict, experts: Sequence[StateDict]) -> TaskVectors:
        """The experts' own weights, stacked (the average needs no base)."""
        _check_experts(base, experts)
        return {n: torch.stack([e[n].float() for e in experts]) for n in base}

    def combine(self, base: StateDict, vectors: TaskVectors) -> StateDict:
        """The mean of the experts' weights."""
        return {n: v.mean(0).to(base[n].dtype) for n, v in vectors.items()}

    def card(self) -> dict:
        """The operator and its hyperparameters."""
        return {"method": "average"}


@dataclass(frozen=True)
class TaskArithmetic(_Operator):
    """Base plus the scaled sum of task vectors: theta = theta_0 + scale * sum_i (theta_i - theta_0)."""

    scale: float

    def combine(self, base: StateDict, vectors: TaskVectors) -> StateDict:
        """The base plus the scaled sum."""
        return {n: (base[n].float() + self.scale * v.sum(0)).to(base[n].dtype) for n, v in vectors.items()}

    def card(self) -> dict:
        """The operator and its hyperparameters."""
        return {"method": "task_arithmetic", "scale": self.scale}


@dataclass(frozen=True)
class Ties(_Operator):
    """TIES: trim each task vector to its largest `density` share per tensor, elect each entry's sign from
    the sum of the trimmed vectors (a zero sum elects +), and add `scale` times the mean of the entries that
    agree with it (the disjoint mean) to the base."""

    density: float = 0.2
    scale: float = 1.0

    def __post_init__(self) -> None:
        """Refuse a density outside (0, 1]."""
        if not 0 < self.density <= 1:
            raise UserError(f"TIES density must be in (0, 1], got {self.density}; fix: e.g. 0.2 keeps the top 20%")

    def prepare(self, base: StateDict, experts: Sequence[StateDict]) -> TaskVectors:
        """Each expert's trimmed task vectors."""
        return {n: trim(v, self.density) for n, v in task_vectors(base, experts).items()}

    def combine(self, base: StateDict, vectors: TaskVectors) -> StateDict:
        """Elect signs, take the disjoint mean, add it scaled to the base."""
        out = {}
        for n, v in vectors.items():
            elected = torch.where(v.sum(0) >= 0, 1.0, -1.0)
            agree = torch.sign(v) == elected
            mean = (v * agree).sum(0) / agree.sum(0).clamp(min=1)
            out[n] = (base[n].float() + self.scale * mean).to(base[n].dtype)
        return out

    def card(self) -> dict:
        """The operator and its hyperparameters."""
        return {"method": "ties", "density": self.density, "scale": self.scale}


@dataclass(frozen=True)
class Dare(_Operator):
    """DARE: drop each task-vector entry with probability `drop_rate`, rescale the rest by 1/(1 - drop_rate),
    then Task Arithmetic with `scale`. The masks come from a generator seeded with `seed` (tensors in order)."""

    drop_rate: float = 0.2
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse a drop rate outside [0, 1)."""
        if not 0 <= self.drop_rate < 1:
            raise UserError(f"DARE drop rate must be in [0, 1), got {self.drop_rate}; fix: e.g. 0.2")

    def combine(self, base: StateDict, vectors: TaskVectors) -> StateDict:
        """Drop, rescale and add the scaled sum to the base."""
        generator = torch.Generator().manual_seed(self.seed)
        out = {}
        for n, v in vectors.items():
            keep = torch.rand(v.shape, generator=generator) >= self.drop_rate
            out[n] = (base[n].float() + self.scale * (v * keep).sum(0) / (1 - self.drop_rate)).to(base[n].dtype)
        return out

    def card(self) -> dict:
        """The operator and its hyperparameters."""
        return {"method": "dare", "drop_rate": self.drop_rate, "scale": self.scale, "seed": self.seed}


Operator = Average | TaskArithmetic | Ties | Dare
METHODS = ("average", "task_arithmetic", "ties", "dare")
METHOD_LABELS = {"average": "Average", "task_arithmetic": "Task Arithmetic", "ties": "TIES", "dare": "DARE"}
# The study's settings: Table 1 of the paper (TA: c = 0.8, alpha = c/k; DARE: p = 0.2, alpha = 1/k) and its
# released code for TIES (keep the top 20% of each tensor, scale 1 on the disjoint mean).
TA_TOTAL = 0.8
TIES_DENSITY = 0.2
DARE_DROP = 0.2


def study_operator(method: str, k: int, seed: int = 0) -> Operator:
    """The operator the study applies to a subset of k experts."""
    if method == "average":
        return Average()
    if method == "task_arithmetic":
        return TaskArithmetic(TA_TOTAL / k)
    if method == "ties":
        return Ties(TIES_DENSITY, 1.0)
    if method == "dare":
        return Dare(DARE_DROP, 1.0 / k, seed)
    raise UserError(f"unknown merge method {method!r}; fix: use one of {list(METHODS)}")


def load_state(path: Path) -> StateDict:
    """The tensors of a saved checkpoint folder (model.safetensors), on the CPU."""
    from safetensors.torch import load_file

    file = Path(path) / "model.safetensors"
    if not file.exists():
        raise UserError(f"{path} has no model.safetensors; fix: pass a folder written by save_pretrained")
    return load_file(file)


def save_merge(out: Path, base_dir: Path, expert_dirs: Sequence[Path], operator: Operator) -> dict:
    """Merge checkpoint folders and save the result as a checkpoint folder that `dir:` specs load and score,
    with a merge card (mcl-merge.json: operator, hyperparameters, inputs' sha256); returns the card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out = Path(base_dir), Path(out)
    merged = operator.merge(load_state(base_dir), [load_state(d) for d in expert_dirs])
    net = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=False)
    missing, unexpected = net.load_state_dict(merged, strict=False)
    if unexpected or set(missing) - set(getattr(net, "_tied_weights_keys", None) or {}):
        raise UserError(f"the merged tensors do not fit {base_dir} (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}); fix: merge experts fine-tuned from this base")
    card = {**operator.card(), "base": {"path": str(base_dir), "sha256": sha256_file(base_dir / "model.safetensors")},
            "experts": [{"path": str(d), "sha256": sha256_file(Path(d) / "model.safetensors")} for d in expert_dirs],
            "merging_version": MERGING_VERSION, "created_utc": _now()}
    with atomic_path(out, folder=True) as tmp:
        net.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False).save_pretrained(tmp)
        (tmp / "mcl-merge.json").write_text(strict_json(card))
    return card


def _now() -> str:
    """The current UTC time, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the study's settings and evaluation text


@dataclass(frozen=True)
class MergingSettings:
    """The merging study: bases (one zoo family at several sizes), expert domains, operators and the
    evaluation sample (`eval_samples` test texts per domain)."""

    family: str = "llama"
    sizes: tuple[str, ...] = ("s1", "s3", "s4", "s5")
    domains: tuple[str, ...] = ("brown-press", "brown-fiction", "brown-learned", "brown-nonfiction", "sotu", "code")
    methods: tuple[str, ...] = METHODS
    eval_samples: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        """Lists from YAML become tuples; bad values are one-line errors with the fix."""
        for name in ("sizes", "domains", "methods"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
                raise UserError(f"merging {name} must be a non-empty list, got {value!r}; fix: e.g. "
                                f"{list(getattr(MergingSettings, name))}")
            object.__setattr__(self, name, tuple(value))
        if self.family not in zoo.FAMILIES:
            raise UserError(f"merging family {self.family!r} is not a zoo family; fix: use one of {sorted(zoo.FAMILIES)}")
        for size in self.sizes:
            zoo.parse_name(f"{self.family}-{size}")
        unknown = [d for d in self.domains if d not in domain_names()]
        if unknown or len(set(self.domains)) < 2:
            raise UserError(f"merging domains {list(self.domains)}: need at least 2 distinct known domains; fix: "
                            f"choose from {domain_names()}")
        if set(self.methods) - set(METHODS):
            raise UserError(f"unknown merge method(s) {sorted(set(self.methods) - set(METHODS))}; fix: use "
                            f"{list(METHODS)}")
        if not isinstance(self.eval_samples, int) or isinstance(self.eval_samples, bool) or self.eval_samples < 2:
            raise UserError(f"merging eval_samples must be an integer >= 2, got {self.eval_samples!r}; fix: e.g. 100")

    @property
    def bases(self) -> list[str]:
        """The zoo names of the bases."""
        return [f"{self.family}-{s}" for s in self.sizes]

    @property
    def subsets(self) -> list[tuple[int, ...]]:
        """Every non-empty subset of the experts (indices into domains), by size then lexicographically."""
        n = len(self.domains)
        return [c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)]


def eval_table(settings: MergingSettings) -> pd.DataFrame:
    """The evaluation sample: `eval_samples` seeded test texts of each domain (Brown paragraphs of 50+ words),
    with sample_id (domain/doc_id), domain, text and UTF-8 bytes."""
    frames = []
    for j, domain in enumerate(settings.domains):
        df = domain_documents(domain, "test")
        if domain.startswith("brown"):
            df = df[df["text"].str.split().str.len() >= BROWN_MIN_WORDS]
        if len(df) < settings.eval_samples:
            raise UserError(f"domain {domain} has {len(df)} test texts, fewer than eval_samples "
                            f"{settings.eval_samples}; fix: lower eval_samples")
        rng = np.random.default_rng([settings.seed, j])
        picked = df.iloc[np.sort(rng.choice(len(df), settings.eval_samples, replace=False))]
        frames.append(pd.DataFrame({"sample_id": domain + "/" + picked["doc_id"], "domain": domain,
                                    "text": picked["text"].to_numpy()}))
    out = pd.concat(frames, ignore_index=True)
    out["n_bytes"] = out["text"].str.encode("utf-8").str.len().astype("int64")
    return out


# ---------------------------------------------------------------- experts

# The fine-tuning recipe, the same at every size: 128 AdamW steps of 8 rows (262k tokens of the domain's
# training text, in the base's context), peak learning rate 0.3x the base's own (tuned) peak, 10% warmup,
# cosine decay to 10% of the peak; the base family's betas, weight decay and clipping.
FINETUNE = {"steps": 128, "batch_rows": 8, "lr_fraction": 0.3, "warmup_fraction": 0.1, "min_lr_fraction": 0.1}
EXPERT_RESULTS = zoo.REPO_ROOT / "results" / "experts"  # expert cards and training logs (shared by experiments)


def expert_name(base: str, domain: str) -> str:
    """`<base>-<domain>`, e.g. llama-s3-sotu."""
    return f"{base}-{domain}"


def expert_recipe(base: str, domain: str) -> dict:
    """Everything an expert's weights depend on: the base's identity, the domain's text and the recipe."""
    model = zoo.parse_name(base)
    card = zoo.read_card(model.name)
    if card is None:
        raise UserError(f"base zoo:{base} is not trained; fix: run `{zoo.train_command(base)}`")
    family = dataclasses.replace(model.family, mixture=((domain, 1.0),),
                                 warmup_fraction=FINETUNE["warmup_fraction"],
                                 min_lr_fraction=FINETUNE["min_lr_fraction"])
    steps = FINETUNE["steps"]
    return {"base": zoo.identity(base), "domain": domain, "data": zoo.domain_fingerprint(domain),
            "family": family.record(), "lr": FINETUNE["lr_fraction"] * card["peak_lr"], "steps": steps,
            "batch_rows": FINETUNE["batch_rows"], "warmup_steps": family.warmup_steps(steps),
            "merging": MERGING_VERSION, "trainer": zoo.TRAINER_VERSION}


def expert_run_dir(base: str, domain: str, rec: dict | None = None) -> Path:
    """The cache folder of an expert's fine-tuning run (checkpoints, then the final weights)."""
    rec = rec or expert_recipe(base, domain)
    return cache_root() / "merging" / "experts" / f"{expert_name(base, domain)}-{zoo.recipe_hash(rec)[:16]}"


def finetune(base: str, domain: str, device: str = "cpu", out: Path | None = None, progress: bool = True,
             threads: int | None = None, stop_after: int | None = None, checkpoint_every: int = 25,
             log: Callable[[str], None] = print) -> dict:
    """Fine-tune the base on one domain (resuming a killed run from its checkpoint) and write the expert's
    card and training log under `out` (results/experts); returns the card."""
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    model, dev, name = zoo.parse_name(base), torch.device(device), expert_name(base, domain)
    rec = expert_recipe(base, domain)
    run_dir = expert_run_dir(base, domain, rec)
    family = zoo.Family(**{**rec["family"], "mixture": tuple(map(tuple, rec["family"]["mixture"])),
                           "betas": tuple(rec["family"]["betas"])})
    with file_lock(run_dir), zoo.hf_progress_bars(progress):  # transformers' bars only with ours
        final = run_dir / "final"
        if not (final / zoo.TRAIN_STATE).exists():
            tokenizer = zoo._load_tokenizer(zoo.family_tokenizer(model.family))
            net = AutoModelForCausalLM.from_pretrained(zoo.weights_dir(base), trust_remote_code=False).to(dev)
            stream = zoo.TokenStream(family, rec["steps"] * rec["batch_rows"],
                                     docs={domain: zoo.domain_tokens(model.family, domain)})
            state = zoo._train_loop(name, family, rec, net, dev, run_dir, stream, checkpoint_every, progress,
                                    stop_after, log)
            if state["step"] < rec["steps"]:
                return {"name": name, "stopped_at": state["step"]}
            zoo._save_final(net, tokenizer, final, state)
            (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        state = json.loads((final / zoo.TRAIN_STATE).read_text())
    finite = [r["loss_nats"] for r in state["log"] if math.isfinite(r["loss_nats"])]
    card = {"name": name, "base": base, "domain": domain, "recipe_hash": zoo.recipe_hash(rec), "recipe": rec,
            "steps": rec["steps"], "tokens_seen": rec["steps"] * rec["batch_rows"] * family.context,
            "peak_lr": rec["lr"], "final_train_loss_nats": finite[-1] if finite else float("nan"),
            "wall_time_s": state["elapsed_s"], "device": state["device"], "precision": state["precision"],
            "weights_sha256": sha256_file(final / "model.safetensors"), "created_utc": _now()}
    zoo.write_card(card, state["log"], out or EXPERT_RESULTS)
    log(f"[expert] {name}: fine-tuned in {state['elapsed_s']:.0f} s, final loss {card['final_train_loss_nats']:.3f}")
    return card


def expert_dir(base: str, domain: str, out: Path | None = None) -> Path:
    """An expert's weights, checked against its committed card (a missing or stale one is a one-line error)."""
    name = expert_name(base, domain)
    rec = expert_recipe(base, domain)
    card = zoo.read_card(name, out or EXPERT_RESULTS)
    final = expert_run_dir(base, domain, rec) / "final"
    if card is None or card["recipe_hash"] != zoo.recipe_hash(rec):
        raise UserError(f"expert {name} is not fine-tuned from the current base and recipe; fix: run "
                        "`mcl merge study EXPERIMENT`")
    if not (final / "model.safetensors").exists() or sha256_file(final / "model.safetensors") != card["weights_sha256"]:
        raise UserError(f"expert {name} has a card but not its weights on this machine ({final}); fix: run "
                        "`mcl merge study EXPERIMENT` (it fine-tunes again, from the same recipe)")
    return final


def expert_is_current(base: str, domain: str, out: Path | None = None) -> bool:
    """True when the expert's card matches its recipe and its weights are on this machine."""
    try:
        expert_dir(base, domain, out)
    except UserError:
        return False
    return True


def ensure_experts(settings: MergingSettings, jobs: int = 1, out: Path | None = None,
                   log: Callable[[str], None] = print, progress: bool = True) -> None:
    """Fine-tune every expert of the study that is missing or stale, `jobs` at a time (one thread each)."""
    todo = [(b, d) for b in settings.bases for d in settings.domains if not expert_is_current(b, d, out)]
    if not todo:
        return
    log(f"[expert] fine-tuning {len(todo)} experts, {jobs} at a time")
    if jobs <= 1 or len(todo) == 1:
        for base, domain in todo:
            finetune(base, domain, out=out, progress=progress, log=log)
        return
    zoo.in_processes(finetune, [dict(base=b, domain=d, out=out, progress=False, threads=1) for b, d in todo[::-1]],
                     jobs)


# ---------------------------------------------------------------- the study: every subset, every operator

BASE_PART = "base"  # the part holding each base's own losses (subset empty, k = 0)
PROVENANCE_KEY = b"mcl_merging"


def part_path(out_dir: Path, size: str, method: str) -> Path:
    """The losses of one base size and method: every subset's loss on every evaluation sample."""
    return Path(out_dir) / f"losses-{size}-{method}.parquet"


def part_key(settings: MergingSettings, samples: pd.DataFrame, size: str, method: str) -> str:
    """Cache key of one part: the base's identity, its experts' weights, the operator, the evaluation
    texts and this module's version."""
    from mcl_utils.scoring import SCORER_VERSION

    base = f"{settings.family}-{size}"
    experts = {} if method == BASE_PART else {
        d: zoo.read_card(expert_name(base, d), EXPERT_RESULTS)["weights_sha256"] for d in settings.domains}
    payload = {"base": zoo.identity(base), "experts": experts, "method": method, "domains": settings.domains,
               "samples": table_fingerprint(samples, ("sample_id", "text")), "scorer": SCORER_VERSION,
               "merging": MERGING_VERSION}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def read_part(path: Path) -> tuple[pd.DataFrame, dict]:
    """A part's losses (long: subset, k, sample_id, nll_nats) and its provenance."""
    table = pq.read_table(path)
    return table.to_pandas(), json.loads(table.schema.metadata[PROVENANCE_KEY])


def part_is_current(path: Path, key: str) -> bool:
    """True when a part exists and was computed under `key`."""
    if not path.exists():
        return False
    return json.loads(pq.read_schema(path).metadata[PROVENANCE_KEY])["cache_key"] == key


def subset_mask(subset: Sequence[int]) -> int:
    """A subset of expert indices as a bit mask (expert j is bit j)."""
    return sum(1 << j for j in subset)


def run_part(settings: MergingSettings, samples: pd.DataFrame, size: str, method: str, out_dir: Path,
             key: str, threads: int | None = None, progress: bool = False) -> dict:
    """Merge every subset of the experts of one base with one operator, score each merge on every
    evaluation sample in memory, and write the part (all subsets at once, atomically)."""
    import time

    from mcl_utils.models import load_model
    from mcl_utils.scoring import per_sample, prepare, score_rows

    if threads:
        torch.set_num_threads(threads)
    base = f"{settings.family}-{size}"
    with zoo.hf_progress_bars(progress):
        loaded = load_model(f"zoo:{base}", device="cpu", dtype="float32")
    base_state = load_state(zoo.weights_dir(base))
    texts, ids = samples["text"].tolist(), samples["sample_id"].tolist()
    rows, batches, _ = prepare(loaded, texts, ids, None, None)
    start, records = time.perf_counter(), []

    def score(state: StateDict) -> tuple[np.ndarray, np.ndarray]:
        missing, unexpected = loaded.model.load_state_dict(state, strict=False)
        assert not unexpected and len(missing) <= 1, (missing, unexpected)  # at most the tied output head
        return per_sample(rows, batches, score_rows(loaded, rows, batches, progress=False), len(texts))

    if method == BASE_PART:
        jobs = [((), None)]
    else:  # each expert is prepared once (TIES trims it), then every subset combines its prepared vectors
        prepared = study_operator(method, 1).prepare(base_state, [load_state(expert_dir(base, d))
                                                                  for d in settings.domains])
        jobs = [(s, study_operator(method, len(s), seed=subset_mask(s))) for s in settings.subsets]
    from tqdm import tqdm

    for subset, op in tqdm(jobs, desc=f"{base} {method}", disable=not progress):
        nll, n_tokens = score(base_state if op is None else op.combine(base_state, select(prepared, subset)))
        records.append(pd.DataFrame({"subset": subset_mask(subset), "k": len(subset), "sample_id": ids,
                                     "nll_nats": nll, "n_tokens": n_tokens.astype("int32")}))
    table = pd.concat(records, ignore_index=True)
    if not np.isfinite(table["nll_nats"]).all():
        raise UserError(f"a merge of {base} with {method} gave non-finite losses; fix: report this bug")
    wall = time.perf_counter() - start
    provenance = {"cache_key": key, "base": zoo.identity(base), "size": size, "method": method,
                  "operator": None if method == BASE_PART else {
                      "settings": study_operator(method, 2).card(), "scale": "TA: 0.8/k, DARE: 1/k, TIES: 1",
                      "dare_seed": "the subset's bit mask"},
                  "domains": list(settings.domains), "n_merges": len(jobs), "wall_time_s": wall,
                  "tokens_per_s": float(table["n_tokens"].sum() / wall), "device": f"cpu ({torch.get_num_threads()} threads)",
                  "versions": {"torch": torch.__version__, "python": platform.python_version()},
                  "merging_version": MERGING_VERSION, "created_utc": _now()}
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), PROVENANCE_KEY: json.dumps(provenance)})
    path = part_path(out_dir, size, method)
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp, compression="zstd")
    return {"size": size, "method": method, "wall_time_s": wall, "n_merges": len(jobs)}


SAMPLES_FILE = "samples.parquet"
STUDY_FILE = "study.json"


def run_study(settings: MergingSettings, out_dir: Path, force: bool = False, jobs: int = 1,
              log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """The whole study, resumable: train missing bases, fine-tune missing experts, then compute every part
    (a base size x an operator) that is missing or stale, `jobs` at a time; writes study.json."""
    import time

    out_dir = Path(out_dir)
    start = time.perf_counter()
    zoo.ensure_trained([f"zoo:{b}" for b in settings.bases], device="cpu", log=log, jobs=jobs, progress=progress)
    ensure_experts(settings, jobs=jobs, log=log, progress=progress)
    samples = eval_table(settings)
    with atomic_path(out_dir / SAMPLES_FILE) as tmp:
        samples.drop(columns="text").to_parquet(tmp, index=False)
    parts = [(size, m) for size in settings.sizes for m in (BASE_PART, *settings.methods)]
    keys = {p: part_key(settings, samples, *p) for p in parts}
    todo = [p for p in parts if force or not part_is_current(part_path(out_dir, *p), keys[p])]
    for p in parts:
        if p not in todo:
            log(f"[merge]  {settings.family}-{p[0]} {p[1]}: cached")
    # the largest bases first, so the last jobs to finish are short
    todo.sort(key=lambda p: (-settings.sizes.index(p[0]), p[1]))
    log(f"[merge]  {len(todo)} parts to compute ({len(settings.subsets)} subsets each), {jobs} at a time")
    kwargs = [dict(settings=settings, samples=samples, size=s, method=m, out_dir=out_dir, key=keys[(s, m)],
                   threads=1 if jobs > 1 else None, progress=progress and jobs <= 1) for s, m in todo]
    def report(d: dict) -> None:
        log(f"[merge]  {settings.family}-{d['size']} {d['method']}: {d['n_merges']} merges in {d['wall_time_s']:.0f} s")

    if jobs <= 1 or len(kwargs) <= 1:
        for kw in kwargs:
            report(run_part(**kw))
    else:
        zoo.in_processes(run_part, kwargs, jobs, on_done=report)
    manifest = {"settings": dataclasses.asdict(settings), "parts": {f"{s}/{m}": keys[(s, m)] for s, m in parts},
                "finetune": FINETUNE, "experts": {e: zoo.read_card(e, EXPERT_RESULTS)["weights_sha256"]
                                                  for e in (expert_name(b, d) for b in settings.bases
                                                            for d in settings.domains)},
                "wall_time_s_this_run": time.perf_counter() - start, "jobs": jobs, "merging_version": MERGING_VERSION,
                "created_utc": _now()}
    path = out_dir / STUDY_FILE
    if todo or not path.exists():
        with atomic_path(path) as tmp:
            tmp.write_text(strict_json(manifest))
    return path


def study_is_current(settings: MergingSettings, out_dir: Path) -> bool:
    """True when every part of the study exists under its current key (nothing to fine-tune or merge)."""
    try:
        samples = eval_table(settings)
        return all(part_is_current(part_path(out_dir, s, m), part_key(settings, samples, s, m))
                   for s in settings.sizes for m in (BASE_PART, *settings.methods))
    except (UserError, TypeError):
        return False


def study_files(settings: MergingSettings, out_dir: Path) -> list[Path]:
    """Every file the study's analyses read: the parts, the evaluation sample, the manifest, expert cards."""
    out_dir = Path(out_dir)
    parts = [part_path(out_dir, s, m) for s in settings.sizes for m in (BASE_PART, *settings.methods)]
    cards = [zoo.card_path(expert_name(b, d), EXPERT_RESULTS) for b in settings.bases for d in settings.domains]
    return [p for p in (*parts, out_dir / SAMPLES_FILE, out_dir / STUDY_FILE, *cards) if p.exists()]


# ---------------------------------------------------------------- analyses of the study

LN2 = math.log(2)
PARAMS_UNIT = 1e6  # the law's N: base non-embedding parameters, in millions


@dataclass(frozen=True)
class Study:
    """The study's results: evaluation samples, and per base size and operator every subset's per-sample
    losses (the base alone under method "base")."""

    settings: MergingSettings
    samples: pd.DataFrame  # sample_id, domain, n_bytes, in the parts' sample order
    losses: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]  # (size, method) -> (masks (m,), nll (m, n))
    n_params: dict[str, int]  # size -> the base's non-embedding parameters

    @property
    def onehot(self) -> np.ndarray:
        """(samples x domains) membership matrix, domains in the settings' order."""
        return (self.samples["domain"].to_numpy()[:, None] == np.array(self.settings.domains)[None]).astype(float)

    def experts(self, size: str) -> np.ndarray:
        """(experts x samples) losses of the experts of one size (Average of one expert is the expert)."""
        masks, nll = self.losses[(size, "average")]
        return np.stack([nll[list(masks).index(1 << j)] for j in range(len(self.settings.domains))])


def load_study(settings: MergingSettings, out_dir: Path) -> Study:
    """Read a finished study (a missing or stale part is a one-line error naming the command)."""
    out_dir = Path(out_dir)
    if not study_is_current(settings, out_dir):
        raise UserError(f"the merging study in {out_dir} is missing or stale; fix: run `mcl merge study EXPERIMENT`")
    samples = pd.read_parquet(out_dir / SAMPLES_FILE)
    order = {sid: i for i, sid in enumerate(samples["sample_id"])}
    losses = {}
    for size in settings.sizes:
        for method in (BASE_PART, *settings.methods):
            table, _ = read_part(part_path(out_dir, size, method))
            wide = table.pivot(index="subset", columns="sample_id", values="nll_nats")
            wide = wide[sorted(wide.columns, key=order.__getitem__)]
            losses[(size, method)] = (wide.index.to_numpy(), wide.to_numpy())
    n_params = {s: zoo.read_card(f"{settings.family}-{s}")["n_params_non_embedding"] for s in settings.sizes}
    return Study(settings, samples, losses, n_params)


def members(masks: np.ndarray, n_experts: int) -> np.ndarray:
    """(subsets x experts) membership of each subset bit mask."""
    return ((np.asarray(masks)[:, None] >> np.arange(n_experts)[None]) & 1).astype(bool)


def domain_losses(study: Study, nll: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Bits per byte of each row of nll (models x samples) on each domain, byte-weighted within the domain:
    (models x domains), or (resamples x models x domains) under a bootstrap weight matrix over samples."""
    w = np.ones((1, nll.shape[1])) if weights is None else weights
    onehot, n_bytes = study.onehot, study.samples["n_bytes"].to_numpy(float)
    num = np.einsum("rn,mn,nd->rmd", w, nll, onehot)
    den = LN2 * (w * n_bytes) @ onehot
    out = num / den[:, None, :]
    return out[0] if weights is None else out


def stratified_weights(study: Study, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Bootstrap weights over evaluation samples, resampled within each domain (each keeps its count)."""
    rng = np.random.default_rng(seed)
    w = np.zeros((n_resamples, len(study.samples)))
    for domain in study.settings.domains:
        idx = np.flatnonzero(study.samples["domain"].to_numpy() == domain)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1 / len(idx)), size=n_resamples)
    return w


def merge_table(study: Study, weights: np.ndarray | None = None) -> pd.DataFrame:
    """One row per merge (and per base): size, N, method, subset, k, the cross-domain macro bits per byte
    (mean over every domain), the in-domain macro (mean over the merged experts' domains) and each domain's.
    With bootstrap weights, one block of rows per resample (column `resample`)."""
    frames, domains = [], list(study.settings.domains)
    for (size, method), (masks, nll) in study.losses.items():
        per = domain_losses(study, nll, weights)
        per = per[None] if weights is None else per
        inside = members(masks, len(domains))
        for r, block in enumerate(per):
            df = pd.DataFrame(block, columns=domains)
            df.insert(0, "resample", r)
            df.insert(1, "size", size)
            df.insert(2, "N", study.n_params[size] / PARAMS_UNIT)
            df.insert(3, "method", method)
            df.insert(4, "subset", masks)
            df.insert(5, "k", inside.sum(1))
            df["cross_domain"] = block.mean(1)
            df["in_domain"] = np.where(inside.any(1), (block * inside).sum(1) / np.maximum(inside.sum(1), 1), np.nan)
            frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    return out.drop(columns="resample") if weights is None else out


def curves(table: pd.DataFrame, target: str = "cross_domain") -> pd.DataFrame:
    """E[L | N, k] per size and method: the mean of `target` over all k-subsets, its variance across
    subsets and the number of subsets (the base rows, k = 0, are left out)."""
    keys = ["resample"] if "resample" in table else []
    merged = table[table["method"] != BASE_PART]
    grouped = merged.groupby([*keys, "method", "size", "N", "k"], sort=True)[target]
    return grouped.agg(loss="mean", variance=lambda x: x.var(ddof=0), n_subsets="size").reset_index()


def fit_merging_law(points: pd.DataFrame, target: str = "loss", ks: Iterable[int] | None = None) -> laws.Fit:
    """The merging law fitted to per-(N, k) means with weights proportional to k (the paper's choice);
    `ks` keeps only those k (the three-point forecast)."""
    pts = points.reset_index(drop=True)
    exclude = {} if ks is None else {i: "k not in the forecast's fitting set" for i in pts.index
                                     if pts.loc[i, "k"] not in set(ks)}
    return laws.fit(laws.MERGING, pts, target, weight="k", exclude=exclude)


def law_fits(study: Study, targets: Sequence[str] = ("cross_domain",)) -> dict[tuple[str, str], laws.Fit | str]:
    """The merging law per method and target (cross_domain, in_domain or a domain name); a fit that fails
    is recorded as its reason."""
    table = merge_table(study)
    out = {}
    for target in targets:
        for method, pts in curves(table, target).groupby("method", sort=False):
            try:
                out[(method, target)] = fit_merging_law(pts)
            except laws.FitError as exc:
                out[(method, target)] = str(exc)
    return out


def bootstrap_law(study: Study, method: str, target: str, n_resamples: int, seed: int = 0) -> dict[str, laws.Bootstrap]:
    """Refits of one method's law under resampled evaluation samples (within domains) and under resampled
    expert subsets (with replacement within each (N, k) group)."""
    sub = Study(study.settings, study.samples, {key: v for key, v in study.losses.items() if key[1] == method},
                study.n_params)
    table = merge_table(sub)  # this method's merges only (no base rows)
    base = fit_merging_law(curves(table, target))
    by_sample = curves(merge_table(sub, stratified_weights(sub, n_resamples, seed)), target)
    samples = laws._collect("evaluation samples", [lambda g=g: laws.refit(base, g["loss"].to_numpy())
                                                   for _, g in by_sample.groupby("resample")])
    groups = list(table.groupby(["size", "k"]).indices.values())
    rng = np.random.default_rng(seed + 1)

    def subset_refit() -> dict[str, float]:
        draws = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
        return laws.refit(base, curves(table.iloc[draws], target)["loss"].to_numpy())

    subsets = laws._collect("expert subsets", [subset_refit for _ in range(n_resamples)])
    return {"samples": samples, "subsets": subsets}


VARIANCE_SHAPES = {  # the variance across subsets against k, each with one free scale c
    "inverse_k": lambda k, n: 1 / k,  # the paper's 1/k
    "finite_population": lambda k, n: (n - k) / (k * (n - 1)),  # a mean of k of n task vectors, drawn without replacement
    "inverse_k_squared": lambda k, n: 1 / k**2,  # Corollary 3.2's 1/k^2 regime (first-order term zero)
}


def variance_slopes(curve: pd.DataFrame, n_experts: int, min_k: int = 2) -> pd.DataFrame:
    """Per size and method: the fall of the variance across subsets from k = 1 to 2, its log-log slope against
    k over min_k <= k < K (where more than one subset exists), and the root-mean-square log error of each shape
    of VARIANCE_SHAPES fitted there with one free scale (least squares in log space)."""
    rows = []
    for (method, size), g in curve[(curve["k"] < n_experts) & (curve["variance"] > 0)].groupby(["method", "size"]):
        by_k = g.set_index("k")["variance"]
        fit = g[g["k"] >= min_k]
        k, v = fit["k"].to_numpy(float), fit["variance"].to_numpy()
        row = {"method": method, "size": size, "N": g["N"].iloc[0],
               "drop_1_to_2": float(by_k[1] / by_k[2]) if {1, 2} <= set(by_k.index) else float("nan"),
               "slope": float(np.polyfit(np.log(k), np.log(v), 1)[0]) if len(k) >= 2 else float("nan")}
        for name, shape in VARIANCE_SHAPES.items():
            s = shape(k, n_experts)
            c = float(np.exp(np.mean(np.log(v) - np.log(s))))
            row[f"rms_log_error_{name}"] = float(np.sqrt(np.mean((np.log(c * s) - np.log(v)) ** 2)))
        rows.append(row)
    out = pd.DataFrame(rows)
    errors = out[[f"rms_log_error_{n}" for n in VARIANCE_SHAPES]].to_numpy()
    out["best_shape"] = np.array(list(VARIANCE_SHAPES))[np.argmin(errors, axis=1)]
    return out


def k_fraction(losses: Sequence[float], fraction: float = 0.9) -> float:
    """The smallest k whose monotone-envelope loss realizes `fraction` of the k=1 -> K improvement
    (losses[i] at k = i + 1); NaN when merging more experts does not improve on one."""
    envelope = np.minimum.accumulate(np.asarray(losses, dtype=float))
    gain = envelope[0] - envelope[-1]
    if not gain > 0:
        return float("nan")
    return float(np.argmax((envelope[0] - envelope) / gain >= fraction - 1e-12) + 1)


def forecast(curve: pd.DataFrame, fit_ks: Sequence[int] = (1, 2, 3)) -> pd.DataFrame:
    """The three-point forecast: fit the law on k in fit_ks at every size, predict the largest k; the
    relative error per size (one row per size, or one row with the failure when the fit fails)."""
    k_max = int(curve["k"].max())
    try:
        fitted = fit_merging_law(curve, ks=fit_ks)
    except laws.FitError as exc:
        return pd.DataFrame([{"size": "all", "error": str(exc).split(";")[0]}])
    last = curve[curve["k"] == k_max].copy()
    last["predicted"] = fitted.predict(last)
    last["relative_error"] = last["predicted"] / last["loss"] - 1
    return last[["size", "N", "k", "loss", "predicted", "relative_error"]]


def mixture_nll(nll: np.ndarray) -> np.ndarray:
    """Per-sample loss of the uniform Bayesian mixture of whole-sample probabilities of the rows of nll
    (experts x samples): -log mean_i exp(-nll_i), a log-sum-exp."""
    from scipy.special import logsumexp

    return -logsumexp(-nll, axis=0) + math.log(len(nll))


def ensemble_table(study: Study) -> pd.DataFrame:
    """For every subset at every size: the cross-domain macro bits per byte of each operator's merge, the
    min-loss oracle over the subset's experts, their uniform Bayesian mixture, and the best single expert of
    the subset; with the parameters run per token (merge: N; ensemble: k N)."""
    frames, n_domains = [], len(study.settings.domains)
    for size in study.settings.sizes:
        masks = study.losses[(size, "average")][0]
        inside = members(masks, n_domains)
        single = domain_losses(study, study.experts(size)).mean(1)
        block = {name: domain_losses(study, rival_losses(study, size, name)).mean(1)
                 for name in ("oracle", "mixture", *study.settings.methods)}
        n = study.n_params[size]
        frames.append(pd.DataFrame({"size": size, "N": n / PARAMS_UNIT, "subset": masks, "k": inside.sum(1),
                                    "merge_params_per_token": n, "ensemble_params_per_token": inside.sum(1) * n,
                                    "best_expert": [single[m].min() for m in inside], **block}))
    return pd.concat(frames, ignore_index=True)


def rival_losses(study: Study, size: str, rival: str) -> np.ndarray:
    """(subsets x samples) per-sample losses of a rival to each merge of one size, in the parts' subset order:
    another operator's merges, the min-loss oracle over the subset's experts, or their uniform mixture."""
    if rival in study.settings.methods:
        return study.losses[(size, rival)][1]
    if rival not in ("oracle", "mixture"):
        raise UserError(f"unknown rival {rival!r}; fix: use oracle, mixture or one of {list(study.settings.methods)}")
    experts = study.experts(size)
    inside = members(study.losses[(size, "average")][0], len(study.settings.domains))
    return np.stack([experts[m].min(0) if rival == "oracle" else mixture_nll(experts[m]) for m in inside])


def paired_gap(study: Study, size: str, method: str, rival: str, n_resamples: int, seed: int = 0) -> pd.DataFrame:
    """Per k: the mean over subsets of (merge - rival) cross-domain macro bits per byte, absolute and relative
    to the rival, with 95% intervals from resampling evaluation samples (within domains) and subsets together."""
    masks, nll = study.losses[(size, method)]
    other = rival_losses(study, size, rival)
    weights = stratified_weights(study, n_resamples, seed)
    ours, theirs = domain_losses(study, nll, weights).mean(2), domain_losses(study, other, weights).mean(2)
    point_ours, point_theirs = domain_losses(study, nll).mean(1), domain_losses(study, other).mean(1)
    k = members(masks, len(study.settings.domains)).sum(1)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for kk in np.unique(k):
        idx = np.flatnonzero(k == kk)
        draws = idx[rng.integers(0, len(idx), (n_resamples, len(idx)))]
        r = np.arange(n_resamples)[:, None]
        gap, base = (ours[r, draws] - theirs[r, draws]).mean(1), theirs[r, draws].mean(1)
        rel = 100 * gap / base
        rows.append({"size": size, "method": method, "rival": rival, "k": int(kk),
                     "gap_bpb": float((point_ours[idx] - point_theirs[idx]).mean()),
                     "lo": float(np.percentile(gap, 2.5)), "hi": float(np.percentile(gap, 97.5)),
                     "gap_pct": float(100 * (point_ours[idx] - point_theirs[idx]).mean() / point_theirs[idx].mean()),
                     "pct_lo": float(np.percentile(rel, 2.5)), "pct_hi": float(np.percentile(rel, 97.5))})
    return pd.DataFrame(rows)


def input_hashes(settings: MergingSettings, out_dir: Path) -> dict[str, str]:
    """sha256 of every study file, keyed by its path relative to the repository (provenance of a chapter)."""
    return {str(p.relative_to(zoo.REPO_ROOT) if p.is_relative_to(zoo.REPO_ROOT) else p): sha256_file(p)
            for p in study_files(settings, out_dir)}


def study_report(settings: MergingSettings, out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Provenance of the study for the status page: each expert's card, and each part's device and speed."""
    experts = []
    for base in settings.bases:
        for domain in settings.domains:
            card = zoo.read_card(expert_name(base, domain), EXPERT_RESULTS)
            if card is not None:
                experts.append({"expert": card["name"], "steps": card["steps"], "tokens": card["tokens_seen"],
                                "peak lr": card["peak_lr"], "final loss (nats)": round(card["final_train_loss_nats"], 3),
                                "wall s": round(card["wall_time_s"]), "device": card["device"],
                                "weights sha256": card["weights_sha256"][:16], "trained": card["created_utc"]})
    parts = []
    for size in settings.sizes:
        for method in (BASE_PART, *settings.methods):
            path = part_path(out_dir, size, method)
            if path.exists():
                _, prov = read_part(path)
                parts.append({"file": path.name, "merges": prov["n_merges"], "device": prov["device"],
                              "wall s": round(prov["wall_time_s"]), "tokens/s": round(prov["tokens_per_s"]),
                              "computed": prov["created_utc"], "cache key": prov["cache_key"][:16]})
    return pd.DataFrame(experts), pd.DataFrame(parts)
