"""Write a synthetic cohort to disk: NIfTI studies, findings, manifest and dataset description.

Output layout under ``out_dir``::

    studies/<study_id>/{t1c,t1,t2,flair}.nii.gz, seg.nii.gz, findings.json
    manifest.csv    one row per study, paths relative to out_dir
    dataset.json    name, seed, sequences, allowed label values, segmentation labels

Every file is written atomically, and gzip streams carry no time stamp or file name, so
the same (n_studies, seed, sequences) gives byte-identical files for any worker count.
A study whose ``findings.json`` (written last) matches the request is skipped on a rerun.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from harness.cohort.findings import StudySpec, sample_cohort
from harness.cohort.render import SEQUENCES
from harness.io import write_bytes_atomic, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
DATASET_NAME = "synthetic-brain"
MANIFEST_COLUMNS = (
    "study_id", "subject_id", "session", "split", *SEQUENCES,
    "report", "diagnosis", "age", "segmentation", "findings",
)  # fmt: skip
SEGMENTATION_LABELS = {"0": "background", "1": "necrotic core", "2": "edema", "3": "enhancing tumour"}
GZIP_LEVEL = 1


def generate_cohort(
    out_dir: str | os.PathLike[str],
    n_studies: int,
    seed: int = 0,
    sequences: Sequence[str] = SEQUENCES,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Generate ``n_studies`` studies into ``out_dir`` and return the path of ``manifest.csv``.

    Studies already complete from an earlier run with the same seed and sequences are
    kept. ``workers`` > 1 renders studies in that many spawned processes.
    """
    started = time.perf_counter()
    sequences = check_sequences(sequences)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_previous_run(out, seed)

    specs = sample_cohort(n_studies, seed)
    pending = [spec for spec in specs if not _is_complete(out, spec, seed, sequences)]
    logger.info(
        "cohort: %d studies (%d subjects) in %s, %d to write, %d already complete",
        len(specs), len({spec.subject_id for spec in specs}), out, len(pending), len(specs) - len(pending),
    )  # fmt: skip
    _write_studies(out, pending, seed, sequences, workers, progress)

    manifest = out / "manifest.csv"
    write_text_atomic(manifest, _manifest_text(specs, sequences, out))
    write_json_atomic(out / "dataset.json", _dataset_description(specs, seed, sequences))
    splits = Counter(spec.split for spec in specs)
    logger.info(
        "cohort: wrote %d studies in %.1f s; splits %s; diagnoses %s",
        len(pending), time.perf_counter() - started, dict(sorted(splits.items())),
        dict(Counter(spec.diagnosis or "none" for spec in specs)),
    )  # fmt: skip
    return manifest


def check_sequences(sequences: Iterable[str]) -> tuple[str, ...]:
    """Validate sequence names and return them in the canonical order T1c, T1, T2, FLAIR."""
    requested = [name.strip().lower() for name in sequences if name.strip()]
    unknown = sorted(set(requested) - set(SEQUENCES))
    if unknown or not requested:
        raise ValueError(f"invalid sequences {unknown or requested}; choose one or more of {', '.join(SEQUENCES)}")
    return tuple(name for name in SEQUENCES if name in requested)


def _check_previous_run(out: Path, seed: int) -> None:
    description = out / "dataset.json"
    if not description.is_file():
        return
    previous = json.loads(description.read_text(encoding="utf-8"))
    if previous.get("seed") != seed or previous.get("generator_version") != GENERATOR_VERSION:
        raise ValueError(
            f"{description} describes a cohort with seed {previous.get('seed')} and generator version "
            f"{previous.get('generator_version')}, but seed {seed} and version {GENERATOR_VERSION} were requested; "
            "use an empty --out folder or delete this one."
        )


def _study_dir(out: Path, spec: StudySpec) -> Path:
    return out / "studies" / spec.study_id


def _is_complete(out: Path, spec: StudySpec, seed: int, sequences: tuple[str, ...]) -> bool:
    folder = _study_dir(out, spec)
    try:
        document = json.loads((folder / "findings.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    if (
        document.get("generator_version") != GENERATOR_VERSION
        or document.get("cohort_seed") != seed
        or document.get("sequences") != list(sequences)
    ):
        return False
    return all((folder / f"{name}.nii.gz").is_file() for name in (*sequences, "seg"))


def _write_studies(out: Path, specs: list[StudySpec], seed: int, sequences: tuple[str, ...], workers: int, progress: bool) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(specs), unit="study", desc="cohort", disable=not progress)
    if workers == 1 or len(specs) <= 1:
        for spec in specs:
            write_study(out, spec, seed, sequences)
            bar.update()
        bar.close()
        return
    # spawn, not fork: callers may have imported torch, whose threads do not survive fork.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(specs)), mp_context=context) as pool:
        futures = [pool.submit(write_study, out, spec, seed, sequences) for spec in specs]
        for future in as_completed(futures):
            future.result()
            bar.update()
    bar.close()


def write_study(out: Path, spec: StudySpec, seed: int, sequences: tuple[str, ...]) -> str:
    """Render and write one study folder; ``findings.json`` is written last. Returns the study id."""
    from harness.cohort.render import render_study
    from harness.cohort.report_writer import write_report

    rendered = render_study(spec, seed, sequences)
    report = write_report(spec, seed)
    folder = _study_dir(out, spec)
    for name in sequences:
        write_nifti(folder / f"{name}.nii.gz", rendered.images[name], rendered.affine)
    write_nifti(folder / "seg.nii.gz", rendered.segmentation, rendered.affine)
    for name in set(SEQUENCES) - set(sequences):
        (folder / f"{name}.nii.gz").unlink(missing_ok=True)

    document = findings_document(spec, seed, sequences, report)
    document["segmentation_voxels"] = {
        label: int(count) for label, count in zip(SEGMENTATION_LABELS, np.bincount(rendered.segmentation.ravel(), minlength=4), strict=False)
    }
    for finding in document["findings"]:
        if finding.get("lesion_id") in rendered.lesion_voxels and finding.get("status") != "resolved":
            finding["voxels"] = rendered.lesion_voxels[finding["lesion_id"]]
    write_json_atomic(folder / "findings.json", document)
    logger.debug("wrote study %s", spec.study_id)
    return spec.study_id


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` as gzip-compressed NIfTI-1 with qform and sform set to ``affine`` (scanner, mm).

    The gzip header has mtime 0 and no file name, so equal arrays give equal bytes.
    """
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    write_bytes_atomic(path, gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0))


def findings_document(spec: StudySpec, seed: int, sequences: tuple[str, ...], report: str) -> dict:
    """Build the ``findings.json`` content of a study, except the voxel counts, which need the images."""
    data = spec.to_dict()
    findings = []
    for key, status in (("lesions", None), ("resolved", "resolved")):
        for lesion in data[key]:
            finding = {
                "type": lesion["kind"],
                "lesion_id": lesion["lesion_id"],
                "lobe": lesion["lobe"],
                "hemisphere": lesion["hemisphere"],
                "size_mm": lesion["size_mm"],
                "diameters_mm": lesion["diameters_mm"],
                "centre_mni": lesion["centre_mni"],
                "labels": lesion["labels"] if status is None else [],
                "enhancing": lesion["enhancing"],
                "ring_enhancement": lesion["necrotic_core"],
                "necrotic_core": lesion["necrotic_core"],
                "edema": lesion["edema_ratio"] > 0,
                "grade": lesion["grade"],
                "status": status or lesion["status"],
                "prior_size_mm": lesion["prior_size_mm"],
            }
            findings.append(finding)
    if spec.small_vessel_disease is not None:
        disease = spec.small_vessel_disease
        findings.append({"type": "small_vessel_disease", "fazekas": disease.fazekas, "n_foci": len(disease.foci), "labels": []})
    if spec.atrophy is not None:
        atrophy = spec.atrophy
        findings.append(
            {
                "type": "atrophy",
                "global_severity": atrophy.global_severity,
                "hippocampal_severity": atrophy.hippocampal_severity,
                "mta_score": atrophy.mta_score,
                "labels": [],
            }
        )
    return {
        "study_id": spec.study_id,
        "subject_id": spec.subject_id,
        "session": spec.session,
        "prior_study_id": f"{spec.subject_id}_ses-{spec.session - 1}" if spec.session > 1 else None,
        "interval_months": spec.interval_months,
        "split": spec.split,
        "arm": spec.arm,
        "age": spec.age,
        "sex": spec.sex,
        "diagnosis": spec.diagnosis,
        "sequences": list(sequences),
        "findings": findings,
        "acquisition": data["acquisition"],
        "report": report,
        "cohort_seed": seed,
        "generator_version": GENERATOR_VERSION,
    }


def _manifest_text(specs: list[StudySpec], sequences: tuple[str, ...], out: Path) -> str:
    """Manifest CSV text; reports are read back from each study's ``findings.json``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for spec in specs:
        folder = f"studies/{spec.study_id}"
        document = json.loads((out / folder / "findings.json").read_text(encoding="utf-8"))
        images = [f"{folder}/{name}.nii.gz" if name in sequences else "" for name in SEQUENCES]
        writer.writerow(
            [
                spec.study_id, spec.subject_id, spec.session, spec.split, *images,
                document["report"], spec.diagnosis or "", spec.age,
                f"{folder}/seg.nii.gz", f"{folder}/findings.json",
            ]
        )  # fmt: skip
    return buffer.getvalue()


def _dataset_description(specs: list[StudySpec], seed: int, sequences: tuple[str, ...]) -> dict:
    return {
        "name": DATASET_NAME,
        "description": "Synthetic brain MRI studies on the MNI ICBM152 2009a template with known findings.",
        "seed": seed,
        "n_studies": len(specs),
        "n_subjects": len({spec.subject_id for spec in specs}),
        "sequences": list(sequences),
        "labels": {"diagnosis": ["AD", "CN"]},
        "segmentation_labels": SEGMENTATION_LABELS,
        "splits": dict(sorted(Counter(spec.split for spec in specs).items())),
        "manifest": "manifest.csv",
        "generator": "harness.cohort",
        "generator_version": GENERATOR_VERSION,
    }
