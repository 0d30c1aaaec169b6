"""Experiments and the pipeline: papermill runs one notebook per stage, skipping what is cached."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import yaml
from jupyter_client.manager import AsyncKernelManager

import mcl_utils
from mcl_utils import merging, realizable, zoo
from mcl_utils.corpus import BROWN_PARQUET, Corpus, CorpusSpec, load_corpus
from mcl_utils.errors import UserError
from mcl_utils.models import parse_spec, sha256_file
from mcl_utils.oracle import model_cards
from mcl_utils.scoring import ScoringSettings, cached_token_losses, target
from mcl_utils.store import (CONTENT_KEY, LossMatrix, atomic_path, cache_root, canonical_json, load_matrix,
                             read_provenance, slug)

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO_ROOT / "notebooks"
GENERATED = REPO_ROOT / "book" / "generated"
RESULTS = REPO_ROOT / "results"
HIDDEN_TAGS = {"parameters", "injected-parameters"}
MERGING_ANALYSES = ("merge_operators", "merging_law", "merging_ensembling")  # read the merging study
ANALYSES = ("oracle", "laws", "gpus", "scaling", "collaboration", "diversity", "realizable", *MERGING_ANALYSES)
DEFAULT_ANALYSES = ("oracle", "laws")
# Files each analysis notebook reads besides the loss tables and the corpus (glob patterns under the
# repository), and the results it writes under the experiment's results folder. The stage's cache key
# covers the inputs' contents; its executed notebook records the outputs' sha256, checked before reuse.
ZOO_CARDS = ("results/zoo/*.json", "results/zoo/logs/*.csv")
# Stages that take longest (measured in `make book`: minutes each, the others seconds), slowest first: when
# stages run side by side they start first, so that short ones fill the cores at the end.
SLOWEST_FIRST = ("collaboration", "realizable", "laws", "merging_law", "diversity", "scaling")
STAGE_INPUTS = {"oracle": (), "laws": ("data/published/*.csv",),
                "gpus": ("results/benchmarks/*.json", "experiments/paper-scale.yaml"),
                # cards, logs, sweeps and the probes the chapter reads (recipe-v1/, gpt2-bytes/, gpt2-depth3/,
                # gpt2-v2/ with its loss tables)
                "scaling": ("results/zoo/**/*.json", "results/zoo/**/*.csv", "results/zoo/**/*.parquet",
                            "experiments/offline-llms.yaml", "results/losses/*.parquet"),
                "collaboration": ZOO_CARDS, "diversity": ZOO_CARDS,
                "realizable": (*ZOO_CARDS, "results/zoo-laws/token_mixtures.json"),
                # the merging stages also read every file of their experiment's study (merging.study_files)
                "merge_operators": (), "merging_law": ("data/published/*.csv",), "merging_ensembling": ()}
STAGE_OUTPUTS = {"oracle": ("oracle.parquet", "oracle.json"), "laws": ("fits.json",), "scaling": ("scaling.json",),
                 "collaboration": ("collaboration.json",), "diversity": ("diversity.json",),
                 "realizable": ("realizable.json",), "merge_operators": ("merge_operators.json",),
                 "merging_law": ("merging_law.json",), "merging_ensembling": ("merging_ensembling.json",)}
LIBRARY_VERSIONS = ("torch", "transformers", "numpy", "pandas", "scipy", "altair", "papermill", "jupyter-book",
                    "myst-nb", "sphinx")


@dataclass(frozen=True)
class Experiment:
    """What to run: a corpus, a list of model specs, scoring settings and the analyses to execute."""

    name: str
    path: Path
    description: str = ""
    corpus: CorpusSpec = CorpusSpec()
    models: tuple[str, ...] = ()
    scoring: ScoringSettings = ScoringSettings()
    analyses: tuple[str, ...] = DEFAULT_ANALYSES
    bootstrap_resamples: int = 1000
    prefix_fraction: float | None = None  # also score each sample's head (the honest oracle, prefix routers)
    merging: merging.MergingSettings | None = None  # the merging study (experts, operators, evaluation texts)
    results_dir: Path = RESULTS
    generated_dir: Path = GENERATED

    @property
    def losses_dir(self) -> Path:
        """Where loss tables go (shared by experiments: a cache key names each table)."""
        return self.results_dir / "losses"

    @property
    def out_dir(self) -> Path:
        """Where this experiment's analysis results go."""
        return self.results_dir / self.name

    @property
    def book_dir(self) -> Path:
        """Where this experiment's executed notebooks go."""
        return self.generated_dir / self.name


def _fields_of(cls: type) -> set[str]:
    """Field names of a dataclass."""
    return {f.name for f in dataclasses.fields(cls)}


def _section(raw: dict, key: str, cls: type, where: Path) -> object:
    """Build a dataclass from a mapping in the experiment file, refusing unknown keys and bad values."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: '{key}' must be a mapping; fix: write it as key: value lines")
    unknown = set(value) - _fields_of(cls)
    if unknown:
        raise UserError(f"{where}: unknown {key} setting(s) {sorted(unknown)}; fix: use only "
                        f"{sorted(_fields_of(cls))}")
    try:
        return cls(**value)
    except UserError as exc:
        raise UserError(f"{where}: {key}: {exc}") from None


def _relative_to(base: Path, spec: str) -> str:
    """A `dir:` model spec with its relative path resolved against `base`."""
    parsed = parse_spec(spec)
    if parsed.scheme != "dir" or Path(parsed.target).is_absolute():
        return spec
    return f"dir:{(base / parsed.target).resolve()}"


def _corpus_relative_to(base: Path, corpus: CorpusSpec) -> CorpusSpec:
    """A corpus spec whose relative file path is resolved against `base`."""
    source = corpus.source
    if source == "brown" or source.startswith("hf:") or Path(source).is_absolute():
        return corpus
    return dataclasses.replace(corpus, source=str((base / source).resolve()))


def load_experiment(path: str | Path, results_dir: Path = RESULTS, generated_dir: Path = GENERATED) -> Experiment:
    """Read and validate an experiment YAML file; every problem is a one-line error with the fix.

    Relative paths in it (a corpus file, `dir:` models) are relative to the experiment file's folder,
    wherever the command runs from (the notebooks run from the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file {path} does not exist; fix: pass a file from experiments/")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; fix: save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML ({str(exc).splitlines()[0]}); fix: check its syntax") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a YAML mapping; fix: start from experiments/offline-llms.yaml")
    allowed = {"name", "description", "corpus", "models", "zoo", "scoring", "analyses", "bootstrap_resamples",
               "prefix_fraction", "merging"}
    if set(raw) - allowed:
        raise UserError(f"{path}: unknown key(s) {sorted(set(raw) - allowed)}; fix: use only {sorted(allowed)}")
    name = raw.get("name")
    if not isinstance(name, str) or slug(name) != name:
        raise UserError(f"{path}: 'name' must be a simple identifier like offline-llms; fix: set name:")
    models = raw.get("models") or []
    if isinstance(models, list) and raw.get("zoo"):
        models = models + zoo.expand(raw["zoo"], str(path))
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise UserError(f"{path}: 'models' must be a non-empty list of model specs; fix: list e.g. "
                        "- gguf:smollm2-135m-instruct")
    models = [_relative_to(path.parent, spec) for spec in models]
    names = [parse_spec(spec).name for spec in models]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: a model is listed twice (under models or by the zoo section); fix: list each "
                        "model once")
    scoring = _section(raw, "scoring", ScoringSettings, path)
    if isinstance(scoring.gpus_per_model, dict) and set(scoring.gpus_per_model) - set(names):
        raise UserError(f"{path}: gpus_per_model names {sorted(set(scoring.gpus_per_model) - set(names))}, "
                        "which are not under models:; fix: use the exact model specs listed there")
    analyses = raw.get("analyses", list(DEFAULT_ANALYSES))
    unknown = [a for a in analyses if a not in ANALYSES]
    if unknown:
        raise UserError(f"{path}: unknown analyses {unknown}; fix: choose from {list(ANALYSES)}")
    resamples = raw.get("bootstrap_resamples", Experiment.bootstrap_resamples)
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        raise UserError(f"{path}: 'bootstrap_resamples' must be a positive integer; fix: e.g. 1000")
    corpus = _corpus_relative_to(path.parent, _section(raw, "corpus", CorpusSpec, path))
    try:
        dataclasses.replace(corpus, prefix_fraction=raw.get("prefix_fraction"))
    except UserError as exc:
        raise UserError(f"{path}: {str(exc).removeprefix('corpus ')}") from None
    if "realizable" in analyses and raw.get("prefix_fraction") is None:
        raise UserError(f"{path}: the realizable analysis needs each sample's head scored; fix: add "
                        "prefix_fraction: 0.5")
    study = _section(raw, "merging", merging.MergingSettings, path) if raw.get("merging") is not None else None
    if study is None and set(analyses) & set(MERGING_ANALYSES):
        raise UserError(f"{path}: the analyses {sorted(set(analyses) & set(MERGING_ANALYSES))} read a merging "
                        "study; fix: add a merging: section (see experiments/merging.yaml)")
    return Experiment(name=name, path=path.resolve(), description=raw.get("description", ""),
                      corpus=corpus, models=tuple(names), scoring=scoring, analyses=tuple(analyses),
                      bootstrap_resamples=resamples, prefix_fraction=raw.get("prefix_fraction"), merging=study,
                      results_dir=Path(results_dir), generated_dir=Path(generated_dir))


def experiment_corpus(exp: Experiment) -> Corpus:
    """The experiment's evaluation samples."""
    return load_corpus(exp.corpus)


def prefix_corpus(exp: Experiment) -> Corpus:
    """The heads of the experiment's samples (their first prefix_fraction of bytes), scored in context."""
    if exp.prefix_fraction is None:
        raise UserError(f"{exp.path} scores no sample heads; fix: add prefix_fraction: 0.5 to it")
    return load_corpus(dataclasses.replace(exp.corpus, prefix_fraction=exp.prefix_fraction))


def experiment_corpora(exp: Experiment) -> dict[str, Corpus]:
    """Every corpus the experiment scores: its samples ("full") and, with prefix_fraction, their heads."""
    return {"full": experiment_corpus(exp), **({"prefix": prefix_corpus(exp)} if exp.prefix_fraction else {})}


def loss_table_paths(exp: Experiment, corpus: Corpus | None = None) -> dict[str, Path]:
    """Expected loss table of each model of the experiment (they exist once scored)."""
    corpus = corpus or experiment_corpus(exp)
    return {m: target(m, corpus, exp.losses_dir, exp.scoring).path for m in exp.models}


def experiment_matrix(exp: Experiment) -> tuple[LossMatrix, pd.DataFrame, pd.DataFrame]:
    """The experiment's aligned loss matrix, its samples' metadata and its model cards, in matrix order."""
    corpus = experiment_corpus(exp)
    paths = loss_table_paths(exp, corpus)
    missing = [m for m, p in paths.items() if not p.exists()]
    if missing:
        raise UserError(f"no loss table for {missing} on this corpus; fix: run `mcl run {exp.path}`")
    matrix = load_matrix(list(paths.values()))
    samples = corpus.samples.set_index("sample_id").loc[matrix.sample_ids].reset_index()
    return matrix, samples, model_cards(matrix)


def prefix_matrix(exp: Experiment) -> LossMatrix:
    """The loss matrix of the experiment's sample heads (prefix_fraction), in the models' order."""
    paths = loss_table_paths(exp, prefix_corpus(exp))
    missing = [m for m, p in paths.items() if not p.exists()]
    if missing:
        raise UserError(f"no loss table of the sample heads for {missing}; fix: run `mcl run {exp.path}`")
    return load_matrix(list(paths.values()))


TOKEN_MIXTURES = "token_mixtures.json"


def token_mixtures(exp: Experiment, progress: bool = True, log=print) -> Path:
    """Per-token mixtures of each zoo family's seed-0 models (which share a tokenizer): every sample's NLL
    under the uniform mixture of the members' next-token probabilities and under the mixture whose weights
    EM fits on the other folds' samples, written with provenance to results/<experiment>/token_mixtures.json.
    Per-token losses are cached under the cache root (large, never committed); a family whose models' loss
    tables are those the file already holds is kept from it, so only changed families need their weights."""
    corpus = experiment_corpus(exp)
    matrix, _, _ = experiment_matrix(exp)
    cards = zoo.cards_table(matrix.models)
    inputs = matrix.cache_keys()
    path = exp.out_dir / TOKEN_MIXTURES
    before = json.loads(path.read_text()) if path.exists() else {}
    families = {}
    for family, group in cards[cards["seed"] == 0].groupby("family", sort=False):
        columns = group.index.to_numpy()
        kept = before.get("families", {}).get(family)
        if (kept and kept["models"] == [matrix.models[j] for j in columns] and before["n_folds"] == realizable.N_FOLDS
                and before["sample_ids"] == matrix.sample_ids.tolist()
                and all(before["inputs"].get(m) == inputs[m] for m in kept["models"])):
            families[family] = kept
            log(f"[mix]  {family}: cached ({path.name})")
            continue
        if len({tuple(matrix.n_tokens[:, j]) for j in columns}) != 1:
            raise UserError(f"the {family} models tokenize the samples differently; fix: give the family one "
                            "tokenizer")
        per_model = []
        for j in columns:
            losses = cached_token_losses(matrix.models[j], corpus, exp.scoring, progress=progress)
            sums = np.array([x.sum(dtype=np.float64) for x in losses])
            if not np.allclose(sums, matrix.nll_nats[:, j], rtol=1e-4, atol=1e-3):
                raise UserError(f"per-token losses of {matrix.models[j]} disagree with its loss table; fix: delete "
                                f"{cache_root() / 'tokens'} and rerun")
            per_model.append(losses)
        per_sample = [np.column_stack(parts) for parts in zip(*per_model)]
        uniform = np.full(len(columns), 1 / len(columns))
        em, weights = realizable.cross_fitted_token_mixture(per_sample)
        families[family] = {"models": [matrix.models[j] for j in columns], "em_weights": weights.tolist(),
                            "uniform_nll_nats": [realizable.token_mixture_nll(x, uniform) for x in per_sample],
                            "em_nll_nats": em.tolist()}
        log(f"[mix]  {family}: {len(columns)} models, EM weights {np.round(weights, 3).tolist()}")
    write_json(path, {"experiment": experiment_summary(exp), "sample_ids": matrix.sample_ids.tolist(),
                      "n_folds": realizable.N_FOLDS, "families": families, "inputs": inputs,
                      "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return path


# ---------------------------------------------------------------- executing notebooks


def _check_parameters(notebook: Path, parameters: dict) -> None:
    """Refuse parameters the notebook does not declare in its `parameters` cell."""
    import papermill

    declared = set(papermill.inspect_notebook(str(notebook)))
    unknown = set(parameters) - declared
    if unknown:
        raise UserError(f"{notebook.name} has no parameter(s) {sorted(unknown)}; fix: use {sorted(declared)}")


def _hide_parameter_cells(path: Path, key: str | None, outputs: tuple[Path, ...] = ()) -> None:
    """Tag papermill's parameter cells remove-input and record the stage's cache key and the sha256 of
    each results file it wrote (a stage that did not write one is an error)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if HIDDEN_TAGS & set(tags) and "remove-input" not in tags:
            cell.metadata["tags"] = tags + ["remove-input"]
    missing = [str(p) for p in outputs if not p.is_file()]
    if missing:
        raise UserError(f"notebook {path.name} ran but did not write {missing}; fix: make it write them")
    if key is not None:
        nb.metadata["mcl"] = {"cache_key": key, "outputs": {repo_relative(p): sha256_file(p) for p in outputs}}
    nbformat.write(nb, path)


class LocalKernelManager(AsyncKernelManager):
    """Kernels reached over IPC sockets in a private directory of this process, never over TCP; each kernel
    has a folder of its own, so kernels started side by side never pick the same socket names."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.transport = "ipc"
        self.ip = str(Path(tempfile.mkdtemp(dir=_socket_dir())) / "kernel")


@functools.cache
def _socket_dir() -> Path:
    """A private directory for kernel sockets, removed when the process exits (and, if it was killed,
    by the next run: the folder's name carries the owning process id)."""
    for stale in Path(tempfile.gettempdir()).glob("mcl-kernels-*"):
        owner = stale.name.split("-")[2]
        if owner.isdigit() and not _alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"mcl-kernels-{os.getpid()}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _alive(pid: int) -> bool:
    """True when a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def execute(notebook: Path, output: Path, parameters: dict, key: str | None = None,
            outputs: tuple[Path, ...] = ()) -> float:
    """Execute a notebook with papermill into `output`; a failure names the notebook and the cell."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    _check_parameters(notebook, parameters)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.stem}.running.ipynb")
    start = time.perf_counter()
    try:
        papermill.execute_notebook(str(notebook), str(tmp), parameters=parameters, kernel_name="python3",
                                   progress_bar=False, cwd=str(REPO_ROOT), kernel_manager_class=LocalKernelManager)
    except PapermillExecutionError as exc:
        failed = output.with_name(f"{output.stem}.failed.ipynb")
        os.replace(tmp, failed)
        raise UserError(f"notebook {notebook.name} failed in cell {exc.exec_count} ({exc.ename}: "
                        f"{str(exc.evalue).splitlines()[0][:300]}); fix: see {failed}") from None
    except BaseException:  # the kernel died or the run was interrupted: leave nothing half-written
        tmp.unlink(missing_ok=True)
        raise
    try:
        _hide_parameter_cells(tmp, key, outputs)
    except UserError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)
    return time.perf_counter() - start


def _source_fingerprint() -> str:
    """sha256 of the library's source: analyses are re-run when the code that computes them changes."""
    h = hashlib.sha256()
    for f in sorted((REPO_ROOT / "mcl_utils").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def repo_relative(path: Path) -> str:
    """A path as keys and records name it: relative to the repository where it lies inside it, so that the
    executed notebooks committed in one clone are current in another."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT.resolve())) if path.is_relative_to(REPO_ROOT.resolve()) else str(path)


def _stage_input_files(exp: Experiment, name: str) -> list[Path]:
    """Every file an analysis stage reads besides the loss tables: the corpus file and its own inputs."""
    corpus = exp.corpus.source
    files = [BROWN_PARQUET] if corpus == "brown" else [Path(corpus)] if Path(corpus).is_file() else []
    for pattern in STAGE_INPUTS.get(name, ()):
        files += sorted(REPO_ROOT.glob(pattern))
    if name in MERGING_ANALYSES:
        files += merging.study_files(exp.merging, exp.out_dir)
    return files


def analysis_key(exp: Experiment, notebook: Path, tables: dict[str, Path]) -> str:
    """Cache key of an analysis stage: its notebook, the experiment, its input tables (key and content),
    every other file it reads, and the library."""
    name = notebook.stem
    payload = {"notebook": hashlib.sha256(notebook.read_bytes()).hexdigest(),
               "experiment": hashlib.sha256(exp.path.read_bytes()).hexdigest(),
               "tables": {m: [prov["cache_key"], prov.get(CONTENT_KEY)]
                          for m, prov in ((m, read_provenance(p)) for m, p in tables.items())},
               "files": {repo_relative(f): sha256_file(f) for f in _stage_input_files(exp, name)},
               "library": _source_fingerprint()}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def stage_outputs(exp: Experiment, name: str) -> tuple[Path, ...]:
    """The results files an analysis stage writes."""
    return tuple(exp.out_dir / f for f in STAGE_OUTPUTS.get(name, ()))


def _is_cached(path: Path, key: str, outputs: tuple[Path, ...]) -> bool:
    """True when an executed notebook records `key` and every results file it wrote is unchanged."""
    if not path.exists():
        return False
    meta = nbformat.read(path, as_version=4).metadata.get("mcl", {})
    recorded = meta.get("outputs", {})
    return meta.get("cache_key") == key and set(recorded) == {repo_relative(p) for p in outputs} and all(
        p.is_file() and sha256_file(p) == recorded[repo_relative(p)] for p in outputs)


def notebook_parameters(exp: Experiment) -> dict:
    """The parameters every stage notebook takes: the experiment file and the results directory."""
    return {"experiment": str(exp.path), "results_dir": str(exp.results_dir)}


def score_in_notebooks(exp: Experiment, corpus: Corpus, force: bool = False, log=print, part: str = "full"
                       ) -> dict[str, Path]:
    """Score each model not cached by executing notebooks/score.ipynb, one model after another; part
    "prefix" scores the samples' heads."""
    params = notebook_parameters(exp)
    tables = {}
    for spec in exp.models:
        tgt = target(spec, corpus, exp.losses_dir, exp.scoring)
        label = spec if part == "full" else f"{spec} ({part})"
        if tgt.cached and not force:
            log(f"[score]  {label}: cached ({tgt.path.name})")
        else:
            suffix = "" if part == "full" else f"-{part}"
            output = exp.book_dir / f"score-{slug(parse_spec(spec).short_name)}{suffix}.ipynb"
            seconds = execute(NOTEBOOKS / "score.ipynb", output,
                              {**params, "model": spec, "force": force, "prefix": part == "prefix"})
            log(f"[score]  {label}: scored in {seconds:.0f} s")
        tables[spec] = tgt.path
    return tables


def run(exp: Experiment, force: bool = False, log=print, ray: str | None = None) -> None:
    """Train missing zoo models, score each model unless cached, then run each analysis unless cached,
    then the status page.

    With `ray` (a cluster address, or 'local' for an instance on this machine), the models are scored
    in parallel as Ray tasks (mcl_utils.cluster) instead of one notebook after another."""
    run_all([exp], force, log, ray)


def run_all(exps: list[Experiment], force: bool = False, log=print, ray: str | None = None) -> None:
    """Run several experiments: the training, scoring and merging study of each in turn (each uses every
    core), then the analysis stages of all of them side by side, slowest first, then their status pages."""
    stages = []
    for exp in exps:
        stages += pending_analyses(exp, prepare(exp, force, log, ray), force, log)
    execute_stages(stages, log, named=len(exps) > 1)
    changed = {stage.exp.path for stage in stages}
    status = []
    for exp in exps:
        output = exp.book_dir / "status.ipynb"
        if exp.path in changed or force or not output.exists():
            status.append(Stage(exp, "status", NOTEBOOKS / "status.ipynb", output, None, ()))
        else:
            log("[status] cached" + (f" ({exp.name})" if len(exps) > 1 else ""))
    execute_stages(status, log, named=len(exps) > 1)


def prepare(exp: Experiment, force: bool = False, log=print, ray: str | None = None) -> dict[str, Path]:
    """Everything before the analyses: train missing zoo models, score each model (and each sample's prefix,
    where asked) unless cached, run the merging study unless current; the loss tables by label."""
    zoo.ensure_trained(exp.models, device=exp.scoring.device, force=force, log=log, jobs=os.cpu_count() or 1)
    tables = {}
    for part, corpus in experiment_corpora(exp).items():
        if ray is None:
            scored = score_in_notebooks(exp, corpus, force, log, part)
        else:
            from mcl_utils.cluster import score_on_ray

            scored = score_on_ray(exp.models, corpus, exp.losses_dir, exp.scoring, force=force, address=ray,
                                  log=log)
        tables |= {spec if part == "full" else f"{spec} ({part})": path for spec, path in scored.items()}
    if exp.merging is not None:
        if force or not merging.study_is_current(exp.merging, exp.out_dir):
            merging.run_study(exp.merging, exp.out_dir, force=force, jobs=os.cpu_count() or 1, log=log)
        else:
            log("[merge]  study cached")
    return tables


@dataclass(frozen=True)
class Stage:
    """One notebook to execute for an experiment: where it comes from and goes, its cache key and results."""

    exp: Experiment
    name: str
    notebook: Path
    output: Path
    key: str | None
    outputs: tuple[Path, ...]


def pending_analyses(exp: Experiment, tables: dict[str, Path], force: bool = False, log=print) -> list[Stage]:
    """The experiment's analysis stages that are not cached (each cached one is logged)."""
    pending = []
    for name in exp.analyses:
        notebook, output = NOTEBOOKS / f"{name}.ipynb", exp.book_dir / f"{name}.ipynb"
        key, outputs = analysis_key(exp, notebook, tables), stage_outputs(exp, name)
        if not force and _is_cached(output, key, outputs):
            log(f"[{name}]  cached")
        else:
            pending.append(Stage(exp, name, notebook, output, key, outputs))
    return pending


def execute_stages(stages: list[Stage], log=print, named: bool = False) -> None:
    """Execute stages side by side, one kernel per core, the slowest kinds first (so that the last to
    start are short); the first failure is raised once the others finish. `named` adds each experiment's
    name to the progress lines."""
    if not stages:
        return
    slow_first = sorted(stages, key=lambda s: SLOWEST_FIRST.index(s.name) if s.name in SLOWEST_FIRST else
                        len(SLOWEST_FIRST))
    with ThreadPoolExecutor(min(len(stages), os.cpu_count() or 1)) as pool:
        running = {pool.submit(execute, s.notebook, s.output, notebook_parameters(s.exp), s.key, s.outputs): s
                   for s in slow_first}
        for done in as_completed(running):
            stage = running[done]
            log(f"[{stage.name}]" + (" " if stage.name == "status" else "  ") + f"executed in {done.result():.0f} s"
                + (f" ({stage.exp.name})" if named else ""))


# ---------------------------------------------------------------- the status page


def environment_report() -> pd.DataFrame:
    """Library versions, Python, platform and hardware of the machine that ran the analyses."""
    import torch

    rows = [("python", platform.python_version()), ("mcl_utils", mcl_utils.__version__),
            ("platform", platform.platform()), ("cpu cores", str(os.cpu_count())),
            ("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")]
    rows += [(lib, importlib.metadata.version(lib)) for lib in LIBRARY_VERSIONS]
    return pd.DataFrame(rows, columns=["item", "version"])


def execution_report(book_dir: Path) -> pd.DataFrame:
    """Execution time and date of every executed stage notebook of an experiment (papermill metadata).

    The status notebook itself is left out: it is still running when it reads this."""
    rows = []
    for path in sorted(book_dir.glob("[!.]*.ipynb")):
        if path.name == "status.ipynb" or path.name.endswith(".failed.ipynb"):
            continue
        meta = nbformat.read(path, as_version=4).metadata.get("papermill", {})
        rows.append({"notebook": path.name, "seconds": round(meta.get("duration") or 0.0, 1),
                     "finished": meta.get("end_time", "")})
    return pd.DataFrame(rows)


def provenance_report(paths: dict[str, Path]) -> pd.DataFrame:
    """Provenance of each loss table: model revision, corpus, device, wall time and speed."""
    rows = []
    for spec, path in paths.items():
        prov = read_provenance(path)
        rows.append({"model": spec, "file": repo_relative(path),
                     "revision / sha256": prov["model"]["revision"][:16], "dtype": prov["model"]["dtype"],
                     "corpus fingerprint": prov["corpus"]["fingerprint"][:16],
                     "samples": prov["corpus"]["n_samples"], "device": prov["device"],
                     "tokens/s": round(prov["tokens_per_s"] or 0), "wall s": round(prov["wall_time_s"]),
                     "scored": prov["created_utc"], "cache key": prov["cache_key"][:16]})
    return pd.DataFrame(rows)


def training_report(exp: Experiment) -> pd.DataFrame:
    """Provenance of each zoo model of the experiment, from its committed card (empty if it has none)."""
    rows = []
    for spec in exp.models:
        card = zoo.read_card(spec.removeprefix("zoo:")) if spec.startswith("zoo:") else None
        if card is not None:
            rows.append({"model": spec, "card": f"results/zoo/{card['name']}.json", "device": card["device"],
                         "precision": card["precision"], "tokens": card["tokens_seen"],
                         "wall s": round(card["wall_time_s"]), "tokens/s": round(card["tokens_per_s"] or 0),
                         "recipe hash": card["recipe_hash"][:16], "weights sha256": card["weights_sha256"][:16],
                         "trained": card["created_utc"]})
    return pd.DataFrame(rows)


def experiment_summary(exp: Experiment) -> dict:
    """The experiment as plain data, for provenance JSON."""
    return {"name": exp.name, "file": exp.path.name, "models": list(exp.models),
            "corpus": dataclasses.asdict(exp.corpus), "scoring": dataclasses.asdict(exp.scoring),
            "bootstrap_resamples": exp.bootstrap_resamples,
            "experiment_sha256": hashlib.sha256(exp.path.read_bytes()).hexdigest()}


def _nan_to_none(value: object) -> object:
    """JSON has no NaN: missing numbers become null, recursively."""
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and value != value else value


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (strict JSON: NaN is written as null)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_nan_to_none(data), indent=2, sort_keys=True, allow_nan=False) + "\n")

