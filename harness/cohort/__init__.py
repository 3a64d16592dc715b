"""Deterministic synthetic brain-MRI cohort on the MNI ICBM152 template, with known findings.

``generate_cohort`` writes NIfTI studies, BraTS-label segmentations, radiology reports,
``manifest.csv`` and ``dataset.json``; ``sample_cohort`` returns the study specifications
(subjects, sessions, findings) without rendering any image.

NOTE: ``SEQUENCES`` (T1c, T1, T2, FLAIR) is defined here until the manifest module
provides the canonical constant.
"""

from harness.cohort.findings import StudySpec, sample_cohort
from harness.cohort.generate import (
    MANIFEST_COLUMNS,
    SEGMENTATION_LABELS,
    check_sequences,
    generate_cohort,
)
from harness.cohort.render import SEQUENCES
from harness.cohort.report_writer import write_report

__all__ = [
    "MANIFEST_COLUMNS",
    "SEGMENTATION_LABELS",
    "SEQUENCES",
    "StudySpec",
    "check_sequences",
    "generate_cohort",
    "sample_cohort",
    "write_report",
]
