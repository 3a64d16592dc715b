"""Read study manifests: one row per imaging study, from CSV, TSV, JSONL or Parquet.

A manifest row has ``study_id``, ``subject_id``, ``split``, one image path per sequence
(``t1c``, ``t1``, ``t2``, ``flair``, or ``ct``) and the radiology ``report`` text. Optional
columns are labels (``diagnosis``, ``age``, ...) and a ``segmentation`` path. Any other
column is kept as it is.

Reading normalises the table so that every consumer sees the same thing:

- id, split, report and path columns are strings, so ``"001"`` stays ``"001"``;
- relative image and segmentation paths are resolved against the manifest's folder and
  stored as absolute path strings; a missing path is ``None``;
- a missing report is ``""``;
- in other columns an empty string is a missing value, and a column whose non-missing
  values all parse as numbers becomes numeric.

Text files must be UTF-8. A file that is not is rejected with the line and data row of
the first invalid byte, never decoded into mojibake.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

logger = logging.getLogger(__name__)

SEQUENCES: tuple[str, ...] = ("t1c", "t1", "t2", "flair")
"""MRI sequence columns in the channel order of the released multimodal brat model."""

IMAGE_COLUMNS: tuple[str, ...] = SEQUENCES + ("ct",)
SEGMENTATION_COLUMN = "segmentation"
PATH_COLUMNS: tuple[str, ...] = IMAGE_COLUMNS + (SEGMENTATION_COLUMN,)
REQUIRED_COLUMNS: tuple[str, ...] = ("study_id", "subject_id", "split", "report")
TEXT_COLUMNS: tuple[str, ...] = ("study_id", "subject_id", "split", "report")
DATASET_CARD_NAME = "dataset.json"

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}

_ICONV_HINT = "re-encode it as UTF-8, e.g. `iconv -f latin1 -t utf-8 OLD > NEW`"


class ManifestError(ValueError):
    """A manifest or dataset card that cannot be read; the message names the file and the fix.

    ``row`` is the 1-based data row (the first row after a CSV header is row 1) and
    ``column`` the column name, where they are known.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None,
        row: int | None = None, column: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.row = row
        self.column = column


def manifest_format(path: str | os.PathLike[str]) -> str:
    """Return ``"csv"``, ``"tsv"``, ``"jsonl"`` or ``"parquet"`` from the file's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        known = ", ".join(sorted(MANIFEST_SUFFIXES))
        raise ManifestError(
            f"{path}: unknown manifest format {suffix or '(no suffix)'!r}; "
            f"save the table with one of the suffixes {known}",
            path=path,
        )
    return MANIFEST_SUFFIXES[suffix]


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a manifest into a DataFrame with one row per study and a 0-based RangeIndex.

    Raises:
        ManifestError: the suffix is unknown, the file is missing or unreadable, or a
            text file is not valid UTF-8.
    """
    path = Path(path)
    kind = manifest_format(path)
    if kind == "parquet":
        df = _read_parquet(path)
    else:
        raw = _read_bytes(path)
        if kind == "jsonl":
            df = _read_jsonl(path, raw)
        else:
            df = _read_delimited(path, raw, "\t" if kind == "tsv" else ",")

    df = _normalise(df, base=path.parent.absolute())
    logger.debug("read manifest %s: %d rows, columns %s", path, len(df), list(df.columns))
    return df


def read_dataset_card(manifest_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the optional ``dataset.json`` next to a manifest; ``{}`` when there is none.

    The card may declare the allowed values of label columns as
    ``{"labels": {"diagnosis": ["AD", "CN"], ...}}``.
    """
    card_path = Path(manifest_path).parent / DATASET_CARD_NAME
    if not card_path.is_file():
        return {}
    try:
        card = json.loads(_read_bytes(card_path).decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ManifestError(f"{card_path}: not valid UTF-8 ({error}); {_ICONV_HINT}", path=card_path) from None
    except json.JSONDecodeError as error:
        raise ManifestError(
            f"{card_path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}; fix the file",
            path=card_path,
        ) from None

    if not isinstance(card, dict):
        raise ManifestError(f"{card_path}: expected a JSON object, found {type(card).__name__}", path=card_path)
    labels = card.get("labels", {})
    valid = isinstance(labels, dict) and all(isinstance(v, list) for v in labels.values())
    if not valid:
        raise ManifestError(
            f"{card_path}: 'labels' must map each label column to a list of allowed values, "
            f'e.g. {{"labels": {{"diagnosis": ["AD", "CN"]}}}}',
            path=card_path,
        )
    return card


def is_missing(value: Any) -> bool:
    """Return True for ``None``, NaN and strings that are empty after stripping."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and not value.strip():
        return True
    return value is pd.NA or value is pd.NaT


def present_images(row: Any) -> dict[str, str]:
    """Return ``{column: path}`` for the image columns of a row (Series or mapping) that have a path."""
    return {col: row[col] for col in IMAGE_COLUMNS if col in row and not is_missing(row[col])}


# -- readers -----------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{path}: file not found; check the path", path=path) from None
    except OSError as error:
        raise ManifestError(f"{path}: cannot read the file ({error.strerror}); check its permissions", path=path) from None


def _read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"{path}: file not found; check the path", path=path)
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path}: cannot read the Parquet file ({error}); re-export the table", path=path) from None
    return df.reset_index(drop=True)


def _read_delimited(path: Path, raw: bytes, sep: str) -> pd.DataFrame:
    strict = _decode_or_none(raw)
    # An undecodable file is still parsed (as Latin-1, which accepts any byte) to map the
    # first invalid byte to its data row and column: quoted reports may span several lines.
    text = strict if strict is not None else raw.decode("latin-1")
    try:
        # index_col=False: rows with more fields than the header are an error, instead of
        # pandas silently turning the extra leading fields into an index and shifting columns.
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, na_values=[""], index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, pd.errors.ParserWarning) as error:
        raise ManifestError(
            f"{path}: cannot parse the table ({error}); make every row have as many fields as the header", path=path
        ) from None
    if strict is None:
        raise _utf8_error(path, raw, df, first_data_line=2)
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _read_jsonl(path: Path, raw: bytes) -> pd.DataFrame:
    records: list[dict[str, Any]] = []
    for line_number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ManifestError(
                f"{path}: line {line_number} (data row {len(records) + 1}) is not valid UTF-8 "
                f"(byte 0x{line[error.start]:02x}); {_ICONV_HINT}",
                path=path, row=len(records) + 1,
            ) from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise ManifestError(
                f"{path}: line {line_number} is not valid JSON ({error.msg}); write one JSON object per line",
                path=path, row=len(records) + 1,
            ) from None
        if not isinstance(record, dict):
            raise ManifestError(
                f"{path}: line {line_number} is a JSON {type(record).__name__}, expected an object; "
                "write one JSON object per line",
                path=path, row=len(records) + 1,
            )
        records.append(record)
    return pd.DataFrame.from_records(records)


def _decode_or_none(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _utf8_error(path: Path, raw: bytes, df: pd.DataFrame, first_data_line: int) -> ManifestError:
    """Build the error for the first invalid UTF-8 byte, naming its line, data row and column."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = error.start
    line = raw.count(b"\n", 0, offset) + 1
    row, column = None, None
    for i, record in enumerate(df.itertuples(index=False)):
        hits = [c for c, v in zip(df.columns, record, strict=True) if isinstance(v, str) and not _is_utf8(v)]
        if hits:
            row, column = i + 1, str(hits[0]).strip()
            break
    where = f"line {line}"
    if row is not None:
        where += f" (data row {row}, column {column!r})"
    elif line < first_data_line:
        where += " (header)"
    return ManifestError(
        f"{path}: {where} is not valid UTF-8 (byte 0x{raw[offset]:02x} at offset {offset}); {_ICONV_HINT}",
        path=path, row=row, column=column,
    )


def _is_utf8(latin1_text: str) -> bool:
    """Return True when the bytes behind text decoded as Latin-1 are valid UTF-8."""
    try:
        latin1_text.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# -- normalisation -----------------------------------------------------------------------


def _normalise(df: pd.DataFrame, base: Path) -> pd.DataFrame:
    df = df.reset_index(drop=True)
    for column in df.columns:
        if column in PATH_COLUMNS:
            df[column] = pd.Series([_resolve_path(v, base) for v in df[column]], index=df.index, dtype=object)
        elif column == "report":
            df[column] = pd.Series(["" if is_missing(v) else str(v) for v in df[column]], index=df.index, dtype=object)
        elif column in TEXT_COLUMNS:
            df[column] = pd.Series([None if is_missing(v) else _as_text(v) for v in df[column]], index=df.index, dtype=object)
        else:
            df[column] = _maybe_numeric(df[column])
    return df


def _as_text(value: Any) -> str:
    """Render an id as text; JSON or Parquet integers (and integral floats) lose no digits."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _resolve_path(value: Any, base: Path) -> str | None:
    if is_missing(value):
        return None
    path = Path(str(value).strip()).expanduser()
    if not path.is_absolute():
        path = base / path
    return os.path.normpath(path)


def _maybe_numeric(series: pd.Series) -> pd.Series:
    """Turn empty strings into missing values, then convert the column to numbers if every value parses as one."""
    if not (series.dtype == object or pd.api.types.is_string_dtype(series)):
        return series
    series = pd.Series([None if is_missing(v) else v for v in series], index=series.index, dtype=object)
    values = series.dropna()
    if values.empty or not all(isinstance(v, str) for v in values):
        return series
    try:
        return pd.to_numeric(series)
    except (ValueError, TypeError):
        return series
