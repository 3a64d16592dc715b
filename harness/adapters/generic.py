"""Generic adapter: any CSV, TSV, JSONL or Parquet table of image paths and reports.

For in-house cohorts and exports such as MR-RATE: a column mapping names the study id,
subject id, report and image columns. Splits come from a split column, or are assigned
per subject with a seed (written to ``splits.json``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.adapters import (
    Adapter,
    AdapterResult,
    assign_splits,
    parse_fractions,
    split_of_subjects,
    write_manifest,
    write_splits,
)
from harness.manifest import IMAGE_COLUMNS

logger = logging.getLogger(__name__)



def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, TSV, JSON Lines or Parquet table, chosen by the file suffix."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    readers = {
        ".csv": lambda: pd.read_csv(path, dtype=str, keep_default_na=False),
        ".tsv": lambda: pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False),
        ".jsonl": lambda: pd.read_json(path, lines=True, dtype=False),
        ".jsonl.gz": lambda: pd.read_json(path, lines=True, dtype=False, compression="gzip"),
        ".parquet": lambda: pd.read_parquet(path),
    }
    if suffix not in readers:
        raise ValueError(f"{path}: unsupported table format {suffix!r}; use one of {sorted(readers)}")
    if not path.is_file():
        raise FileNotFoundError(f"table {path} not found")
    return readers[suffix]()


def parse_image_columns(values: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Parse ``["t1c=T1C_PATH", "flair"]`` into sequence -> column.

    A bare column name must itself be a sequence name (``t1c``, ``t1``, ``t2``, ``flair``, ``ct``).
    """
    if isinstance(values, Mapping):
        return {str(k): str(v) for k, v in values.items()}
    mapping = {}
    for value in values:
        sequence, sep, column = value.partition("=")
        if not sep:
            sequence = column = value
        if sequence not in IMAGE_COLUMNS:
            raise ValueError(f"invalid image column {value!r}: sequence {sequence!r} is not one of {IMAGE_COLUMNS}; write SEQUENCE=COLUMN")
        mapping[sequence] = column
    if not mapping:
        raise ValueError("at least one image column is required (SEQUENCE=COLUMN, e.g. t1c=t1c_path)")
    return mapping


class GenericAdapter(Adapter):
    name = "generic"
    description = "any CSV/TSV/JSONL/Parquet table of image paths and reports, with a column mapping"
    path_arguments = ("table", "base_dir")

    def build(
        self,
        out_dir: str | Path,
        *,
        table: str | Path,
        image_columns: Sequence[str] | Mapping[str, str],
        report_column: str = "report",
        id_column: str = "study_id",
        subject_column: str | None = None,
        split_column: str | None = None,
        keep_columns: Sequence[str] = (),
        base_dir: str | Path | None = None,
        fractions: str | Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> AdapterResult:
        """Write a manifest from ``table``.

        Args:
            out_dir: output folder.
            table: the source table.
            image_columns: sequence -> column (or ``SEQUENCE=COLUMN`` strings).
            report_column, id_column: columns with the report text and the study id.
            subject_column: column with the subject (patient) id. Without it every study
                is its own subject, and a warning is logged because repeated scans of one
                patient could then land in two splits.
            split_column: column with existing split names; without it splits are
                assigned per subject with ``seed`` and ``fractions``.
            keep_columns: extra columns (labels) copied into the manifest.
            base_dir: folder that relative image paths are relative to (default: the
                table's folder).
        """
        table = Path(table).resolve()
        out_dir = Path(out_dir)
        source = read_table(table)
        images = parse_image_columns(image_columns)
        needed = [id_column, report_column, *images.values(), *keep_columns]
        needed += [c for c in (subject_column, split_column) if c]
        missing = [column for column in needed if column not in source.columns]
        if missing:
            raise ValueError(f"{table}: columns {missing} not found; columns: {list(source.columns)}")

        frame = self._manifest_rows(source, table, images, report_column, id_column, subject_column, keep_columns, base_dir)
        splits_path = None
        if split_column:
            frame.insert(2, "split", source[split_column].astype(str).str.strip().to_numpy())
            split_of_subjects(frame.groupby("split")["subject_id"].apply(list).to_dict())
        else:
            fraction_map = parse_fractions(fractions)
            splits = assign_splits(frame["subject_id"], fraction_map, seed)
            owner = split_of_subjects(splits)
            frame.insert(2, "split", frame["subject_id"].map(owner))
            out_dir.mkdir(parents=True, exist_ok=True)
            splits_path, _ = write_splits(out_dir, splits, seed, fraction_map)
        info = {"adapter": self.name, "source": {"table": str(table)}, "image_columns": images}
        return write_manifest(out_dir, frame, info, splits_path)

    def _manifest_rows(
        self,
        source: pd.DataFrame,
        table: Path,
        images: Mapping[str, str],
        report_column: str,
        id_column: str,
        subject_column: str | None,
        keep_columns: Sequence[str],
        base_dir: str | Path | None,
    ) -> pd.DataFrame:
        study_ids = source[id_column].astype(str).str.strip()
        duplicated = study_ids[study_ids.duplicated()].unique().tolist()
        if duplicated:
            raise ValueError(f"{table}: column {id_column!r} has duplicate study ids {duplicated[:5]}; study ids must be unique")
        if subject_column is None:
            logger.warning("%s: no subject column given; every study is treated as its own subject", table)
            subjects = study_ids
        else:
            subjects = source[subject_column].astype(str).str.strip()
        base = Path(base_dir).resolve() if base_dir else table.parent
        frame = pd.DataFrame({"study_id": study_ids.to_numpy(), "subject_id": subjects.to_numpy()})
        for sequence, column in images.items():
            frame[sequence] = [_absolute(value, base) for value in source[column].tolist()]
        frame["report"] = source[report_column].fillna("").astype(str).to_numpy()
        for column in keep_columns:
            frame[column] = source[column].to_numpy()
        return frame

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--table", required=True, help="CSV/TSV/JSONL/Parquet table of studies")
        parser.add_argument("--image-column", action="append", default=[], metavar="SEQ=COLUMN", help="image column per sequence (repeat for several sequences)")
        parser.add_argument("--report-column", default="report", help="column with the report text (default: report)")
        parser.add_argument("--id-column", default="study_id", help="column with the study id (default: study_id)")
        parser.add_argument("--subject-column", default=None, help="column with the subject id (default: one subject per study)")
        parser.add_argument("--split-column", default=None, help="column with existing split names (default: assign per subject)")
        parser.add_argument("--keep-column", action="append", default=[], help="extra column to copy into the manifest (repeatable)")
        parser.add_argument("--base-dir", default=None, help="folder relative image paths refer to (default: the table's folder)")
        parser.add_argument("--fractions", default=None, help="split fractions, e.g. train=0.8,val=0.1,test=0.1")
        parser.add_argument("--seed", type=int, default=0, help="seed of the per-subject split assignment")

    def arguments_from_cli(self, args: argparse.Namespace) -> dict[str, Any]:
        return {
            "table": args.table,
            "image_columns": args.image_column,
            "report_column": args.report_column,
            "id_column": args.id_column,
            "subject_column": args.subject_column,
            "split_column": args.split_column,
            "keep_columns": args.keep_column,
            "base_dir": args.base_dir,
            "fractions": args.fractions,
            "seed": args.seed,
        }


def _absolute(value: Any, base: Path) -> str:
    text = "" if value is None else str(value).strip()
    if not text or text.lower() == "nan":
        return ""
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())
