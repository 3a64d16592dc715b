"""MNI ICBM152 2009a template anatomy for the synthetic cohort, and anatomical naming.

The template ships inside the nilearn wheel (``nilearn/datasets/data``): a brain-masked
T1 and grey-matter and white-matter probability maps, 197 x 233 x 189 voxels at 1 mm,
affine = identity spacing with origin (-98, -134, -72) mm. Nothing is downloaded.
Cerebrospinal fluid (CSF) is the brain mask minus grey and white matter.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

LOBES = ("frontal", "parietal", "temporal", "occipital", "cerebellum")

# Approximate MNI centres (mm) used by the atrophy model.
VENTRICLE_CENTRE_MNI = (0.0, -12.0, 14.0)
HIPPOCAMPUS_CENTRES_MNI = ((-27.0, -22.0, -13.0), (27.0, -22.0, -13.0))


@dataclass(frozen=True)
class Template:
    """Template maps in MNI space, float32.

    ``gm`` and ``wm`` are probabilities on the 1 mm grid, shape ``(197, 233, 189)``, whose
    voxel (0, 0, 0) sits at ``origin`` (MNI mm). The distance maps are smooth, so they live
    on a 2 mm grid with the same origin, shape ``(99, 117, 95)``. ``signed_distance`` is
    the distance in mm to the brain-mask boundary (positive inside, negative outside,
    capped at -30). ``fluid_distance`` is the distance in mm from each brain voxel to the
    nearest CSF-dominant voxel or to the brain surface.
    """

    gm: np.ndarray
    wm: np.ndarray
    signed_distance: np.ndarray
    fluid_distance: np.ndarray
    origin: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.gm.shape)  # type: ignore[return-value]

    def mni_to_voxel(self, points_mni: np.ndarray) -> np.ndarray:
        """Convert ``(..., 3)`` MNI mm coordinates to 1 mm template voxel coordinates."""
        return np.asarray(points_mni, dtype=np.float64) - self.origin

    def voxel_to_mni(self, voxels: np.ndarray) -> np.ndarray:
        """Convert ``(..., 3)`` 1 mm template voxel indices to MNI mm coordinates."""
        return np.asarray(voxels, dtype=np.float64) + self.origin


def template_dir() -> Path:
    """Return the folder of the ICBM152 files inside the installed nilearn package."""
    import importlib.util

    # find_spec locates the package without importing it (importing nilearn takes seconds).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("nilearn is not installed; install nilearn>=0.11 (its wheel ships the ICBM152 template).")
    folder = Path(spec.origin).parent / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"ICBM152 template files {missing} not found in {folder}; "
            "install nilearn>=0.11 from its wheel (it ships them) and retry."
        )
    return folder


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load the template once per process and derive CSF and distance maps (about 3 s)."""
    import nibabel as nib

    folder = template_dir()
    images = {key: nib.load(folder / name) for key, name in TEMPLATE_FILES.items()}
    affine = images["t1"].affine
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ValueError(f"{folder / TEMPLATE_FILES['t1']}: expected a 1 mm axis-aligned affine, got {affine.tolist()}")

    mask = np.asarray(images["t1"].dataobj) > 0
    gm = np.asarray(images["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(images["wm"].dataobj, dtype=np.float32) / 255.0
    gm *= mask
    wm *= mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)

    signed = _coarse_distance(mask) - _coarse_distance(~mask)
    fluid = _coarse_distance(mask & (csf < 0.5))
    fluid = np.where(mask[::2, ::2, ::2], fluid, 0.0)
    logger.debug("loaded ICBM152 template from %s", folder)
    return Template(
        gm=gm,
        wm=wm,
        signed_distance=np.maximum(signed, -30.0).astype(np.float32),
        fluid_distance=fluid.astype(np.float32),
        origin=affine[:3, 3].astype(np.float64),
    )


def _coarse_distance(mask: np.ndarray) -> np.ndarray:
    """Distance (mm) of each ``True`` voxel to the nearest ``False`` voxel, on a 2 mm grid.

    The 1 mm mask is subsampled by 2 because the full-resolution transform takes seconds
    per map; the error is about 1 mm.
    """
    from scipy import ndimage

    coarse = mask[::2, ::2, ::2]
    distance = ndimage.distance_transform_edt(coarse).astype(np.float32) * 2.0
    # The boundary lies half a coarse voxel (1 mm) before the first False voxel.
    return np.where(coarse, distance - 1.0, 0.0).astype(np.float32)


def hemisphere_of(centre_mni: tuple[float, float, float] | np.ndarray) -> str:
    """Return ``"left"`` for MNI x < 0 and ``"right"`` otherwise."""
    return "left" if float(centre_mni[0]) < 0 else "right"


def lobe_of(centre_mni: tuple[float, float, float] | np.ndarray) -> str:
    """Name the lobe of an MNI point (mm) with simple coordinate rules.

    NOTE: these are approximate boundaries, not an atlas: cerebellum below z = -20 mm
    behind y = -40 mm; occipital behind y = -72 mm; temporal below z = 6 mm lateral to
    |x| = 25 mm between y = -70 and 22 mm; frontal in front of a central sulcus plane
    y = -5 - 0.3 z; parietal otherwise. Deep grey nuclei and the insula get the lobe of
    the region around them. Lesions are placed away from the boundaries' worst cases.
    """
    x, y, z = (float(value) for value in centre_mni)
    if y < -40.0 and z < -20.0:
        return "cerebellum"
    if y < -72.0:
        return "occipital"
    if z < 6.0 and abs(x) >= 25.0 and -70.0 <= y <= 22.0:
        return "temporal"
    if y > -5.0 - 0.3 * z:
        return "frontal"
    return "parietal"


@functools.lru_cache(maxsize=1)
def placement_candidates() -> dict[str, np.ndarray]:
    """Candidate lesion centres (MNI mm, shape ``(K, 3)``) on a 2 mm lattice, by site type.

    ``junction``: grey-white junction (metastases); ``white_matter``: deep white matter
    (gliomas, small vessel disease); ``cortex``: grey matter within 20 mm of the brain
    surface (resection cavities). ``<site>_depth`` contains each candidate's distance to
    the brain surface in mm, shape ``(K,)``.
    """
    template = load_template()
    step = (slice(None, None, 2),) * 3
    gm = template.gm[step]
    wm = template.wm[step]
    depth = template.signed_distance
    voxels = np.indices(gm.shape).reshape(3, -1).T * 2
    sites = {
        "junction": (gm > 0.25) & (gm < 0.75) & (wm > 0.2) & (depth > 6.0),
        "white_matter": (wm > 0.85) & (depth > 12.0),
        "cortex": (gm > 0.5) & (depth > 4.0) & (depth < 20.0),
    }
    candidates = {}
    for name, selected in sites.items():
        flat = selected.reshape(-1)
        candidates[name] = template.voxel_to_mni(voxels[flat])
        candidates[f"{name}_depth"] = depth.reshape(-1)[flat].astype(np.float64)
    return candidates


def depth_at(centre_mni: np.ndarray) -> float:
    """Distance (mm) from an MNI point to the brain surface; negative outside the brain."""
    template = load_template()
    index = np.round(template.mni_to_voxel(centre_mni) / 2.0).astype(int)
    if np.any(index < 0) or np.any(index >= np.array(template.signed_distance.shape)):
        return -30.0
    return float(template.signed_distance[tuple(index)])
