"""``brat-harness validate``: check a suite file without running any model."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="suite YAML file")
    parser.add_argument("--no-images", action="store_true", help="check manifests without opening image files")


def run(args: argparse.Namespace) -> int:
    from harness.suite import SuiteError, check_registered_names, load_suite

    try:
        suite = load_suite(args.suite)
    except SuiteError as error:
        print(f"invalid suite: {error}")
        return 1
    problems = check_registered_names(suite)
    for dataset in suite.datasets.values():
        problems.extend(_check_dataset(suite, dataset, images=not args.no_images))
    if problems:
        print(f"{suite.path}: {len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    n_jobs = len(suite.tasks) * len(suite.models) * len(suite.seeds)
    print(
        f"{suite.path}: valid suite {suite.name!r}: {len(suite.models)} models, {len(suite.datasets)} datasets, "
        f"{len(suite.pretrain)} pretraining jobs, {n_jobs} evaluation jobs"
    )
    return 0


def _check_dataset(suite, dataset, images: bool) -> list[str]:
    """Return problems of one dataset: manifest checks and subject-disjoint splits.

    Cohort and adapter datasets that are not generated yet are checked by their
    parameters only (done by :func:`harness.suite.load_suite`).
    """
    if dataset.source != "manifest":
        return []
    from harness.checks import check_manifest, check_split_integrity
    from harness.manifest import read_manifest

    where = f"{suite.path}: datasets.{dataset.name}"
    manifest = dataset.args["manifest"]
    try:
        problems = [f"{where}: {problem}" for problem in check_manifest(manifest, check_images=images)]
        problems += [f"{where}: {problem}" for problem in check_split_integrity(read_manifest(manifest))]
    except (OSError, ValueError) as error:
        return [f"{where}: {error}"]
    splits = {task.split for task in suite.tasks if task.dataset == dataset.name}
    if not problems:
        present = set(read_manifest(manifest)["split"].astype(str))
        problems += [f"{where}: split {split!r} used by a task is not in {manifest}; splits: {sorted(present)}" for split in sorted(splits - present)]
    return problems
