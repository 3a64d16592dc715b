"""Suite files: which models run which tasks on which datasets, with which seeds.

A suite is a YAML file::

    name: demo
    models:                       # name -> encoder loader kind and its arguments
      brat-pva: {kind: brat, pretrain: pva}          # checkpoint from a pretraining job
      brat-ckpt: {kind: brat, path: checkpoints/x}   # checkpoint folder
      random: {kind: brat-random, config: brat-tiny, seed: 0}
    datasets:                     # exactly one of manifest, adapter or cohort each
      cohort: {cohort: {n: 64, seed: 0, sequences: [t1c, t1, t2, flair]}}
      inhouse: {manifest: data/manifest.csv}
      bimcv: {adapter: bimcv-r, root: /data/BIMCV-R}
    pretrain:                     # jobs whose checkpoints models can reference
      pva: {config: brat-tiny, objective: pva, dataset: cohort, epochs: 2}
    tasks:
      - {task: retrieval, dataset: cohort, split: test, params: {}}
    seeds: [0]
    baseline: brat-pva            # paired comparisons run against this model
    bootstrap: 1000               # or {n_resamples: 1000}

Relative paths resolve against the suite file's folder. :func:`load_suite` checks the
structure and the cross references; :func:`check_registered_names` checks that model
kinds, tasks and adapters are registered (it loads plugins).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("name", "description", "models", "datasets", "pretrain", "tasks", "seeds", "baseline", "bootstrap")
DATASET_SOURCES = ("manifest", "adapter", "cohort")
DEFAULT_N_RESAMPLES = 1000
# Model and adapter arguments that name files or folders; relative values resolve against the suite folder.
PATH_ARGUMENTS = ("path", "root", "manifest", "csv", "table", "reports", "splits")


class SuiteError(ValueError):
    """An invalid suite file; the message names the file, the key path and the value."""


@dataclass
class ModelEntry:
    name: str
    kind: str
    args: dict[str, Any]
    pretrain: str | None = None


@dataclass
class DatasetEntry:
    """A dataset source: ``source`` is ``manifest``, ``adapter`` or ``cohort``; ``args`` its settings."""

    name: str
    source: str
    args: dict[str, Any]


@dataclass
class PretrainEntry:
    name: str
    dataset: str
    trainer: str
    config: dict[str, Any]


@dataclass
class TaskEntry:
    task: str
    dataset: str
    split: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    path: Path
    digest: str
    models: dict[str, ModelEntry]
    datasets: dict[str, DatasetEntry]
    pretrain: dict[str, PretrainEntry]
    tasks: list[TaskEntry]
    seeds: list[int]
    baseline: str | None
    n_resamples: int
    description: str = ""


def load_suite(path: str | Path) -> Suite:
    """Read and validate a suite file; raises :class:`SuiteError` on the first problem found."""
    path = Path(path).resolve()
    if not path.is_file():
        raise SuiteError(f"suite file {path} not found")
    raw_bytes = path.read_bytes()
    try:
        raw = yaml.safe_load(raw_bytes)
    except yaml.YAMLError as error:
        raise SuiteError(f"{path}: invalid YAML: {error}") from error
    check = _Checker(path)
    if not isinstance(raw, dict):
        check.fail("", raw, "the file must contain a mapping with the keys " + ", ".join(TOP_LEVEL_KEYS))
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            check.fail(str(key), raw[key], f"unknown key; allowed: {', '.join(TOP_LEVEL_KEYS)}")

    name = check.string(raw, "name", "name")
    datasets = _parse_datasets(check, raw.get("datasets"))
    pretrain = _parse_pretrain(check, raw.get("pretrain") or {}, datasets)
    models = _parse_models(check, raw.get("models"), pretrain)
    tasks = _parse_tasks(check, raw.get("tasks"), datasets)
    seeds = _parse_seeds(check, raw.get("seeds", [0]))
    baseline = raw.get("baseline")
    if baseline is not None and baseline not in models:
        check.fail("baseline", baseline, f"not a model of this suite; models: {sorted(models)}")
    return Suite(
        name=name,
        path=path,
        digest=hashlib.sha256(raw_bytes).hexdigest(),
        models=models,
        datasets=datasets,
        pretrain=pretrain,
        tasks=tasks,
        seeds=seeds,
        baseline=baseline,
        n_resamples=_parse_bootstrap(check, raw.get("bootstrap", DEFAULT_N_RESAMPLES)),
        description=str(raw.get("description", "")),
    )


class _Checker:
    """Helpers that raise :class:`SuiteError` with the file, the key path and the value."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key_path: str, value: Any, message: str) -> None:
        where = f"{self.path}: {key_path}" if key_path else str(self.path)
        raise SuiteError(f"{where}: {message} (got {value!r})")

    def mapping(self, value: Any, key_path: str, *, required: bool = True) -> dict:
        if value is None and not required:
            return {}
        if not isinstance(value, dict) or (required and not value):
            self.fail(key_path, value, "expected a non-empty mapping")
        return value

    def string(self, parent: Mapping, key: str, key_path: str) -> str:
        value = parent.get(key)
        if not isinstance(value, str) or not value.strip():
            self.fail(key_path, value, "expected a non-empty string")
        return value

    def integer(self, value: Any, key_path: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key_path, value, f"expected an integer >= {minimum}")
        return value

    def resolve(self, value: Any, key_path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(key_path, value, "expected a path (string)")
        candidate = Path(value).expanduser()
        return str(candidate if candidate.is_absolute() else (self.path.parent / candidate).resolve())


def _parse_datasets(check: _Checker, raw: Any) -> dict[str, DatasetEntry]:
    datasets = {}
    for name, entry in check.mapping(raw, "datasets").items():
        key_path = f"datasets.{name}"
        entry = check.mapping(entry, key_path)
        sources = [key for key in DATASET_SOURCES if key in entry]
        if len(sources) != 1:
            check.fail(key_path, entry, f"expected exactly one of {', '.join(DATASET_SOURCES)}")
        source = sources[0]
        if source == "manifest":
            extra = sorted(set(entry) - {"manifest"})
            if extra:
                check.fail(f"{key_path}.{extra[0]}", entry[extra[0]], "unknown key; a manifest dataset takes only 'manifest'")
            args = {"manifest": check.resolve(entry["manifest"], f"{key_path}.manifest")}
        elif source == "adapter":
            args = {"adapter": check.string(entry, "adapter", f"{key_path}.adapter")}
            for key, value in entry.items():
                if key != "adapter":
                    args[key] = check.resolve(value, f"{key_path}.{key}") if key in PATH_ARGUMENTS else value
        else:
            args = _parse_cohort(check, entry["cohort"], f"{key_path}.cohort")
        datasets[str(name)] = DatasetEntry(str(name), source, args)
    return datasets


def _parse_cohort(check: _Checker, raw: Any, key_path: str) -> dict[str, Any]:
    entry = check.mapping(raw, key_path)
    unknown = sorted(set(entry) - {"n", "seed", "sequences"})
    if unknown:
        check.fail(f"{key_path}.{unknown[0]}", entry[unknown[0]], "unknown key; allowed: n, seed, sequences")
    args: dict[str, Any] = {
        "n": check.integer(entry.get("n"), f"{key_path}.n", 2),
        "seed": check.integer(entry.get("seed", 0), f"{key_path}.seed", 0),
    }
    sequences = entry.get("sequences")
    if sequences is not None:
        if not isinstance(sequences, list) or not sequences or not all(isinstance(s, str) for s in sequences):
            check.fail(f"{key_path}.sequences", sequences, "expected a non-empty list of sequence names")
        args["sequences"] = list(sequences)
    return args


def _parse_pretrain(check: _Checker, raw: Any, datasets: Mapping[str, DatasetEntry]) -> dict[str, PretrainEntry]:
    jobs = {}
    for name, entry in check.mapping(raw, "pretrain", required=False).items():
        key_path = f"pretrain.{name}"
        entry = dict(check.mapping(entry, key_path))
        check.string(entry, "config", f"{key_path}.config")
        dataset = check.string(entry, "dataset", f"{key_path}.dataset")
        if dataset not in datasets:
            check.fail(f"{key_path}.dataset", dataset, f"not a dataset of this suite; datasets: {sorted(datasets)}")
        if "epochs" in entry:
            check.integer(entry["epochs"], f"{key_path}.epochs", 1)
        trainer = entry.pop("trainer", "brat")
        entry.pop("dataset")
        jobs[str(name)] = PretrainEntry(str(name), dataset, str(trainer), entry)
    return jobs


def _parse_models(check: _Checker, raw: Any, pretrain: Mapping[str, PretrainEntry]) -> dict[str, ModelEntry]:
    models = {}
    for name, entry in check.mapping(raw, "models").items():
        key_path = f"models.{name}"
        entry = dict(check.mapping(entry, key_path))
        kind = check.string(entry, "kind", f"{key_path}.kind")
        entry.pop("kind")
        job = entry.pop("pretrain", None)
        if job is not None and job not in pretrain:
            check.fail(f"{key_path}.pretrain", job, f"not a pretraining job of this suite; jobs: {sorted(pretrain)}")
        if job is not None and "path" in entry:
            check.fail(f"{key_path}.path", entry["path"], "give either 'path' or 'pretrain', not both")
        args = {key: check.resolve(value, f"{key_path}.{key}") if key in PATH_ARGUMENTS else value for key, value in entry.items()}
        models[str(name)] = ModelEntry(str(name), kind, args, job)
    return models


def _parse_tasks(check: _Checker, raw: Any, datasets: Mapping[str, DatasetEntry]) -> list[TaskEntry]:
    if not isinstance(raw, list) or not raw:
        check.fail("tasks", raw, "expected a non-empty list of {task, dataset, split, params}")
    tasks = []
    for index, entry in enumerate(raw):
        key_path = f"tasks[{index}]"
        entry = check.mapping(entry, key_path)
        unknown = sorted(set(entry) - {"task", "dataset", "split", "params"})
        if unknown:
            check.fail(f"{key_path}.{unknown[0]}", entry[unknown[0]], "unknown key; allowed: task, dataset, split, params")
        task = check.string(entry, "task", f"{key_path}.task")
        dataset = check.string(entry, "dataset", f"{key_path}.dataset")
        if dataset not in datasets:
            check.fail(f"{key_path}.dataset", dataset, f"not a dataset of this suite; datasets: {sorted(datasets)}")
        split = entry.get("split", "test")
        if not isinstance(split, str) or not split:
            check.fail(f"{key_path}.split", split, "expected a split name such as 'test'")
        params = check.mapping(entry.get("params"), f"{key_path}.params", required=False)
        tasks.append(TaskEntry(task, dataset, split, dict(params)))
    return tasks


def _parse_seeds(check: _Checker, raw: Any) -> list[int]:
    seeds = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if not isinstance(seeds, list) or not seeds:
        check.fail("seeds", raw, "expected an integer or a non-empty list of integers")
    for index, seed in enumerate(seeds):
        check.integer(seed, f"seeds[{index}]", 0)
    if len(set(seeds)) != len(seeds):
        check.fail("seeds", raw, "seeds must be distinct")
    return list(seeds)


def _parse_bootstrap(check: _Checker, raw: Any) -> int:
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - {"n_resamples"})
        if unknown:
            check.fail(f"bootstrap.{unknown[0]}", raw[unknown[0]], "unknown key; allowed: n_resamples")
        return check.integer(raw.get("n_resamples", DEFAULT_N_RESAMPLES), "bootstrap.n_resamples", 1)
    return check.integer(raw, "bootstrap", 1)


def check_registered_names(suite: Suite) -> list[str]:
    """Return one message per pretrainer, model kind, task, adapter or task parameter that is not known.

    It loads plugins first, so tasks and encoder loaders of installed plugins count as known.
    """
    from harness.adapters import ADAPTERS
    from harness.encoders import ENCODER_ARGUMENT_CHECKS, ENCODER_LOADERS
    from harness.plugins import load_plugins
    from harness.runner import PRETRAINERS
    from harness.tasks import TASKS

    load_plugins()
    problems = []
    for job in suite.pretrain.values():
        if job.trainer not in PRETRAINERS:
            problems.append(f"{suite.path}: pretrain.{job.name}.trainer: unknown pretrainer {job.trainer!r}; registered: {PRETRAINERS.names()}")
    for model in suite.models.values():
        if model.kind not in ENCODER_LOADERS:
            problems.append(f"{suite.path}: models.{model.name}.kind: unknown encoder loader {model.kind!r}; registered: {ENCODER_LOADERS.names()}")
        elif model.kind in ENCODER_ARGUMENT_CHECKS:
            for message in ENCODER_ARGUMENT_CHECKS.get(model.kind)(**model.args):
                problems.append(f"{suite.path}: models.{model.name}: {message}")
    for dataset in suite.datasets.values():
        if dataset.source == "adapter" and dataset.args["adapter"] not in ADAPTERS:
            problems.append(f"{suite.path}: datasets.{dataset.name}.adapter: unknown adapter {dataset.args['adapter']!r}; registered: {ADAPTERS.names()}")
    for index, entry in enumerate(suite.tasks):
        if entry.task not in TASKS:
            problems.append(f"{suite.path}: tasks[{index}].task: unknown task {entry.task!r}; registered: {TASKS.names()}")
            continue
        for message in TASKS.get(entry.task).check_params(entry.params):
            problems.append(f"{suite.path}: tasks[{index}].params: {message}")
    return problems
