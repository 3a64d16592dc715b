"""Suite runner: plans content-hashed jobs, runs them in dependency order, writes results.

Stages, each a set of independent jobs handed to an executor:

1. datasets: synthetic cohorts and adapter conversions (manifest datasets need no job);
2. pretraining: each ``pretrain`` entry becomes a checkpoint through :data:`PRETRAINERS`;
3. evaluation: one job per (model x task entry x seed);
4. compare: paired tests of every model against the suite's baseline, from the stored
   per-sample scores, then ``results.jsonl`` and ``run.json``.

Every job has a content hash and a folder ``RUN_DIR/jobs/<hash>/`` holding ``job.json``
(its configuration), its outputs, and ``done.json``, written last. A rerun skips jobs with
a ``done.json``, so an interrupted run resumes where it stopped. A failing job writes
``error.json`` (type, message, traceback) and the other jobs continue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import __version__
from harness.io import write_json_atomic
from harness.registry import Registry
from harness.results import (
    JOB_RESULT_FILE,
    RESULTS_FILE,
    ResultRecord,
    format_signature,
    package_versions,
    read_records,
    write_records,
)

logger = logging.getLogger(__name__)

# name -> pretrain(config_dict, out_dir) -> checkpoint folder. ``config_dict`` is the suite's
# pretrain entry (config, objective, epochs, ...) plus ``manifest`` (path), ``name`` and,
# unless the entry sets it, ``cache_dir`` (a folder shared by the run's pretraining jobs).
PretrainFunction = Callable[[dict[str, Any], Path], Path]
PRETRAINERS: Registry[PretrainFunction] = Registry("pretrainer")

DONE_FILE = "done.json"
ERROR_FILE = "error.json"
JOB_FILE = "job.json"
RUN_FILE = "run.json"


@dataclass(frozen=True)
class Job:
    """One unit of work: ``kind`` is ``dataset``, ``pretrain``, ``model`` or ``eval``."""

    kind: str
    name: str
    hash: str
    config: dict = field(hash=False, compare=False)

    def __str__(self) -> str:
        return f"{self.kind} job {self.name!r} ({self.hash[:12] or 'not planned'})"


@dataclass
class JobOutcome:
    """``status`` is ``done`` (ran now), ``cached`` (done before), ``failed`` or ``blocked``."""

    job: Job
    status: str
    output: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "cached")


@dataclass
class RunContext:
    """Settings shared by every job of a run (picklable, so Ray tasks receive it)."""

    run_dir: Path
    cache_dir: Path
    run_id: str
    suite_name: str
    batch_size: int = 2
    workers: int = 0
    versions: dict[str, str | None] = field(default_factory=dict)


@dataclass
class RunSummary:
    run_dir: Path
    records: list[ResultRecord]
    outcomes: list[JobOutcome]

    @property
    def failed(self) -> list[JobOutcome]:
        return [outcome for outcome in self.outcomes if not outcome.ok]


def content_hash(obj: Any) -> str:
    """Return the sha256 of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    from harness.cache import sha256_file

    return sha256_file(path)


def job_dir(run_dir: Path, job_hash: str) -> Path:
    return Path(run_dir) / "jobs" / job_hash


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- job execution


def execute_job(job: Job, context: RunContext) -> JobOutcome:
    """Run one job unless its ``done.json`` exists.

    An exception inside the job becomes a failed outcome with ``error.json``;
    ``KeyboardInterrupt`` and ``SystemExit`` still propagate.
    """
    directory = job_dir(context.run_dir, job.hash)
    done = directory / DONE_FILE
    if done.is_file():
        logger.info("%s: done in an earlier run, skipped", job)
        return JobOutcome(job, "cached", json.loads(done.read_text(encoding="utf-8"))["output"])
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / JOB_FILE, {"kind": job.kind, "name": job.name, "hash": job.hash, "config": job.config})
    (directory / ERROR_FILE).unlink(missing_ok=True)
    logger.info("%s: started", job)
    try:
        from harness.plugins import load_plugins

        load_plugins()
        output = JOB_FUNCTIONS[job.kind](job, directory, context)
    except Exception as error:  # noqa: BLE001 - recorded in error.json; the other jobs continue
        return record_failure(job, context, error, traceback.format_exc())
    write_json_atomic(done, {"hash": job.hash, "kind": job.kind, "name": job.name, "output": output, "finished": _now()})
    logger.info("%s: done", job)
    return JobOutcome(job, "done", output)


def record_failure(job: Job, context: RunContext, error: BaseException, trace: str) -> JobOutcome:
    """Write ``error.json`` for a failed job and return its outcome."""
    message = f"{type(error).__name__}: {error}"
    logger.error("%s: failed: %s", job, message)
    if job.hash:
        write_json_atomic(
            job_dir(context.run_dir, job.hash) / ERROR_FILE,
            {"type": type(error).__name__, "message": str(error), "traceback": trace, "job": job.name, "time": _now()},
        )
    return JobOutcome(job, "failed", error=message)


def _run_dataset_job(job: Job, directory: Path, context: RunContext) -> dict[str, Any]:
    source, args = job.config["source"], dict(job.config["args"])
    out_dir = directory / "data"
    if source == "cohort":
        from harness.cohort import generate_cohort

        options = {"sequences": args["sequences"]} if args.get("sequences") else {}
        # The cohort is byte-identical for any worker count, so use the cores there are.
        workers = min(8, os.cpu_count() or 1)
        result = generate_cohort(out_dir, n_studies=args["n"], seed=args["seed"], workers=workers, progress=True, **options)
        manifest = _manifest_in(result, out_dir)
    else:
        from harness.adapters import ADAPTERS

        adapter = ADAPTERS.get(args.pop("adapter"))
        manifest = adapter.build(out_dir, **args).manifest
    return {"manifest": str(manifest), "digest": file_sha256(manifest)}


def _manifest_in(result: Any, out_dir: Path) -> Path:
    """Find the manifest a cohort generator wrote: its return value, or a manifest file in ``out_dir``."""
    candidate = getattr(result, "manifest", result)
    if isinstance(candidate, (str, Path)) and Path(candidate).is_file():
        return Path(candidate)
    for name in ("manifest.csv", "manifest.tsv", "manifest.jsonl", "manifest.parquet"):
        if (out_dir / name).is_file():
            return out_dir / name
    raise FileNotFoundError(f"the cohort generator wrote no manifest file into {out_dir}")


def _run_pretrain_job(job: Job, directory: Path, context: RunContext) -> dict[str, Any]:
    config = dict(job.config["config"], manifest=job.config["manifest"], name=job.name)
    # Pretraining jobs of one run share preprocessed arrays and sentence features, which
    # the trainer keys by spec and text-encoder digest; the entry's own cache_dir wins.
    config.setdefault("cache_dir", str(context.cache_dir / "pretrain"))
    checkpoint = PRETRAINERS.get(job.config["trainer"])(config, directory / "checkpoint")
    return {"checkpoint": str(checkpoint)}


def _run_eval_job(job: Job, directory: Path, context: RunContext) -> dict[str, Any]:
    from harness.cache import EmbeddingCache
    from harness.results import write_per_sample
    from harness.tasks import get_task

    config = job.config
    encoder = cached_encoder(config["model_kind"], config["model_args"])
    if encoder.digest != config["model_digest"]:
        raise RuntimeError(f"model {config['model']!r} changed since the run was planned (digest {encoder.digest[:12]}, planned {config['model_digest'][:12]}); rerun the suite")
    dataset = load_eval_dataset(config["dataset"], config["manifest"], config["dataset_digest"])
    cache = EmbeddingCache(context.cache_dir, batch_size=context.batch_size, workers=context.workers)
    params = dict(config["params"], n_resamples=config["n_resamples"])
    output = get_task(config["task"]).run(encoder, dataset, config["split"], params, config["seed"], cache)

    records = [_make_record(job, metric, context) for metric in output.metrics]
    write_per_sample(directory, output.per_sample)
    write_records(directory / JOB_RESULT_FILE, records)
    return {"n_records": len(records), "n_samples": int(len(output.per_sample))}


def _make_record(job: Job, metric: Any, context: RunContext) -> ResultRecord:
    config = job.config
    return ResultRecord(
        run_id=context.run_id,
        suite=context.suite_name,
        job_hash=job.hash,
        config_hash=config["config_hash"],
        model=config["model"],
        model_digest=config["model_digest"],
        task=config["task"],
        dataset=config["dataset"],
        split=config["split"],
        metric=metric.metric,
        value=float(metric.value),
        ci_low=None if metric.ci_low is None else float(metric.ci_low),
        ci_high=None if metric.ci_high is None else float(metric.ci_high),
        n=int(metric.n),
        n_units=int(metric.n_units),
        seed=int(config["seed"]),
        higher_is_better=bool(metric.higher_is_better),
        signature=format_signature(config["task"], metric.metric, metric.n_resamples, metric.unit, config["seed"]),
        versions=dict(context.versions),
    )


JOB_FUNCTIONS: dict[str, Callable[[Job, Path, RunContext], dict[str, Any]]] = {
    "dataset": _run_dataset_job,
    "pretrain": _run_pretrain_job,
    "eval": _run_eval_job,
}

_ENCODERS: dict[str, Any] = {}


def cached_encoder(kind: str, args: dict[str, Any]):
    """Load an encoder once per process and reuse it for all its jobs."""
    from harness.encoders import load_encoder

    key = content_hash({"kind": kind, "args": args})
    if key not in _ENCODERS:
        _ENCODERS[key] = load_encoder(kind, **args)
    return _ENCODERS[key]


def load_eval_dataset(name: str, manifest: str | Path, digest: str | None = None):
    """Read a manifest into an :class:`harness.tasks.EvalDataset`; a changed file raises."""
    from harness.manifest import read_manifest
    from harness.tasks import EvalDataset

    actual = file_sha256(manifest)
    if digest is not None and actual != digest:
        raise RuntimeError(f"manifest {manifest} changed since the run was planned; rerun the suite")
    return EvalDataset(name=name, manifest=Path(manifest), frame=read_manifest(manifest), digest=actual)


# ----------------------------------------------------------------------------- planning and stages


def _dataset_stage(suite, context: RunContext, executor, outcomes: list[JobOutcome]) -> dict[str, dict[str, str]]:
    """Prepare every dataset; returns name -> {manifest, digest} for the ones that are ready."""
    ready: dict[str, dict[str, str]] = {}
    jobs = []
    for entry in suite.datasets.values():
        if entry.source == "manifest":
            ready[entry.name] = {"manifest": entry.args["manifest"], "digest": file_sha256(entry.args["manifest"])}
            continue
        identity = {"kind": "dataset", "source": entry.source, "args": entry.args, "version": __version__}
        jobs.append(Job("dataset", entry.name, content_hash(identity), {"source": entry.source, "args": entry.args}))
    for outcome in executor.map(execute_job, jobs, context, on_error=_failure_handler(context)):
        outcomes.append(outcome)
        if outcome.ok:
            ready[outcome.job.name] = {"manifest": outcome.output["manifest"], "digest": outcome.output["digest"]}
    for name, dataset in ready.items():
        _require_disjoint_splits(name, dataset["manifest"])
    return ready


def _require_disjoint_splits(name: str, manifest: str | Path) -> None:
    """Raise ``ValueError`` before any job runs if a subject of ``manifest`` is in two splits."""
    from harness.checks import check_split_integrity
    from harness.manifest import read_manifest

    problems = check_split_integrity(read_manifest(manifest))
    if problems:
        details = "; ".join(str(problem) for problem in problems)
        raise ValueError(f"dataset {name!r} ({manifest}): {details}. No job was run; fix the splits first")


def _pretrain_stage(suite, datasets: dict, context: RunContext, executor, outcomes: list[JobOutcome]) -> dict[str, str]:
    """Run the pretraining jobs whose dataset is ready; returns name -> checkpoint folder."""
    jobs = []
    for entry in suite.pretrain.values():
        if entry.dataset not in datasets:
            outcomes.append(_blocked("pretrain", entry.name, f"dataset {entry.dataset!r} is not available"))
            continue
        dataset = datasets[entry.dataset]
        identity = {"kind": "pretrain", "trainer": entry.trainer, "config": entry.config, "dataset": dataset["digest"], "version": __version__}
        config = {"trainer": entry.trainer, "config": entry.config, "dataset": entry.dataset, "manifest": dataset["manifest"], "dataset_digest": dataset["digest"]}
        jobs.append(Job("pretrain", entry.name, content_hash(identity), config))
    checkpoints = {}
    for outcome in executor.map(execute_job, jobs, context, on_error=_failure_handler(context)):
        outcomes.append(outcome)
        if outcome.ok:
            checkpoints[outcome.job.name] = outcome.output["checkpoint"]
    return checkpoints


def _resolve_models(suite, checkpoints: dict[str, str], context: RunContext, outcomes: list[JobOutcome]) -> dict[str, dict]:
    """Load each model once to read its digest; returns name -> {kind, args, digest}."""
    models = {}
    for entry in suite.models.values():
        args = dict(entry.args)
        if entry.pretrain is not None:
            if entry.pretrain not in checkpoints:
                outcomes.append(_blocked("model", entry.name, f"pretraining job {entry.pretrain!r} did not produce a checkpoint"))
                continue
            args["path"] = checkpoints[entry.pretrain]
        job = Job("model", entry.name, content_hash({"kind": entry.kind, "args": args}), {"kind": entry.kind, "args": args})
        try:
            encoder = cached_encoder(entry.kind, args)
        except Exception as error:  # noqa: BLE001 - recorded; the other models still run
            job_dir(context.run_dir, job.hash).mkdir(parents=True, exist_ok=True)
            outcomes.append(record_failure(job, context, error, traceback.format_exc()))
            continue
        models[entry.name] = {"kind": entry.kind, "args": args, "digest": encoder.digest}
    return models


def plan_eval_jobs(suite, datasets: dict, models: dict, outcomes: list[JobOutcome]) -> list[Job]:
    """Return one evaluation job per (task entry x model x seed) whose inputs are ready."""
    jobs = []
    for entry in suite.tasks:
        task_config = {"task": entry.task, "split": entry.split, "params": entry.params, "n_resamples": suite.n_resamples}
        config_hash = content_hash(task_config)
        for model_name in suite.models:
            for seed in suite.seeds:
                label = f"{entry.task}/{entry.dataset}/{entry.split} {model_name} seed {seed}"
                if entry.dataset not in datasets or model_name not in models:
                    missing = f"dataset {entry.dataset!r}" if entry.dataset not in datasets else f"model {model_name!r}"
                    outcomes.append(_blocked("eval", label, f"{missing} is not available"))
                    continue
                dataset, model = datasets[entry.dataset], models[model_name]
                identity = {"kind": "eval", **task_config, "dataset": dataset["digest"], "model": model_name, "model_digest": model["digest"], "seed": seed, "version": __version__}
                config = {
                    **task_config, "config_hash": config_hash, "dataset": entry.dataset, "manifest": dataset["manifest"],
                    "dataset_digest": dataset["digest"], "model": model_name, "model_kind": model["kind"],
                    "model_args": model["args"], "model_digest": model["digest"], "seed": seed,
                }
                jobs.append(Job("eval", label, content_hash(identity), config))
    return jobs


def _blocked(kind: str, name: str, reason: str) -> JobOutcome:
    logger.error("%s job %r not run: %s", kind, name, reason)
    return JobOutcome(Job(kind, name, "", {}), "blocked", error=reason)


def _failure_handler(context: RunContext) -> Callable[[Job, BaseException, str], JobOutcome]:
    def handle(job: Job, error: BaseException, trace: str) -> JobOutcome:
        return record_failure(job, context, error, trace)

    return handle


# ----------------------------------------------------------------------------- compare step


def compare_with_baseline(records: list[ResultRecord], run_dir: Path, baseline: str | None, n_resamples: int) -> list[ResultRecord]:
    """Fill ``baseline``, ``delta_vs_baseline`` and ``p_value`` from stored per-sample scores.

    A record is compared with the baseline model's record of the same task config,
    dataset, split, seed and metric. Metrics that are means over samples get a paired
    bootstrap test over the queries of both models (units: subjects). Other metrics
    (medians) get the difference of values and no p-value.
    """
    if baseline is None:
        return records
    from harness.tasks import get_task

    by_key = {_comparison_key(r): r for r in records if r.model == baseline}
    per_sample_cache: dict[str, Any] = {}
    for record in records:
        record.baseline = baseline
        reference = by_key.get(_comparison_key(record))
        if record.model == baseline or reference is None:
            continue
        record.delta_vs_baseline = record.value - reference.value
        task = get_task(record.task)
        ours = task.sample_values(_per_sample(run_dir, record.job_hash, per_sample_cache), record.metric)
        theirs = task.sample_values(_per_sample(run_dir, reference.job_hash, per_sample_cache), record.metric)
        if ours is None or theirs is None:
            continue
        result = _paired(ours.frame, theirs.frame, n_resamples, record)
        if result is not None:
            record.delta_vs_baseline, record.p_value = float(result.delta), float(result.p_value)
    return records


def _comparison_key(record: ResultRecord) -> tuple:
    return (record.task, record.config_hash, record.dataset, record.split, record.seed, record.metric)


def _per_sample(run_dir: Path, job_hash: str, cache: dict[str, Any]):
    from harness.results import read_per_sample

    if job_hash not in cache:
        cache[job_hash] = read_per_sample(job_dir(run_dir, job_hash))
    return cache[job_hash]


def _paired(ours, theirs, n_resamples: int, record: ResultRecord):
    """Paired bootstrap test of ``ours - theirs`` on the samples both contain, or ``None``."""
    from harness.stats import paired_test

    merged = ours.merge(theirs, on="key", suffixes=("", "_baseline"))
    if len(merged) != len(ours) or len(merged) != len(theirs):
        logger.warning(
            "%s %s: %d of %d/%d samples pair with the baseline; no paired test",
            record.model, record.metric, len(merged), len(ours), len(theirs),
        )
        return None
    return paired_test(
        merged["value"].to_numpy(float), merged["value_baseline"].to_numpy(float), merged["unit"].to_numpy(),
        n_resamples=n_resamples, seed=record.seed,
    )


# ----------------------------------------------------------------------------- run


def run_suite(
    suite_path: str | Path,
    out_dir: str | Path,
    *,
    executor: str = "local",
    cache_dir: str | Path | None = None,
    batch_size: int = 2,
    workers: int = 0,
) -> RunSummary:
    """Run a suite into ``out_dir`` (resuming a previous run there) and return its summary.

    Raises :class:`harness.suite.SuiteError` for an invalid suite before any job runs.
    """
    from harness.executors import make_executor
    from harness.suite import SuiteError, check_registered_names, load_suite

    suite = load_suite(suite_path)
    problems = check_registered_names(suite)
    if problems:
        raise SuiteError("\n".join(problems))
    run_dir = Path(out_dir).resolve()
    started = _now()
    context = RunContext(
        run_dir=run_dir,
        cache_dir=Path(cache_dir).resolve() if cache_dir else run_dir / "cache",
        run_id=f"{suite.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{suite.digest[:8]}",
        suite_name=suite.name,
        batch_size=batch_size,
        workers=workers,
        versions=package_versions(),
    )
    _write_run_json(context, suite, executor, started, None, [])
    logger.info("run %s of suite %s into %s (executor %s)", context.run_id, suite.path, run_dir, executor)

    outcomes: list[JobOutcome] = []
    runner = make_executor(executor)
    try:
        datasets = _dataset_stage(suite, context, runner, outcomes)
        checkpoints = _pretrain_stage(suite, datasets, context, runner, outcomes)
        models = _resolve_models(suite, checkpoints, context, outcomes)
        eval_jobs = plan_eval_jobs(suite, datasets, models, outcomes)
        outcomes.extend(runner.map(execute_job, eval_jobs, context, on_error=_failure_handler(context)))
    finally:
        runner.close()

    records = []
    for outcome in outcomes:
        if outcome.ok and outcome.job.kind == "eval":
            records.extend(read_records(job_dir(run_dir, outcome.job.hash) / JOB_RESULT_FILE))
    records = compare_with_baseline(records, run_dir, suite.baseline, suite.n_resamples)
    write_records(run_dir / RESULTS_FILE, records)
    _write_run_json(context, suite, executor, started, _now(), outcomes)
    summary = RunSummary(run_dir, records, outcomes)
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "cached", "failed", "blocked")}
    logger.info("run %s finished: %d records; jobs %s", context.run_id, len(records), counts)
    return summary


def _write_run_json(context: RunContext, suite, executor: str, started: str, finished: str | None, outcomes: list[JobOutcome]) -> None:
    write_json_atomic(
        context.run_dir / RUN_FILE,
        {
            "run_id": context.run_id,
            "suite": suite.name,
            "suite_path": str(suite.path),
            "suite_hash": suite.digest,
            "executor": executor,
            "cache_dir": str(context.cache_dir),
            "started": started,
            "finished": finished,
            "versions": context.versions,
            "baseline": suite.baseline,
            "jobs": [
                {"kind": o.job.kind, "name": o.job.name, "hash": o.job.hash, "status": o.status, "error": o.error}
                for o in outcomes
            ],
        },
    )
