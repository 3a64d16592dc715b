"""BIMCV-R adapter: chest CT volumes with radiology reports (Chen et al., arXiv 2403.15992).

Expected layout of a downloaded copy (8,069 CT volumes of 5,340 patients)::

    ROOT/
      meta/curated_ct_report_path_En.csv     one row per CT volume
      CT_1/ct/sub-S329586_ses-E60073_acq-1_run-2_bp-chest_ct.nii.gz
      CT_2/ct/...                            (volumes spread over CT* folders)

The report table has the columns ``PatientID`` (``sub-S...``), ``ReportID``
(``ses-E...``), ``Report`` (Spanish), ``Report_en`` (English machine translation),
``Labels``, ``Localizations``, ..., ``path`` and, in some exports, ``ct_path``. The
path columns hold the absolute paths of the machine the table was made on, so volumes
are matched by file name against the NIfTI files found under ``ROOT``.

NOTE: the column names and the ``CT*/ct/*.nii.gz`` folder pattern were read from public
code and metadata derived from the dataset, not from the dataset card itself. Volumes are
therefore indexed by file name anywhere under ``ROOT``, and ``reports=`` takes another
table path if the copy differs.

The adapter writes a manifest with a ``ct`` image column, the English report (or the
Spanish one with ``language="es"``), a patient-level split in ``splits.json`` and the
sha256 of that file in ``dataset.json``. Use the ``ct-v1`` preprocessing spec.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from harness.adapters import (
    Adapter,
    AdapterResult,
    assign_splits,
    parse_fractions,
    read_splits,
    split_of_subjects,
    write_manifest,
    write_splits,
)

logger = logging.getLogger(__name__)

DEFAULT_REPORTS = Path("meta") / "curated_ct_report_path_En.csv"
REPORT_COLUMNS = {"en": "Report_en", "es": "Report"}
PATH_COLUMNS = ("ct_path", "path")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
PREPROCESSING = "ct-v1"


class BimcvRAdapter(Adapter):
    name = "bimcv-r"
    description = "BIMCV-R chest CT volumes with reports (report CSV + CT NIfTI folders)"
    path_arguments = ("root", "reports", "splits")

    def build(
        self,
        out_dir: str | Path,
        *,
        root: str | Path,
        reports: str | Path | None = None,
        language: str = "en",
        splits: str | Path | None = None,
        fractions: str | dict | None = None,
        seed: int = 0,
        strict: bool = False,
    ) -> AdapterResult:
        """Write the BIMCV-R manifest into ``out_dir``.

        Args:
            root: the dataset folder.
            reports: report table (default ``ROOT/meta/curated_ct_report_path_En.csv``).
            language: ``en`` for ``Report_en`` or ``es`` for the original ``Report``.
            splits: an existing ``splits.json`` (split -> patient ids) to reuse; without
                it patients are assigned with ``seed`` and ``fractions``.
            strict: raise when a row's volume is not found, instead of skipping the row
                (skipped rows are counted in ``dataset.json`` and logged as a warning).
        """
        root = Path(root).resolve()
        out_dir = Path(out_dir)
        if language not in REPORT_COLUMNS:
            raise ValueError(f"invalid language {language!r}; allowed: {sorted(REPORT_COLUMNS)}")
        table_path = Path(reports).resolve() if reports else root / DEFAULT_REPORTS
        if not table_path.is_file():
            raise FileNotFoundError(f"BIMCV-R report table {table_path} not found; pass reports= with the table's path")
        table = pd.read_csv(table_path, dtype=str, keep_default_na=False)
        required = ["PatientID", REPORT_COLUMNS[language]]
        missing = [c for c in required if c not in table.columns]
        if missing or not any(c in table.columns for c in PATH_COLUMNS):
            raise ValueError(f"{table_path}: expected columns {required} and one of {list(PATH_COLUMNS)}; columns: {list(table.columns)}")

        volumes = index_volumes(root)
        frame, skipped = self._rows(table, table_path, volumes, REPORT_COLUMNS[language], strict)
        if frame.empty:
            raise ValueError(f"{table_path}: none of the {len(table)} rows matched a NIfTI file under {root}")
        frame, splits_path, split_info = self._split(frame, out_dir, splits, fractions, seed)
        info = {
            "adapter": self.name,
            "modality": "ct",
            "preprocessing": PREPROCESSING,
            "language": language,
            "source": {"root": str(root), "reports": str(table_path)},
            "split_assignment": split_info,
            "skipped_rows": skipped,
        }
        return write_manifest(out_dir, frame, info, splits_path)

    def _rows(
        self, table: pd.DataFrame, table_path: Path, volumes: dict[str, Path], report_column: str, strict: bool
    ) -> tuple[pd.DataFrame, dict[str, int]]:
        rows, skipped = [], {"no_volume_path": 0, "volume_not_found": 0, "duplicate_volume": 0}
        seen: set[str] = set()
        for line, record in enumerate(table.to_dict("records"), start=2):
            name = _volume_name(record)
            problem = None
            if name is None:
                problem = "no_volume_path"
            elif name not in volumes:
                problem = "volume_not_found"
            elif name in seen:
                problem = "duplicate_volume"
            if problem:
                if strict:
                    raise ValueError(f"{table_path}, line {line}: {problem.replace('_', ' ')} ({name!r}); fix the table or run without strict")
                skipped[problem] += 1
                continue
            seen.add(name)
            rows.append(
                {
                    "study_id": _stem(name),
                    "subject_id": record["PatientID"].strip(),
                    "session_id": record.get("ReportID", "").strip(),
                    "ct": str(volumes[name]),
                    "report": record[report_column].strip(),
                    "labels": record.get("Labels", ""),
                }
            )
        if sum(skipped.values()):
            logger.warning("%s: skipped %d of %d rows: %s", table_path, sum(skipped.values()), len(table), skipped)
        return pd.DataFrame(rows), skipped

    def _split(
        self, frame: pd.DataFrame, out_dir: Path, splits: str | Path | None, fractions: Any, seed: int
    ) -> tuple[pd.DataFrame, Path, dict[str, Any]]:
        out_dir.mkdir(parents=True, exist_ok=True)
        if splits is not None:
            assignment = read_splits(splits)
            info: dict[str, Any] = {"from": str(Path(splits).resolve())}
            fraction_map: dict[str, float] = {}
        else:
            fraction_map = parse_fractions(fractions)
            assignment = assign_splits(frame["subject_id"], fraction_map, seed)
            info = {"seed": seed, "fractions": fraction_map}
        owner = split_of_subjects(assignment)
        unassigned = sorted(set(frame["subject_id"]) - set(owner))
        if unassigned:
            raise ValueError(f"{splits}: {len(unassigned)} patients have no split, e.g. {unassigned[:3]}")
        frame.insert(2, "split", frame["subject_id"].map(owner))
        splits_path, _ = write_splits(out_dir, assignment, seed, fraction_map)
        return frame, splits_path, info

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--root", required=True, help="BIMCV-R folder (with meta/ and CT*/ct/)")
        parser.add_argument("--reports", default=None, help="report table (default: ROOT/meta/curated_ct_report_path_En.csv)")
        parser.add_argument("--language", choices=sorted(REPORT_COLUMNS), default="en", help="report language (default: en)")
        parser.add_argument("--splits", default=None, help="existing splits.json to reuse")
        parser.add_argument("--fractions", default=None, help="split fractions, e.g. train=0.8,val=0.1,test=0.1")
        parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
        parser.add_argument("--strict", action="store_true", help="fail on rows whose volume is missing")

    def arguments_from_cli(self, args: argparse.Namespace) -> dict[str, Any]:
        return {
            "root": args.root,
            "reports": args.reports,
            "language": args.language,
            "splits": args.splits,
            "fractions": args.fractions,
            "seed": args.seed,
            "strict": args.strict,
        }


def index_volumes(root: Path) -> dict[str, Path]:
    """Map NIfTI file name -> path for every volume under ``root``; duplicate names raise."""
    volumes: dict[str, Path] = {}
    for suffix in NIFTI_SUFFIXES:
        for path in sorted(root.rglob(f"*{suffix}")):
            if path.name in volumes and volumes[path.name] != path:
                raise ValueError(f"two volumes named {path.name} under {root}: {volumes[path.name]} and {path}")
            volumes[path.name] = path
    return volumes


def _volume_name(record: dict[str, str]) -> str | None:
    for column in PATH_COLUMNS:
        value = (record.get(column) or "").strip()
        if value.endswith(NIFTI_SUFFIXES):
            return value.replace("\\", "/").rsplit("/", 1)[-1]
    return None


def _stem(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
