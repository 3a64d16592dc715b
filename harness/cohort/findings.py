"""Seeded sampling of subjects, sessions, findings and acquisitions for the synthetic cohort.

Everything here is cheap (no images): :func:`sample_cohort` returns one
:class:`StudySpec` per study. Randomness comes from ``numpy.random.SeedSequence``
streams keyed by (seed, stream, index), so subject ``k`` gets the same findings whatever
the cohort size. A cohort of N studies is therefore a prefix of a cohort of N + M
studies, except that the last subject may lose its later sessions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from harness.cohort import anatomy

# Random stream ids; each stream is keyed by (seed, stream id, subject or study index).
STREAM_SUBJECT = 1
STREAM_ACQUISITION = 2
STREAM_RENDER = 3
STREAM_ANATOMY = 4
STREAM_REPORT = 5
STREAM_SPLIT = 6

SPLIT_BLOCK = ("train",) * 7 + ("val",) + ("test",) * 2

ARM_ONCOLOGY = "oncology"
ARM_MEMORY = "memory"

# Head centre (MNI mm) for head pose rotations and the field of view.
HEAD_CENTRE_MNI = (0.0, -17.0, 6.0)
MAX_METASTASES = 5
MIN_LATERAL_OFFSET_MM = 18.0


def rng_for(seed: int, stream: int, index: int) -> np.random.Generator:
    """Return the generator for one (seed, stream, index) triple."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(stream), int(index)]))


@dataclass
class Lesion:
    """A space-occupying finding, defined in MNI space.

    ``radii_mm`` are the ellipsoid semi-axes along MNI x, y, z of the enhancing rim (of
    the fluid for a resection cavity). ``core_fraction`` is the necrotic (or
    non-enhancing) core radius relative to the outer radius. ``edema_ratio`` scales the
    semi-axes of the surrounding edema; 0 means none. ``status`` compares with the prior
    session: ``baseline`` (first session), ``new``, ``stable``, ``increased``,
    ``decreased``.
    """

    lesion_id: str
    kind: str
    centre_mni: list[float]
    radii_mm: list[float]
    enhancing: bool
    necrotic_core: bool
    core_fraction: float
    edema_ratio: float
    shape_seed: int
    grade: str | None = None
    status: str = "baseline"
    prior_size_mm: float | None = None

    @property
    def size_mm(self) -> float:
        """Maximum diameter in mm."""
        return round(2.0 * max(self.radii_mm), 1)

    @property
    def diameters_mm(self) -> list[float]:
        return [round(2.0 * radius, 1) for radius in self.radii_mm]

    @property
    def lobe(self) -> str:
        return anatomy.lobe_of(self.centre_mni)

    @property
    def hemisphere(self) -> str:
        return anatomy.hemisphere_of(self.centre_mni)

    def labels(self) -> list[int]:
        """BraTS 2023 labels this lesion contributes to the segmentation."""
        if self.kind == "postoperative_cavity":
            return []
        labels = []
        if self.necrotic_core or not self.enhancing:
            labels.append(1)
        if self.edema_ratio > 0:
            labels.append(2)
        if self.enhancing:
            labels.append(3)
        return labels


@dataclass
class SmallVesselDisease:
    """White-matter hyperintensities: Fazekas grade and spherical foci ``(x, y, z, r)`` in MNI mm."""

    fazekas: int
    foci: list[list[float]]


@dataclass
class Atrophy:
    """Volume loss: ``global_severity`` and ``hippocampal_severity`` in [0, 1]."""

    global_severity: float
    hippocampal_severity: float

    @property
    def mta_score(self) -> int:
        """Medial temporal atrophy score 0-4 implied by ``hippocampal_severity``."""
        return int(min(4, math.floor(self.hippocampal_severity * 5.0)))


@dataclass
class Acquisition:
    """Study grid and head pose.

    ``spacing_mm`` is along the stored voxel axes, and ``orientation`` gives the axis codes
    of the stored array (nibabel convention, e.g. ``LPS``). ``oblique_deg`` rotates the
    grid about ``oblique_axis`` in the scanner frame. The head pose rotates the head about
    its centre by ``head_rotation_deg`` (about x, y, z), then shifts it by
    ``head_translation_mm``.
    """

    protocol: str
    spacing_mm: list[float]
    orientation: str
    oblique_deg: float
    oblique_axis: list[float]
    head_rotation_deg: list[float]
    head_translation_mm: list[float]
    field_of_view_mm: list[float]
    skull_stripped: bool


@dataclass
class StudySpec:
    """Everything needed to render one study and write its report."""

    study_index: int
    study_id: str
    subject_index: int
    subject_id: str
    session: int
    split: str
    arm: str
    age: int
    sex: str
    diagnosis: str | None
    interval_months: int | None
    lesions: list[Lesion] = field(default_factory=list)
    resolved: list[Lesion] = field(default_factory=list)
    small_vessel_disease: SmallVesselDisease | None = None
    atrophy: Atrophy | None = None
    acquisition: Acquisition | None = None

    def to_dict(self) -> dict:
        """JSON-ready dictionary with derived fields (lobe, hemisphere, size) added."""
        data = asdict(self)
        for key in ("lesions", "resolved"):
            for item, lesion in zip(data[key], getattr(self, key), strict=True):
                item.update(
                    lobe=lesion.lobe,
                    hemisphere=lesion.hemisphere,
                    size_mm=lesion.size_mm,
                    diameters_mm=lesion.diameters_mm,
                    labels=lesion.labels(),
                )
        return data


def split_of(seed: int, subject_index: int) -> str:
    """Split of a subject: each block of 10 subjects gets 7 train, 1 val, 2 test in seeded order."""
    block, position = divmod(subject_index, len(SPLIT_BLOCK))
    order = rng_for(seed, STREAM_SPLIT, block).permutation(len(SPLIT_BLOCK))
    return SPLIT_BLOCK[int(order[position])]


def sample_cohort(n_studies: int, seed: int = 0) -> list[StudySpec]:
    """Sample ``n_studies`` study specifications (no images), subject by subject.

    Subjects have 1, 2 or 3 sessions (probabilities 0.6, 0.25, 0.15); follow-up sessions
    evolve the findings of the previous one.
    """
    if n_studies < 1:
        raise ValueError(f"n_studies must be at least 1, got {n_studies}")
    studies: list[StudySpec] = []
    subject_index = 0
    while len(studies) < n_studies:
        for spec in _sample_subject(seed, subject_index):
            if len(studies) == n_studies:
                break
            spec.study_index = len(studies)
            spec.acquisition = sample_acquisition(rng_for(seed, STREAM_ACQUISITION, spec.study_index))
            studies.append(spec)
        subject_index += 1
    return studies


def _sample_subject(seed: int, subject_index: int) -> list[StudySpec]:
    rng = rng_for(seed, STREAM_SUBJECT, subject_index)
    arm = ARM_ONCOLOGY if rng.random() < 0.5 else ARM_MEMORY
    n_sessions = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    sex = str(rng.choice(["F", "M"]))
    subject_id = f"sub-{subject_index + 1:04d}"

    if arm == ARM_MEMORY:
        diagnosis = "AD" if rng.random() < 0.5 else "CN"
        age = float(rng.uniform(62, 88) if diagnosis == "AD" else rng.uniform(58, 85))
    else:
        diagnosis = None
        age = float(rng.uniform(32, 80))

    spec = StudySpec(
        study_index=-1,
        study_id=f"{subject_id}_ses-1",
        subject_index=subject_index,
        subject_id=subject_id,
        session=1,
        split=split_of(seed, subject_index),
        arm=arm,
        age=int(age),
        sex=sex,
        diagnosis=diagnosis,
        interval_months=None,
    )
    _sample_baseline_findings(spec, age, rng)
    sessions = [spec]
    for session in range(2, n_sessions + 1):
        interval = int(rng.integers(12, 25) if arm == ARM_MEMORY else rng.integers(3, 13))
        age += interval / 12.0
        sessions.append(_follow_up(sessions[-1], session, interval, age, rng))
    return sessions


def _sample_baseline_findings(spec: StudySpec, age: float, rng: np.random.Generator) -> None:
    if spec.arm == ARM_MEMORY:
        spec.atrophy = _sample_atrophy(spec.diagnosis, age, rng)
        if rng.random() < 0.25 + 0.01 * max(0.0, age - 60.0):
            spec.small_vessel_disease = _sample_small_vessel_disease(int(rng.integers(1, 4)), rng)
        return

    presentation = rng.choice(["metastases", "glioma", "postoperative"], p=[0.6, 0.25, 0.15])
    if presentation == "metastases":
        count = int(rng.choice(np.arange(MAX_METASTASES + 1), p=[0.15, 0.3, 0.2, 0.15, 0.1, 0.1]))
        for _ in range(count):
            _add_metastasis(spec, rng)
    elif presentation == "glioma":
        _add_glioma(spec, rng)
    else:
        _add_cavity(spec, rng)
    if age > 55 and rng.random() < 0.3:
        spec.small_vessel_disease = _sample_small_vessel_disease(1, rng)


def _sample_atrophy(diagnosis: str | None, age: float, rng: np.random.Generator) -> Atrophy:
    ageing = max(0.0, (age - 55.0) / 35.0)
    if diagnosis == "AD":
        global_severity = 0.35 + 0.35 * ageing + rng.uniform(0.0, 0.25)
        hippocampal = 0.5 + 0.3 * ageing + rng.uniform(0.0, 0.2)
    else:
        global_severity = 0.05 + 0.25 * ageing + rng.uniform(0.0, 0.1)
        hippocampal = 0.05 + 0.2 * ageing + rng.uniform(0.0, 0.1)
    return Atrophy(round(min(global_severity, 1.0), 3), round(min(hippocampal, 0.98), 3))


def _sample_small_vessel_disease(fazekas: int, rng: np.random.Generator) -> SmallVesselDisease:
    candidates = anatomy.placement_candidates()["white_matter"]
    count = {1: rng.integers(3, 8), 2: rng.integers(8, 18), 3: rng.integers(18, 32)}[fazekas]
    radius_range = {1: (1.5, 3.0), 2: (2.0, 4.0), 3: (2.5, 5.5)}[fazekas]
    foci = []
    for _ in range(int(count)):
        centre = candidates[rng.integers(len(candidates))] + rng.uniform(-1.0, 1.0, size=3)
        foci.append([*np.round(centre, 1).tolist(), round(float(rng.uniform(*radius_range)), 1)])
    return SmallVesselDisease(fazekas=fazekas, foci=foci)


def _place(
    spec: StudySpec, site: str, radius: float, rng: np.random.Generator, max_depth: float | None = None
) -> list[float] | None:
    """Draw a centre inside the brain, in one hemisphere, clear of the other lesions."""
    candidates = anatomy.placement_candidates()
    points, depths = candidates[site], candidates[f"{site}_depth"]
    for _ in range(300):
        index = int(rng.integers(len(points)))
        centre = points[index] + rng.uniform(-1.0, 1.0, size=3)
        if depths[index] < radius + 3.0 or (max_depth is not None and depths[index] > max_depth):
            continue
        if abs(centre[0]) < max(MIN_LATERAL_OFFSET_MM, radius + 4.0):
            continue
        if any(_too_close(centre, radius, other) for other in spec.lesions):
            continue
        return np.round(centre, 1).tolist()
    return None


def _too_close(centre: np.ndarray, radius: float, other: Lesion) -> bool:
    other_radius = max(other.radii_mm) * max(1.0, other.edema_ratio * 0.6)
    return float(np.linalg.norm(centre - np.asarray(other.centre_mni))) < radius + other_radius + 4.0


def _next_id(spec: StudySpec) -> str:
    used = {lesion.lesion_id for lesion in spec.lesions} | {lesion.lesion_id for lesion in spec.resolved}
    number = 1
    while f"L{number}" in used:
        number += 1
    return f"L{number}"


def _add_metastasis(spec: StudySpec, rng: np.random.Generator, status: str = "baseline") -> None:
    diameter = float(np.clip(rng.lognormal(np.log(10.0), 0.5), 4.0, 32.0))
    radius = diameter / 2.0
    centre = _place(spec, "junction", radius * 1.6, rng, max_depth=28.0)
    if centre is None:
        return
    necrotic = diameter >= 10.0 and rng.random() < 0.6
    radii = [round(radius * float(rng.uniform(0.85, 1.0)), 1) for _ in range(3)]
    spec.lesions.append(
        Lesion(
            lesion_id=_next_id(spec),
            kind="metastasis",
            centre_mni=centre,
            radii_mm=radii,
            enhancing=True,
            necrotic_core=necrotic,
            core_fraction=round(float(rng.uniform(0.45, 0.7)), 2) if necrotic else 0.0,
            edema_ratio=round(float(rng.uniform(1.6, 3.0)), 2) if rng.random() < 0.8 else 0.0,
            shape_seed=int(rng.integers(2**31)),
            status=status,
        )
    )


def _add_glioma(spec: StudySpec, rng: np.random.Generator, status: str = "baseline", centre=None) -> None:
    high_grade = rng.random() < 0.7
    radius = float(rng.uniform(12.0, 24.0) if high_grade else rng.uniform(10.0, 20.0))
    if centre is None:
        centre = _place(spec, "white_matter", radius * 1.3, rng)
        if centre is None:
            return
    radii = [round(radius * float(rng.uniform(0.75, 1.0)), 1) for _ in range(3)]
    spec.lesions.append(
        Lesion(
            lesion_id=_next_id(spec),
            kind="glioma",
            centre_mni=list(centre),
            radii_mm=radii,
            enhancing=high_grade,
            necrotic_core=high_grade and rng.random() < 0.85,
            core_fraction=round(float(rng.uniform(0.5, 0.75)), 2),
            edema_ratio=round(float(rng.uniform(1.4, 2.0)), 2),
            shape_seed=int(rng.integers(2**31)),
            grade="high" if high_grade else "low",
            status=status,
        )
    )


def _add_cavity(spec: StudySpec, rng: np.random.Generator, status: str = "baseline", centre=None, radius=None) -> None:
    radius = float(rng.uniform(8.0, 16.0)) if radius is None else radius
    if centre is None:
        centre = _place(spec, "cortex", radius, rng)
        if centre is None:
            return
    spec.lesions.append(
        Lesion(
            lesion_id=_next_id(spec),
            kind="postoperative_cavity",
            centre_mni=list(centre),
            radii_mm=[round(radius * float(rng.uniform(0.8, 1.0)), 1) for _ in range(3)],
            enhancing=False,
            necrotic_core=False,
            core_fraction=0.0,
            edema_ratio=round(float(rng.uniform(1.3, 1.6)), 2),
            shape_seed=int(rng.integers(2**31)),
            status=status,
        )
    )


def _follow_up(prior: StudySpec, session: int, interval: int, age: float, rng: np.random.Generator) -> StudySpec:
    spec = StudySpec(
        study_index=-1,
        study_id=f"{prior.subject_id}_ses-{session}",
        subject_index=prior.subject_index,
        subject_id=prior.subject_id,
        session=session,
        split=prior.split,
        arm=prior.arm,
        age=int(age),
        sex=prior.sex,
        diagnosis=prior.diagnosis,
        interval_months=interval,
    )
    for lesion in prior.lesions:
        _evolve_lesion(spec, lesion, rng)
    if prior.arm == ARM_ONCOLOGY and any(lesion.kind == "metastasis" for lesion in prior.lesions):
        if rng.random() < 0.35:
            for _ in range(int(rng.integers(1, 3))):
                if sum(lesion.kind == "metastasis" for lesion in spec.lesions) < MAX_METASTASES:
                    _add_metastasis(spec, rng, status="new")

    if prior.atrophy is not None:
        years = interval / 12.0
        rate = 0.08 if prior.diagnosis == "AD" else 0.015
        spec.atrophy = Atrophy(
            round(min(1.0, prior.atrophy.global_severity + rate * years), 3),
            round(min(0.98, prior.atrophy.hippocampal_severity + 1.2 * rate * years), 3),
        )
    spec.small_vessel_disease = _evolve_small_vessel_disease(prior.small_vessel_disease, rng)
    return spec


def _evolve_lesion(spec: StudySpec, lesion: Lesion, rng: np.random.Generator) -> None:
    """Carry one lesion into the follow-up session with a change in size or a resection."""
    if lesion.kind == "glioma" and rng.random() < 0.6:
        # Resected since the prior study: a cavity at the tumour site, sometimes with a
        # recurrent enhancing nodule at its margin.
        _add_cavity(spec, rng, status="new", centre=lesion.centre_mni, radius=0.8 * max(lesion.radii_mm))
        spec.resolved.append(lesion)
        return
    if lesion.kind == "postoperative_cavity":
        spec.lesions.append(_resized(lesion, float(rng.uniform(0.9, 1.0)), "stable"))
        if rng.random() < 0.25:
            offset = rng.normal(size=3)
            offset *= (max(lesion.radii_mm) + 6.0) / np.linalg.norm(offset)
            centre = np.round(np.asarray(lesion.centre_mni) + offset, 1)
            if anatomy.depth_at(centre) > 8.0 and abs(centre[0]) >= MIN_LATERAL_OFFSET_MM:
                _add_glioma(spec, rng, status="new", centre=centre.tolist())
                nodule = spec.lesions[-1]
                nodule.radii_mm = [round(float(rng.uniform(3.0, 6.0)), 1) for _ in range(3)]
                nodule.enhancing, nodule.necrotic_core, nodule.grade = True, False, "high"
        return

    draw = rng.random()
    if lesion.kind == "metastasis" and draw < 0.1 and lesion.size_mm < 10.0:
        spec.resolved.append(lesion)
        return
    if draw < 0.4:
        factor, status = float(rng.uniform(0.5, 0.85)), "decreased"
    elif draw < 0.65:
        factor, status = 1.0, "stable"
    else:
        factor, status = float(rng.uniform(1.2, 1.7)), "increased"
    limit = 16.0 if lesion.kind == "metastasis" else 30.0
    factor = min(factor, limit / max(lesion.radii_mm)) if status == "increased" else factor
    if factor <= 1.05 and status == "increased":
        status = "stable"
    spec.lesions.append(_resized(lesion, factor, status))


def _resized(lesion: Lesion, factor: float, status: str) -> Lesion:
    return Lesion(
        **{
            **asdict(lesion),
            "radii_mm": [round(radius * factor, 1) for radius in lesion.radii_mm],
            "status": status,
            "prior_size_mm": lesion.size_mm,
        }
    )


def _evolve_small_vessel_disease(
    prior: SmallVesselDisease | None, rng: np.random.Generator
) -> SmallVesselDisease | None:
    if prior is None or prior.fazekas >= 3 or rng.random() >= 0.3:
        return prior
    grown = _sample_small_vessel_disease(prior.fazekas + 1, rng)
    return SmallVesselDisease(fazekas=grown.fazekas, foci=prior.foci + grown.foci[len(prior.foci):])


def sample_acquisition(rng: np.random.Generator) -> Acquisition:
    """Sample a study grid: protocol, spacing, stored orientation, obliquity and head pose."""
    protocol = str(rng.choice(["3d_isotropic", "2d_axial", "2d_coronal", "2d_sagittal"], p=[0.35, 0.45, 0.1, 0.1]))
    in_plane = float(rng.choice([1.2, 1.4, 1.6, 1.8]))
    thickness = float(rng.choice([2.5, 3.0, 4.0]))
    if protocol == "3d_isotropic":
        spacing = [float(rng.choice([1.5, 1.75, 2.0]))] * 3
    elif protocol == "2d_axial":
        spacing = [in_plane, in_plane, thickness]
    elif protocol == "2d_coronal":
        spacing = [in_plane, thickness, in_plane]
    else:
        spacing = [thickness, in_plane, in_plane]

    oblique = float(rng.uniform(3.0, 12.0)) if rng.random() < 0.4 else 0.0
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    skull_stripped = bool(rng.random() < 0.5)
    margin = 20.0 if skull_stripped else 36.0
    return Acquisition(
        protocol=protocol,
        spacing_mm=spacing,
        orientation=str(rng.choice(["RAS", "LPS", "LAS", "LPI"], p=[0.35, 0.35, 0.2, 0.1])),
        oblique_deg=round(oblique, 2),
        oblique_axis=np.round(axis, 4).tolist(),
        head_rotation_deg=np.round(rng.uniform([-8.0, -4.0, -4.0], [8.0, 4.0, 4.0]), 2).tolist(),
        head_translation_mm=np.round(rng.uniform([-3.0, -8.0, -8.0], [3.0, 8.0, 8.0]), 2).tolist(),
        field_of_view_mm=[150.0 + margin, 185.0 + margin, 165.0 + margin],
        skull_stripped=skull_stripped,
    )
