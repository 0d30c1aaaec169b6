"""Scoring on a Ray cluster: one task per model, each writing its loss table into the shared results directory.

Every task calls `scoring.score_model`, so a table is written exactly as a serial run writes it: the same
file, cache key, provenance and checkpoints. A model whose table is cached is not sent to Ray; a task
that fails (an error, a killed worker, a lost node) is reported with its model's name after the others
have finished, and rerunning the same command rescores only what is missing, resuming from the failed
task's last checkpointed batch. On a cluster of several nodes, the results directory must be on a disk
that every node mounts at the same path, and every node needs this project's environment.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from mcl_utils.corpus import Corpus
from mcl_utils.errors import UserError
from mcl_utils.scoring import ScoringSettings, score_model, target

LOCAL = "local"  # the address that means: start a Ray instance on this machine for this run
RAY_INSTALL = "pip install -c requirements/lock.txt -e '.[ray]' (or make setup)"


def _import_ray():
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs Ray, which is not installed; fix: {RAY_INSTALL}") from None
    return ray


def _reachable(address: str, timeout_s: float = 10.0) -> bool:
    """Whether a HOST:PORT address accepts TCP connections (Ray itself retries an unreachable one for
    minutes); other forms, such as 'auto', are left for Ray to resolve."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return True
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def connect(address: str = LOCAL) -> Iterator[object]:
    """Yield the ray module connected to `address` ('local' starts an instance here, shut down afterwards).

    An instance this process already initialized is used as it is and left running."""
    ray = _import_ray()
    if ray.is_initialized():
        yield ray
        return
    fix = ("fix: start it with `ray start --head` and pass its address (HOST:6379, or auto for the cluster this "
           "machine belongs to), or pass --ray alone for a local instance")
    if not _reachable(address):
        raise UserError(f"cannot connect to the Ray cluster at {address!r} (nothing answers there); {fix}")
    try:
        if address == LOCAL:
            ray.init(address=LOCAL, include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot connect to the Ray cluster at {address!r} ({str(exc).splitlines()[0][:200]}); "
                        f"{fix}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _score_task(spec: str, corpus: Corpus, out_dir: Path, settings: ScoringSettings, force: bool) -> dict:
    """One model's scoring, as a Ray worker runs it: the table's path, the worker and the seconds spent."""
    start = time.perf_counter()
    path = score_model(spec, corpus, out_dir, settings, force=force, progress=False)
    return {"path": str(path), "seconds": time.perf_counter() - start,
            "worker": f"{socket.gethostname()} pid {os.getpid()}"}


def _failure(ray: object, exc: Exception) -> str:
    """What went wrong in a task, in one line: the worker's own error when it raised one."""
    cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) else exc
    if isinstance(cause, UserError):
        return str(cause)
    return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:300]}"


def _check_keys_agree(settings: ScoringSettings, cluster_has_gpus: bool) -> None:
    """Refuse settings whose cache key would differ between this machine and the cluster's workers."""
    if settings.dtype == "auto" and settings.device == "auto" and cluster_has_gpus != torch.cuda.is_available():
        raise UserError("scoring dtype 'auto' resolves differently on this machine and on the Ray workers "
                        "(bfloat16 on GPUs, float32 on CPUs), so their cache keys would disagree; fix: set "
                        "dtype: bfloat16 (or float32) under scoring: in the experiment")


def score_on_ray(specs: Sequence[str], corpus: Corpus, out_dir: Path, settings: ScoringSettings = ScoringSettings(),
                 force: bool = False, address: str = LOCAL, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Score each model whose table is not cached as one Ray task, logging each model as it finishes.

    A task takes `settings.gpus_for(spec)` GPUs of one node when the cluster has GPUs (several: the model
    is spread over them with device_map="auto"), else one CPU. Returns every model's table path."""
    out_dir = Path(out_dir).resolve()
    paths, pending = {}, []
    for spec in specs:
        tgt = target(spec, corpus, out_dir, settings)
        paths[spec] = tgt.path
        if tgt.cached and not force:
            log(f"[score]  {spec}: cached ({tgt.path.name})")
        else:
            pending.append(spec)
    if not pending:
        return paths
    failures = []
    with connect(address) as ray:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0 and settings.device != "cpu"
        _check_keys_agree(settings, has_gpus)
        task = ray.remote(_score_task)
        corpus_ref = ray.put(corpus)
        running = {task.options(name=f"score {spec}", num_cpus=1, num_gpus=settings.gpus_for(spec) if has_gpus
                                else 0, max_retries=0).remote(spec, corpus_ref, out_dir, settings, force): spec
                   for spec in pending}
        waiting = list(running)
        while waiting:
            (ref,), waiting = ray.wait(waiting, num_returns=1)
            spec = running[ref]
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as exc:
                reason = _failure(ray, exc)
                failures.append(f"{spec} ({reason})")
                log(f"[score]  {spec}: FAILED ({reason})")
                continue
            if Path(result["path"]) != paths[spec]:
                failures.append(f"{spec} (the worker wrote {Path(result['path']).name}, this machine expects "
                                f"{paths[spec].name}: library versions or dtype differ between them)")
            log(f"[score]  {spec}: scored in {result['seconds']:.0f} s on {result['worker']}")
    if failures:
        raise UserError(f"{len(failures)} of {len(pending)} model(s) failed on Ray: {'; '.join(failures)}; fix: "
                        "remove the cause, then run the same command again (finished models are cached, an "
                        "interrupted one resumes from its last checkpointed batch)")
    return paths
