"""Render one study: sample template anatomy on the study grid, add lesions, synthesise contrasts.

Coordinate chain, evaluated per output voxel (backward mapping, so every voxel gets a value):

    stored voxel index --affine--> scanner mm --inverse head pose--> subject mm
        --inverse subject scaling + smooth deformation--> MNI mm --atrophy warp--> template mm

Lesions and white-matter foci are defined in MNI mm and evaluated at each voxel's final
template coordinate. A lesion that ``findings.json`` places in the left frontal lobe is
therefore in the left frontal lobe of the image, and the segmentation shares the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from harness.cohort import anatomy
from harness.cohort.findings import (
    HEAD_CENTRE_MNI,
    STREAM_ANATOMY,
    STREAM_RENDER,
    Lesion,
    StudySpec,
    rng_for,
)

SEQUENCES = ("t1c", "t1", "t2", "flair")

# Relative signal per tissue and sequence (t1c, t1, t2, flair); white matter on T1 = 1.
# The ordering follows clinical appearance: CSF dark on T1 and FLAIR and bright on T2,
# enhancing tumour bright only after contrast, edema and gliosis bright on T2 and FLAIR.
TISSUE_SIGNAL = {
    "csf": (0.25, 0.25, 1.60, 0.12),
    "gm": (0.64, 0.62, 0.85, 0.92),
    "wm": (1.00, 1.00, 0.60, 0.70),
    "skull": (0.12, 0.12, 0.08, 0.08),
    "scalp": (1.10, 1.05, 0.90, 0.85),
    "enhancing": (1.55, 0.65, 0.90, 1.00),
    "necrosis": (0.30, 0.30, 1.35, 0.55),
    "non_enhancing": (0.50, 0.50, 1.30, 1.35),
    "edema": (0.55, 0.55, 1.20, 1.45),
    "gliosis": (0.65, 0.65, 1.10, 1.35),
    "wmh": (0.72, 0.72, 1.05, 1.40),
}

LESION_MAPS = ("enhancing", "necrosis", "non_enhancing", "edema", "fluid", "gliosis", "wmh")
LATTICE_SPACING_MM = 16.0
LATTICE_ORIGIN_MM = np.array([-120.0, -160.0, -110.0])
LATTICE_SHAPE = (16, 18, 16)
RIM_OUTER_MM = 11.5
# Upper bound on the smooth deformation: lattice standard deviation at most 3 mm, so a
# displacement above 14 mm is a more than 4.5-sigma event per component.
MAX_DEFORMATION_MM = 14.0
# Gaussian widths (mm along MNI x, y, z) of the atrophy model around each centre.
VENTRICLE_SIGMA = (16.0, 30.0, 14.0)
HIPPOCAMPUS_SIGMA = (8.0, 12.0, 8.0)


@dataclass
class RenderedStudy:
    """Arrays of one study on its stored grid.

    ``images`` maps a sequence name to an int16 array of shape ``(X, Y, Z)``.
    ``segmentation`` is uint8 with BraTS 2023 labels. ``affine`` is the 4 x 4
    voxel-to-scanner (RAS mm) matrix shared by all of them. ``lesion_voxels`` counts the
    voxels of the enhancing, core and edema parts of each lesion, by lesion id.
    """

    images: dict[str, np.ndarray]
    segmentation: np.ndarray
    affine: np.ndarray
    lesion_voxels: dict[str, dict[str, int]]


def study_grid(spec: StudySpec) -> tuple[tuple[int, int, int], np.ndarray]:
    """Return the stored array shape and voxel-to-scanner affine of a study."""
    from nibabel import orientations

    acquisition = spec.acquisition
    spacing = np.asarray(acquisition.spacing_mm, dtype=np.float64)
    shape = tuple(int(np.ceil(fov / step)) for fov, step in zip(acquisition.field_of_view_mm, spacing, strict=True))
    rotation = _axis_angle(acquisition.oblique_axis, acquisition.oblique_deg)
    centre = np.asarray(HEAD_CENTRE_MNI) + np.asarray(acquisition.head_translation_mm)

    affine_ras = np.eye(4)
    affine_ras[:3, :3] = rotation @ np.diag(spacing)
    affine_ras[:3, 3] = centre - affine_ras[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)

    # Only axis flips are used, so the stored shape and spacing equal the RAS ones.
    transform = orientations.ornt_transform(
        orientations.axcodes2ornt("RAS"), orientations.axcodes2ornt(tuple(acquisition.orientation))
    )
    return shape, affine_ras @ orientations.inv_ornt_aff(transform, shape)


def _axis_angle(axis: list[float], degrees: float) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    vector = np.asarray(axis, dtype=np.float64)
    return Rotation.from_rotvec(np.deg2rad(degrees) * vector / np.linalg.norm(vector)).as_matrix()


def _scanner_to_subject(spec: StudySpec) -> np.ndarray:
    """4 x 4 inverse head pose: scanner mm to subject mm (rotation about the head centre)."""
    from scipy.spatial.transform import Rotation

    acquisition = spec.acquisition
    rotation = Rotation.from_euler("xyz", acquisition.head_rotation_deg, degrees=True).as_matrix()
    centre = np.asarray(HEAD_CENTRE_MNI)
    inverse = np.eye(4)
    inverse[:3, :3] = rotation.T
    inverse[:3, 3] = centre - rotation.T @ (centre + np.asarray(acquisition.head_translation_mm))
    return inverse


def subject_warp(seed: int, subject_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-subject anatomy: axis scaling ``(3,)`` and a displacement lattice ``(3, 16, 18, 16)`` in mm."""
    from scipy import ndimage

    rng = rng_for(seed, STREAM_ANATOMY, subject_index)
    scale = rng.uniform(0.94, 1.06, size=3)
    lattice = rng.normal(size=(3, *LATTICE_SHAPE))
    lattice = np.stack([ndimage.gaussian_filter(component, 1.0, mode="nearest") for component in lattice])
    lattice *= rng.uniform(1.5, 3.0) / max(float(lattice.std()), 1e-6)
    return scale, lattice.astype(np.float32)


def voxel_to_mni(spec: StudySpec, seed: int, voxels: np.ndarray, affine: np.ndarray, deform: bool = True) -> np.ndarray:
    """Map stored voxel indices ``(3, N)`` of a study to MNI template mm ``(3, N)``, float32.

    This is the whole chain except the atrophy warp, which :func:`render_study` adds.
    With ``deform=False`` the smooth deformation is left out; it moves points by less
    than about ``MAX_DEFORMATION_MM``.
    """
    from scipy import ndimage

    matrix = _scanner_to_subject(spec) @ affine
    subject = (matrix[:3, :3] @ voxels + matrix[:3, 3:]).astype(np.float32)
    scale, lattice = subject_warp(seed, spec.subject_index)
    centre = np.asarray(HEAD_CENTRE_MNI, dtype=np.float32)[:, None]
    mni = centre + (subject - centre) / scale[:, None].astype(np.float32)
    if not deform:
        return mni
    lattice_coords = (subject - LATTICE_ORIGIN_MM[:, None].astype(np.float32)) / LATTICE_SPACING_MM
    for axis in range(3):
        mni[axis] += ndimage.map_coordinates(lattice[axis], lattice_coords, order=1, mode="nearest", output=np.float32)
    return mni


def _atrophy_warp(mni: np.ndarray, spec: StudySpec) -> np.ndarray:
    """Contract sampling toward the ventricles and hippocampi, which enlarges them in the image.

    The displacement is ``-beta * g(x) * (x - c)`` with a Gaussian ``g``; for beta < 1 the
    map stays one-to-one.
    """
    atrophy = spec.atrophy
    if atrophy is None:
        return mni
    warped = mni.copy()
    sites = [(VENTRICLE_SIGMA, anatomy.VENTRICLE_CENTRE_MNI, 0.35 * atrophy.global_severity)]
    sites += [(HIPPOCAMPUS_SIGMA, centre, 0.3 * atrophy.hippocampal_severity) for centre in anatomy.HIPPOCAMPUS_CENTRES_MNI]
    for sigma, centre, beta in sites:
        offset = mni - np.asarray(centre, dtype=np.float32)[:, None]
        weight = np.exp(-0.5 * np.sum((offset / np.asarray(sigma, dtype=np.float32)[:, None]) ** 2, axis=0))
        warped -= (beta * weight) * offset
    return warped


def render_study(spec: StudySpec, seed: int, sequences: tuple[str, ...] = SEQUENCES) -> RenderedStudy:
    """Render the images and segmentation of one study (about 1-3 s on one CPU core)."""
    template = anatomy.load_template()
    shape, affine = study_grid(spec)
    skull_stripped = spec.acquisition.skull_stripped
    head_limit = -0.5 if skull_stripped else -RIM_OUTER_MM
    origin = template.origin[:, None].astype(np.float32)

    # A first pass without the deformation finds the voxels that can be inside the head,
    # so the costly steps below run on them only. The atrophy warp moves points deeper,
    # so it cannot bring a voxel from outside this margin into the head.
    voxels = np.indices(shape, dtype=np.float32).reshape(3, -1)
    rough = voxel_to_mni(spec, seed, voxels, affine, deform=False)
    signed = _sample(template.signed_distance, (rough - origin) / 2.0, cval=-30.0)
    candidates = np.flatnonzero(signed > head_limit - MAX_DEFORMATION_MM)

    mni = _atrophy_warp(voxel_to_mni(spec, seed, voxels[:, candidates], affine), spec)
    signed = _sample(template.signed_distance, (mni - origin) / 2.0, cval=-30.0)
    inside = signed > head_limit
    head = candidates[inside]
    mni = mni[:, inside]
    signed = signed[inside]

    tissues = _tissue_fractions(template, mni - origin, signed, mni[2], spec, skull_stripped)
    lesion_maps, lesion_voxels = _lesion_maps(spec, mni, tissues)
    labels = _segmentation_labels(lesion_maps)

    rng = rng_for(seed, STREAM_RENDER, spec.study_index)
    images = {}
    for name in SEQUENCES:
        # Draw for every sequence so a sequence's noise does not depend on --sequences.
        values = _synthesise(SEQUENCES.index(name), tissues, lesion_maps, mni, rng)
        if name in sequences:
            volume = np.zeros(int(np.prod(shape)), dtype=np.int16)
            volume[head] = values
            images[name] = volume.reshape(shape)
    segmentation = np.zeros(int(np.prod(shape)), dtype=np.uint8)
    segmentation[head] = labels
    return RenderedStudy(images, segmentation.reshape(shape), affine, lesion_voxels)


def _sample(volume: np.ndarray, coordinates: np.ndarray, cval: float = 0.0) -> np.ndarray:
    """Trilinear samples ``(N,)`` of ``volume`` at voxel coordinates ``(3, N)``, float32."""
    from scipy import ndimage

    return ndimage.map_coordinates(volume, coordinates, order=1, mode="constant", cval=cval, output=np.float32)


def _step(values: np.ndarray) -> np.ndarray:
    """Soft step from 0 to 1 over one mm around zero (partial-volume edge)."""
    return np.clip(values + 0.5, 0.0, 1.0)


def _tissue_fractions(template, points, signed, z_mni, spec: StudySpec, skull_stripped: bool) -> dict[str, np.ndarray]:
    """Tissue fractions ``(M,)`` at template points ``(3, M)`` (1 mm template voxel units)."""
    gm = _sample(template.gm, points)
    wm = _sample(template.wm, points)
    brain = _step(signed)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)

    if spec.atrophy is not None:
        fluid = _sample(template.fluid_distance, points / 2.0)
        # Cortical thinning and sulcal widening: grey matter near CSF turns into CSF.
        moved = gm * np.clip(0.75 * spec.atrophy.global_severity * np.exp(-fluid / 2.5), 0.0, 0.9)
        for centre in anatomy.HIPPOCAMPUS_CENTRES_MNI:
            offset = points + template.origin[:, None] - np.asarray(centre)[:, None]
            weight = np.exp(-0.5 * np.sum((offset / np.asarray(HIPPOCAMPUS_SIGMA)[:, None]) ** 2, axis=0))
            moved = np.maximum(moved, gm * (0.6 * spec.atrophy.hippocampal_severity * weight))
        gm = gm - moved
        csf = csf + moved

    fractions = {"gm": gm, "wm": wm, "csf": csf, "brain": brain}
    if skull_stripped:
        fractions["skull"] = fractions["scalp"] = np.zeros_like(gm)
        return fractions
    outside = (1.0 - brain) * np.clip((z_mni + 70.0) / 15.0, 0.0, 1.0)
    depth_out = -signed
    fractions["csf"] = csf + outside * _step(2.5 - depth_out)
    fractions["skull"] = outside * _step(depth_out - 2.5) * _step(7.0 - depth_out)
    fractions["scalp"] = outside * _step(depth_out - 7.0) * _step(RIM_OUTER_MM - depth_out)
    return fractions


def _lesion_maps(spec: StudySpec, mni: np.ndarray, tissues: dict[str, np.ndarray]):
    """Lesion fractions ``(M,)`` per map in ``LESION_MAPS`` and voxel counts per lesion."""
    maps = {name: np.zeros(mni.shape[1], dtype=np.float32) for name in LESION_MAPS}
    counts: dict[str, dict[str, int]] = {}
    brain = tissues["brain"]
    white = np.clip(1.6 * tissues["wm"] + 0.15, 0.0, 1.0)
    for lesion in spec.lesions:
        subset, outer, core, edema = _lesion_shape(lesion, mni)
        if subset.size == 0:
            counts[lesion.lesion_id] = {"enhancing": 0, "core": 0, "edema": 0}
            continue
        outer *= brain[subset]
        core *= brain[subset]
        edema = np.clip(edema * white[subset] * brain[subset] - outer, 0.0, 1.0)
        parts = _lesion_parts(lesion, outer, core, edema)
        for name, values in parts.items():
            maps[name][subset] = np.maximum(maps[name][subset], values)
        counts[lesion.lesion_id] = {
            "enhancing": int(np.count_nonzero(parts.get("enhancing", np.zeros(0)) > 0.5)),
            "core": int(np.count_nonzero(np.maximum(parts.get("necrosis", 0 * outer), parts.get("non_enhancing", 0 * outer)) > 0.5)),
            "edema": int(np.count_nonzero(parts.get("edema", np.zeros(0)) > 0.5)),
        }
    if spec.small_vessel_disease is not None:
        maps["wmh"] = _white_matter_foci(spec.small_vessel_disease.foci, mni) * tissues["wm"]
    return maps, counts


def _lesion_parts(lesion: Lesion, outer, core, edema) -> dict[str, np.ndarray]:
    if lesion.kind == "postoperative_cavity":
        return {"fluid": outer, "gliosis": edema}
    if not lesion.enhancing:
        return {"non_enhancing": outer, "edema": edema}
    if lesion.necrotic_core:
        return {"enhancing": np.clip(outer - core, 0.0, 1.0), "necrosis": core, "edema": edema}
    return {"enhancing": outer, "edema": edema}


def _lesion_shape(lesion: Lesion, mni: np.ndarray):
    """Soft membership of the outer boundary, core and edema of an irregular ellipsoid.

    Returns the indices of the points near the lesion and three ``(K,)`` fraction arrays.
    """
    radii = np.asarray(lesion.radii_mm, dtype=np.float32)
    reach = radii * max(1.0, lesion.edema_ratio) * 1.35 + 2.0
    centre = np.asarray(lesion.centre_mni, dtype=np.float32)
    near = np.all(np.abs(mni - centre[:, None]) < reach[:, None], axis=0)
    subset = np.flatnonzero(near)
    offset = mni[:, subset] - centre[:, None]
    distance = np.sqrt(np.sum(offset**2, axis=0)) + 1e-6
    direction = offset / distance

    shape_rng = np.random.default_rng(lesion.shape_seed)
    amplitude = 0.06 if lesion.kind == "metastasis" else 0.15
    rho = np.sqrt(np.sum((offset / radii[:, None]) ** 2, axis=0)) / (1.0 + _surface_bumps(direction, amplitude, shape_rng))
    rho_edema = rho / (1.0 + _surface_bumps(direction, 0.25, shape_rng))
    mean_radius = float(radii.mean())

    outer = _step((1.0 - rho) * mean_radius)
    core = _step((lesion.core_fraction - rho) * mean_radius) if lesion.core_fraction > 0 else np.zeros_like(rho)
    edema = _step((lesion.edema_ratio - rho_edema) * mean_radius) if lesion.edema_ratio > 0 else np.zeros_like(rho)
    return subset, outer, core, edema


def _surface_bumps(direction: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth relative radius change over the unit sphere: a sum of four plane waves."""
    bumps = np.zeros(direction.shape[1], dtype=np.float32)
    for _ in range(4):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        frequency = rng.integers(1, 4)
        phase = rng.uniform(0, 2 * np.pi)
        bumps += (amplitude / 2.0) * np.sin(frequency * np.pi * (axis @ direction) + phase).astype(np.float32)
    return bumps


def _white_matter_foci(foci: list[list[float]], mni: np.ndarray) -> np.ndarray:
    result = np.zeros(mni.shape[1], dtype=np.float32)
    for x, y, z, radius in foci:
        centre = np.array([x, y, z], dtype=np.float32)
        subset = np.flatnonzero(np.all(np.abs(mni - centre[:, None]) < radius + 1.5, axis=0))
        distance = np.sqrt(np.sum((mni[:, subset] - centre[:, None]) ** 2, axis=0))
        result[subset] = np.maximum(result[subset], _step(radius - distance))
    return result


def _segmentation_labels(maps: dict[str, np.ndarray]) -> np.ndarray:
    """BraTS 2023 labels: 1 necrotic or non-enhancing core, 2 edema, 3 enhancing tumour."""
    labels = np.zeros(maps["edema"].shape, dtype=np.uint8)
    labels[maps["edema"] > 0.5] = 2
    labels[np.maximum(maps["necrosis"], maps["non_enhancing"]) > 0.5] = 1
    labels[maps["enhancing"] > 0.5] = 3
    return labels


def _synthesise(column: int, tissues, lesion_maps, mni: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Signal of one sequence at the head voxels ``(M,)``, int16: tissue mix, lesions, bias, Rician noise."""
    signal = {name: values[column] * float(1.0 + rng.normal(0.0, 0.04)) for name, values in TISSUE_SIGNAL.items()}
    image = sum(tissues[name] * signal[name] for name in ("gm", "wm", "csf", "skull", "scalp"))
    for name in ("wmh", "edema", "gliosis"):
        image = image + lesion_maps[name] * (signal[name] - image)
    image = image + lesion_maps["fluid"] * (signal["csf"] - image)
    solid = lesion_maps["enhancing"] + lesion_maps["necrosis"] + lesion_maps["non_enhancing"]
    image = image * np.clip(1.0 - solid, 0.0, 1.0)
    for name in ("enhancing", "necrosis", "non_enhancing"):
        image = image + lesion_maps[name] * signal[name]

    image = image * _bias_field(mni, rng)
    sigma = float(rng.uniform(0.02, 0.045))
    real = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    imaginary = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    gain = float(rng.uniform(450.0, 900.0))
    return np.clip(np.rint(magnitude * gain), 0, 32767).astype(np.int16)


def _bias_field(mni: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field: exp of a random second-order polynomial, about ±15 %."""
    x, y, z = (mni - np.asarray(HEAD_CENTRE_MNI, dtype=np.float32)[:, None]) / 100.0
    terms = (x, y, z, x * x, y * y, z * z, x * y, y * z, x * z)
    coefficients = rng.normal(0.0, [0.12, 0.12, 0.12, 0.06, 0.06, 0.06, 0.06, 0.06, 0.06])
    log_field = sum(float(c) * term for c, term in zip(coefficients, terms, strict=True))
    return np.exp(log_field).astype(np.float32)
