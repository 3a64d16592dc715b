"""Named, versioned and hashed preprocessing specs, and the code that applies them.

A :class:`PreprocessingSpec` describes how one study becomes a float32 array
``(C, S, A, R)``: the sequences stacked as channels, resampling to ``pixdim`` (mm),
reorientation to ``axcodes``, a whole-volume resize to ``spatial_size`` and intensity
normalisation. The steps are MONAI transforms; see :func:`load_study`.

Built-in specs:

- ``brat-v1``: what the released brat weights expect (arXiv 2512.18679 and its released
  preprocessing): ``Spacing`` to 1x1x1 mm (bilinear), ``Orientation`` to ``SAR``,
  ``Resize`` to (32, 256, 256) with ``mode="area"`` (aspect ratio not kept),
  ``NormalizeIntensity(nonzero=True, channel_wise=True)``, then
  ``ScaleIntensity(minv=0, maxv=1, channel_wise=True)``. Background voxels that are
  exactly 0 before the z-score end at a mid value after the min-max step; this is
  reproduced on purpose. ``brat-v1`` uses T1c only; ``brat-v1-multimodal`` stacks T1c,
  T1, T2 and FLAIR.
- ``brat-tiny`` / ``brat-tiny-multimodal``: the same steps with a (32, 128, 128) resize,
  for the small CPU model.
- ``ct-v1``: chest CT (BIMCV-R). This is our choice, not from the brat paper: 1.5 mm
  bilinear resampling, ``SAR``, HU clipped to [-1000, 1000] and scaled to [0, 1]
  (``ScaleIntensityRange``), resize to (32, 256, 256) with area interpolation.

``spec.digest`` is the SHA-256 of the canonical JSON of the spec fields except
``description``. It leaves out the MONAI, torch and harness versions on purpose, so that
cache keys survive library upgrades. A code change that changes the output of a spec
must therefore come with a new ``version`` of that spec.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from harness.manifest import (
    IMAGE_COLUMNS,
    SEGMENTATION_COLUMN,
    SEQUENCES,
    ManifestError,
    is_missing,
    read_manifest,
)
from harness.registry import Registry

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("zscore-minmax", "window")
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
"""World axis labels of NIfTI (RAS+), passed to MONAI ``Orientation`` explicitly."""
AFFINE_ATOL = 1e-3
"""Absolute tolerance (mm) for "same grid" decisions between images and segmentations."""
FINGERPRINT_CHUNK = 2**20


class PreprocessingError(ValueError):
    """A study that cannot be preprocessed; the message names the study and the file."""


@dataclass(frozen=True)
class PreprocessingSpec:
    """A named, versioned preprocessing recipe.

    Attributes:
        name: registry name, e.g. ``"brat-v1"``.
        version: bumped whenever the output for the same fields changes.
        sequences: manifest columns stacked as channels, in channel order.
        pixdim: target voxel spacing in mm, in the input's voxel-axis order (MONAI ``Spacing``).
        axcodes: target orientation, e.g. ``"SAR"``: array axis 0 runs inferior to superior.
        spatial_size: whole-volume resize target ``(S, A, R)`` after reorientation.
        resample_mode: interpolation of the spacing step (``"bilinear"`` or ``"nearest"``).
        resize_mode: interpolation of the resize step (MONAI ``Resize`` mode, e.g. ``"area"``).
        normalization: ``"zscore-minmax"`` (z-score, then min-max to ``output_range``) or
            ``"window"`` (clip to ``window`` and scale linearly to ``output_range``).
        nonzero: z-score over non-zero voxels only.
        channel_wise: normalise each channel separately.
        window: intensity window ``(low, high)`` for ``"window"``, e.g. HU for CT.
        output_range: final intensity range.
        description: free text; not part of the digest.
    """

    name: str
    version: int
    sequences: tuple[str, ...]
    pixdim: tuple[float, float, float]
    axcodes: str
    spatial_size: tuple[int, int, int]
    resample_mode: str = "bilinear"
    resize_mode: str = "area"
    normalization: str = "zscore-minmax"
    nonzero: bool = True
    channel_wise: bool = True
    window: tuple[float, float] | None = None
    output_range: tuple[float, float] = (0.0, 1.0)
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        set_field = object.__setattr__
        set_field(self, "sequences", tuple(str(s) for s in self.sequences))
        set_field(self, "pixdim", tuple(float(p) for p in self.pixdim))
        set_field(self, "spatial_size", tuple(int(n) for n in self.spatial_size))
        set_field(self, "output_range", tuple(float(v) for v in self.output_range))
        if self.window is not None:
            set_field(self, "window", tuple(float(v) for v in self.window))
        self._validate()

    def _validate(self) -> None:
        where = f"preprocessing spec {self.name!r}"
        unknown = [s for s in self.sequences if s not in IMAGE_COLUMNS]
        if not self.sequences or unknown or len(set(self.sequences)) != len(self.sequences):
            raise ValueError(f"{where}: sequences {self.sequences} must be distinct names from {IMAGE_COLUMNS}")
        if len(self.pixdim) != 3 or min(self.pixdim) <= 0:
            raise ValueError(f"{where}: pixdim {self.pixdim} must be three positive spacings in mm")
        if len(self.spatial_size) != 3 or min(self.spatial_size) <= 0:
            raise ValueError(f"{where}: spatial_size {self.spatial_size} must be three positive sizes")
        if not _valid_axcodes(self.axcodes):
            raise ValueError(f"{where}: axcodes {self.axcodes!r} must name each of L/R, P/A, I/S once, e.g. 'SAR'")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"{where}: normalization {self.normalization!r} must be one of {NORMALIZATIONS}")
        if (self.normalization == "window") != (self.window is not None):
            raise ValueError(f"{where}: a window (low, high) is required for, and only for, normalization 'window'")

    def to_dict(self) -> dict[str, Any]:
        """Return the fields that define the output (all but ``description``) as JSON-ready values."""
        fields = asdict(self)
        fields.pop("description")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of :meth:`to_dict`; library versions are not included."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def folder_name(self) -> str:
        """Output folder name, ``<name>-<first 12 hex digits of the digest>``."""
        return f"{self.name}-{self.digest[:12]}"


def _valid_axcodes(axcodes: str) -> bool:
    """Return True when ``axcodes`` names each world axis (L/R, P/A, I/S) exactly once."""
    groups = [next((i for i, pair in enumerate(("LR", "PA", "IS")) if code in pair), -1) for code in axcodes]
    return sorted(groups) == [0, 1, 2]


SPECS: Registry[PreprocessingSpec] = Registry("preprocessing spec")


def register_spec(spec: PreprocessingSpec, *, overwrite: bool = False) -> PreprocessingSpec:
    """Register ``spec`` under ``spec.name``; registering a taken name raises ``ValueError``."""
    return SPECS.register(spec.name, spec, overwrite=overwrite)


def get_spec(name: str) -> PreprocessingSpec:
    """Look up a spec by name; an unknown name raises ``KeyError`` listing the registered names."""
    return SPECS.get(name)


def list_specs() -> list[PreprocessingSpec]:
    """Return the registered specs sorted by name."""
    return [SPECS.get(name) for name in SPECS.names()]


def _register_builtin_specs() -> None:
    brat = dict(version=1, pixdim=(1.0, 1.0, 1.0), axcodes="SAR", resample_mode="bilinear", resize_mode="area")
    released = "released brat weights: 1 mm bilinear, SAR, area resize to 32x256x256, non-zero z-score, min-max"
    register_spec(PreprocessingSpec("brat-v1", sequences=("t1c",), spatial_size=(32, 256, 256), **brat,
                                    description=released + "; T1c only"))
    register_spec(PreprocessingSpec("brat-v1-multimodal", sequences=SEQUENCES, spatial_size=(32, 256, 256), **brat,
                                    description=released + "; T1c, T1, T2, FLAIR"))
    register_spec(PreprocessingSpec("brat-tiny", sequences=("t1c",), spatial_size=(32, 128, 128), **brat,
                                    description="brat-v1 steps with a 32x128x128 resize; T1c only"))
    register_spec(PreprocessingSpec("brat-tiny-multimodal", sequences=SEQUENCES, spatial_size=(32, 128, 128), **brat,
                                    description="brat-v1 steps with a 32x128x128 resize; T1c, T1, T2, FLAIR"))
    register_spec(PreprocessingSpec(
        "ct-v1", version=1, sequences=("ct",), pixdim=(1.5, 1.5, 1.5), axcodes="SAR", spatial_size=(32, 256, 256),
        normalization="window", window=(-1000.0, 1000.0), nonzero=False,
        description="chest CT (our choice, not from the brat paper): 1.5 mm, SAR, HU [-1000, 1000] to [0, 1], "
        "area resize to 32x256x256",
    ))


_register_builtin_specs()


# -- loading one study -------------------------------------------------------------------


def load_study(row: Mapping[str, Any], spec: PreprocessingSpec) -> np.ndarray:
    """Load and preprocess one study into a float32 array ``(C, *spec.spatial_size)``.

    ``row`` maps sequence names to absolute image paths (missing: absent, ``None`` or
    NaN) and may carry ``study_id`` for messages. The first present sequence in
    ``spec.sequences`` defines the grid: it is resampled to ``spec.pixdim``, and every
    other sequence is resampled onto that grid. A missing sequence is an all-zero
    channel, and stays zero after normalisation.

    Raises:
        PreprocessingError: no sequence of the spec is present, a file cannot be read or
            is not 3D, or the result is not finite.
    """
    import torch
    from monai.data import MetaTensor

    study = _study_label(row)
    paths = {seq: str(row[seq]) for seq in spec.sequences if seq in row and not is_missing(row[seq])}
    if not paths:
        raise PreprocessingError(
            f"study {study}: none of the sequences {', '.join(spec.sequences)} that spec {spec.name!r} "
            "needs has an image path; fill one of these manifest columns or choose another spec"
        )

    reference = next(seq for seq in spec.sequences if seq in paths)
    ref_image = _load_volume(paths[reference], study)
    grid_affine, grid_shape = target_grid(ref_image, spec)
    channels = []
    for seq in spec.sequences:
        if seq not in paths:
            channels.append(torch.zeros((1, *grid_shape), dtype=torch.float32))
            continue
        image = ref_image if seq == reference else _load_volume(paths[seq], study)
        # NOTE: border padding (the default of MONAI Spacing) repeats edge voxels where another
        # sequence covers less of the head than the reference; zero padding may suit such data better.
        channels.append(resample_to_grid(image, grid_affine, grid_shape, spec.resample_mode))

    volume = MetaTensor(torch.cat(channels), affine=grid_affine)
    volume = _orient_and_resize(volume, spec, spec.resize_mode)
    volume = intensity_transform(spec)(volume)
    output = volume.as_tensor().numpy().astype(np.float32, copy=False)
    for index, seq in enumerate(spec.sequences):
        if seq not in paths:
            output[index] = 0.0  # explicit, so the contract does not rest on MONAI's constant-channel handling

    if not np.all(np.isfinite(output)):
        raise PreprocessingError(
            f"study {study}: the preprocessed array has NaN or infinite values; "
            "check the images for NaN voxels with `brat-harness check`"
        )
    return output


def load_segmentation(row: Mapping[str, Any], spec: PreprocessingSpec) -> np.ndarray:
    """Load a study's segmentation through the spatial steps of ``spec`` with nearest-neighbour.

    Returns an int32 label array ``spec.spatial_size`` that lines up voxel for voxel with
    :func:`load_study`. The segmentation must be on the grid of the study's first present
    sequence (what ``brat-harness check`` verifies); otherwise this raises
    :class:`PreprocessingError`.
    """
    import nibabel as nib
    from monai.transforms import Spacing

    study = _study_label(row)
    seg_path = row.get(SEGMENTATION_COLUMN)
    if is_missing(seg_path):
        raise PreprocessingError(f"study {study}: no segmentation path in column {SEGMENTATION_COLUMN!r}")
    reference = next((seq for seq in spec.sequences if seq in row and not is_missing(row[seq])), None)
    if reference is None:
        raise PreprocessingError(f"study {study}: no image of spec {spec.name!r} to align the segmentation with")

    try:
        ref_header, seg_header = nib.load(str(row[reference])), nib.load(str(seg_path))
    except (OSError, ValueError) as error:
        raise PreprocessingError(f"study {study}: cannot read the headers of {row[reference]} / {seg_path}: {error}") from None
    same_grid = ref_header.shape[:3] == seg_header.shape[:3] and np.allclose(
        ref_header.affine, seg_header.affine, atol=AFFINE_ATOL
    )
    if not same_grid:
        raise PreprocessingError(
            f"study {study}: segmentation {seg_path} is not on the grid of {reference} image {row[reference]}; "
            "resample it onto that image (run `brat-harness check` to list such studies)"
        )

    segmentation = _load_volume(str(seg_path), study)
    segmentation = Spacing(pixdim=spec.pixdim, mode="nearest")(segmentation)
    # "nearest-exact" samples block centres like the area resize of the image does; plain
    # "nearest" (floor) would shift the labels by up to one output slice.
    segmentation = _orient_and_resize(segmentation, spec, "nearest-exact")
    return np.rint(np.asarray(segmentation[0])).astype(np.int32)


def intensity_transform(spec: PreprocessingSpec) -> Any:
    """Build the intensity steps of ``spec`` as a MONAI ``Compose`` on ``(C, ...)`` tensors."""
    from monai.transforms import Compose, NormalizeIntensity, ScaleIntensity, ScaleIntensityRange

    low, high = spec.output_range
    if spec.normalization == "window":
        assert spec.window is not None
        return Compose([ScaleIntensityRange(a_min=spec.window[0], a_max=spec.window[1], b_min=low, b_max=high, clip=True)])
    return Compose([
        NormalizeIntensity(nonzero=spec.nonzero, channel_wise=spec.channel_wise),
        ScaleIntensity(minv=low, maxv=high, channel_wise=spec.channel_wise),
    ])


def target_grid(image: Any, spec: PreprocessingSpec) -> tuple[Any, tuple[int, int, int]]:
    """Return the affine ``(4, 4)`` and shape that MONAI ``Spacing`` would give ``image``, without resampling.

    ``Spacing`` runs in lazy mode, so only the output geometry is computed.
    """
    from monai.transforms import Spacing

    pending = Spacing(pixdim=spec.pixdim, mode=spec.resample_mode, lazy=True)(image)
    shape = tuple(int(n) for n in pending.peek_pending_shape())
    return pending.peek_pending_affine().to(dtype=image.affine.dtype), shape  # type: ignore[return-value]


def resample_to_grid(image: Any, affine: Any, shape: tuple[int, int, int], mode: str) -> Any:
    """Resample a channel-first MetaTensor ``(1, X, Y, Z)`` onto ``affine``/``shape``; returns ``(1, *shape)``.

    Where the voxel-to-voxel map is axis-aligned (no rotation between the two grids,
    which is always true for the spacing step because ``Spacing`` keeps the voxel axes)
    and ``mode`` is bilinear, trilinear
    interpolation is done as three 1D interpolations (matrix products). That gives the
    same values as MONAI's ``grid_sample`` path with ``align_corners=False`` and border
    padding (tests compare the two) and is several times faster on the CPU. Other cases
    use MONAI ``SpatialResample``.
    """
    import torch
    from monai.transforms import SpatialResample

    src = image.affine.to(torch.float64)
    voxel_map = torch.linalg.solve(src, torch.as_tensor(affine, dtype=torch.float64))
    linear = voxel_map[:3, :3]
    axis_aligned = bool(torch.all((linear - torch.diag(torch.diagonal(linear))).abs() < 1e-6))
    if mode == "bilinear" and axis_aligned:
        data = image.as_tensor().to(torch.float32)
        for axis in range(3):
            positions = voxel_map[axis, axis] * torch.arange(shape[axis], dtype=torch.float64) + voxel_map[axis, 3]
            data = _interpolate_axis(data, axis + 1, _linear_weights(data.shape[axis + 1], positions))
        return data
    resampler = SpatialResample(mode=mode, padding_mode="border", align_corners=False)
    return resampler(image, dst_affine=torch.as_tensor(affine, dtype=torch.float64), spatial_size=shape).as_tensor()


def _linear_weights(n_in: int, positions: Any) -> Any:
    """Return the ``(n_out, n_in)`` matrix of 1D linear interpolation at ``positions`` (voxel units).

    Positions are clamped to ``[0, n_in - 1]``, which is ``grid_sample``'s border padding.
    """
    import torch

    positions = positions.clamp(0, n_in - 1)
    lower = positions.floor().long().clamp(0, n_in - 1)
    upper = (lower + 1).clamp(max=n_in - 1)
    upper_weight = positions - lower
    rows = torch.arange(len(positions))
    weights = torch.zeros((len(positions), n_in), dtype=torch.float64)
    weights.index_put_((rows, lower), 1 - upper_weight, accumulate=True)
    weights.index_put_((rows, upper), upper_weight, accumulate=True)
    return weights.to(torch.float32)


def _interpolate_axis(data: Any, axis: int, weights: Any) -> Any:
    """Apply ``weights`` ``(n_out, n_in)`` along ``axis`` of ``data``."""
    import torch

    # Contiguous operands keep the product on one GEMM. With a strided operand torch 2.14
    # took a slower path, measured about 70 times slower on a 69x78x23 volume on the CPU.
    moved = torch.movedim(data, axis, -1).contiguous()
    return torch.movedim(moved @ weights.T, -1, axis).contiguous()


def _orient_and_resize(volume: Any, spec: PreprocessingSpec, resize_mode: str) -> Any:
    from monai.transforms import Orientation, Resize

    volume = Orientation(axcodes=spec.axcodes, labels=RAS_LABELS)(volume)
    return Resize(spatial_size=spec.spatial_size, mode=resize_mode)(volume)


def _load_volume(path: str, study: str) -> Any:
    """Load a NIfTI file as a channel-first float32 MetaTensor ``(1, X, Y, Z)``."""
    from monai.transforms import LoadImage

    if not Path(path).is_file():
        raise PreprocessingError(f"study {study}: image file not found: {path}")
    try:
        image = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)(path)
    except (OSError, ValueError, RuntimeError, EOFError) as error:
        raise PreprocessingError(f"study {study}: cannot read {path}: {error}") from None
    if image.ndim != 4 or image.shape[0] != 1:
        raise PreprocessingError(
            f"study {study}: {path} is not a 3D image (loaded as {tuple(image.shape)} channel-first); "
            "a 4D file must hold a single volume"
        )
    return image


def _study_label(row: Mapping[str, Any]) -> str:
    study_id = row.get("study_id")
    return "(no study_id)" if is_missing(study_id) else repr(str(study_id))


# -- input fingerprints ------------------------------------------------------------------


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return ``{"size", "mtime_ns", "sha256_head_tail"}`` for a file.

    The hash covers the first and the last MiB (the whole file when it is smaller than
    2 MiB). For gzip files the last bytes hold the CRC-32 and length of the whole
    uncompressed content, so an edit anywhere changes the hash. Any rewrite changes
    ``mtime_ns``. A copy that gets a new mtime therefore counts as changed, which costs
    one recomputation and never gives a stale result.
    """
    file = Path(path)
    stat = file.stat()
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        if stat.st_size <= 2 * FINGERPRINT_CHUNK:
            digest.update(handle.read())
        else:
            digest.update(handle.read(FINGERPRINT_CHUNK))
            handle.seek(-FINGERPRINT_CHUNK, os.SEEK_END)
            digest.update(handle.read(FINGERPRINT_CHUNK))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256_head_tail": digest.hexdigest()}


# -- a whole manifest --------------------------------------------------------------------


def study_filename(study_id: str) -> str:
    """Return a file-name stem for a study id: percent-encoded, so ``/`` and other unsafe characters cannot escape the folder."""
    stem = quote(study_id, safe="-_.")
    return "%2E" + stem[1:] if stem.startswith(".") else stem


def output_folder(out_dir: str | os.PathLike[str], spec: PreprocessingSpec) -> Path:
    """Return ``out_dir/<spec.name>-<digest[:12]>``, where :func:`preprocess_manifest` writes."""
    return Path(out_dir) / spec.folder_name


def preprocess_manifest(
    manifest_path: str | os.PathLike[str],
    spec_name: str,
    out_dir: str | os.PathLike[str],
    workers: int | None = None,
    progress: bool = True,
    preview: int = 0,
) -> dict[str, Any]:
    """Write one ``<study>.npy`` (float32 ``(C, S, A, R)``) and ``<study>.json`` sidecar per study.

    Files go to :func:`output_folder`. A study is skipped when its array exists and its
    sidecar records the same spec digest and the same input :func:`file_fingerprint`.
    A failed study is recorded and the others continue. ``preview`` saves
    three-orthogonal-slice PNGs of the first N studies to ``<folder>/preview/``.

    Args:
        workers: processes (default ``min(2, os.cpu_count())``); 1 runs in this process.

    Returns:
        ``{"written": n, "skipped": n, "failed": n, "output_dir": str, "errors": {study_id: message}}``.
    """
    spec = get_spec(spec_name)
    df = read_manifest(manifest_path)
    studies = _manifest_studies(df, spec, manifest_path)
    folder = output_folder(out_dir, spec)
    folder.mkdir(parents=True, exist_ok=True)
    workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    logger.info("preprocessing %d studies from %s with spec %s into %s", len(studies), manifest_path, spec.name, folder)

    jobs, errors, skipped = [], {}, 0
    for study in studies:
        try:
            inputs = _input_fingerprints(study, spec)
        except (PreprocessingError, OSError) as error:
            errors[study["study_id"]] = str(error)
            continue
        if _is_up_to_date(folder, study["study_id"], spec, inputs):
            skipped += 1
        else:
            jobs.append((study, inputs, spec, str(folder)))

    errors.update(_run_jobs(jobs, workers, progress))
    written = len(jobs) - sum(1 for job in jobs if job[0]["study_id"] in errors)
    if preview > 0:
        _write_previews([s for s in studies if s["study_id"] not in errors][:preview], spec, folder)

    logger.info("preprocessing done: %d written, %d skipped (up to date), %d failed", written, skipped, len(errors))
    return {"written": written, "skipped": skipped, "failed": len(errors), "output_dir": str(folder), "errors": errors}


def _manifest_studies(df: Any, spec: PreprocessingSpec, manifest_path: Any) -> list[dict[str, Any]]:
    """Return one ``{study_id, <sequence paths>, segmentation}`` dict per row; ids must be present and unique."""
    if "study_id" not in df.columns:
        raise ManifestError(f"{manifest_path}: missing required column 'study_id'; run `brat-harness check` on it")
    studies, seen = [], set()
    for row, record in enumerate(df.to_dict(orient="records"), start=1):
        study_id = record["study_id"]
        if is_missing(study_id) or study_id in seen:
            problem = "missing" if is_missing(study_id) else f"duplicate {study_id!r}"
            raise ManifestError(f"{manifest_path}: row {row}: {problem} study_id; give every study a unique id")
        seen.add(study_id)
        keys = (*spec.sequences, SEGMENTATION_COLUMN)
        studies.append({"study_id": study_id, **{k: record[k] for k in keys if k in record and not is_missing(record[k])}})
    return studies


def _input_fingerprints(study: Mapping[str, Any], spec: PreprocessingSpec) -> dict[str, Any]:
    inputs = {}
    for seq in spec.sequences:
        if seq not in study:
            continue
        try:
            inputs[seq] = {"path": study[seq], **file_fingerprint(study[seq])}
        except FileNotFoundError:
            raise PreprocessingError(f"study {study['study_id']!r}: {seq} image file not found: {study[seq]}") from None
    if not inputs:
        raise PreprocessingError(
            f"study {study['study_id']!r}: none of the sequences {', '.join(spec.sequences)} that spec "
            f"{spec.name!r} needs has an image path"
        )
    return inputs


def _is_up_to_date(folder: Path, study_id: str, spec: PreprocessingSpec, inputs: Mapping[str, Any]) -> bool:
    stem = study_filename(study_id)
    sidecar = folder / f"{stem}.json"
    if not (folder / f"{stem}.npy").is_file() or not sidecar.is_file():
        return False
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded.get("spec", {}).get("digest") == spec.digest and recorded.get("inputs") == inputs


def _run_jobs(jobs: list[tuple[Any, ...]], workers: int, progress: bool) -> dict[str, str]:
    """Run the jobs in this process (1 worker) or a process pool; return ``{study_id: error}``."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    errors: dict[str, str] = {}
    with tqdm(total=len(jobs), unit="study", disable=not progress or not jobs, desc="preprocess") as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                study_id, error = _preprocess_job(job)
                if error:
                    errors[study_id] = error
                bar.update()
            return errors
        with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_init_worker) as pool:
            for future in as_completed([pool.submit(_preprocess_job, job) for job in jobs]):
                study_id, error = future.result()
                if error:
                    errors[study_id] = error
                bar.update()
    return errors


def _pool_context() -> Any:
    """Return a forkserver context that imports this module (and MONAI) once, or spawn where there is none.

    Workers forked from the server start without re-importing MONAI (seconds per
    process), and, unlike plain fork, never inherit a parent's torch thread pool.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, "monai.transforms"])
    return context


def _init_worker() -> None:
    """Use one torch thread per worker process, so W workers use W cores."""
    import torch

    torch.set_num_threads(1)


def _preprocess_job(job: tuple[Any, ...]) -> tuple[str, str | None]:
    """Preprocess one study and write its array and sidecar; return ``(study_id, error or None)``."""
    from harness.io import atomic_path, write_json_atomic

    study, inputs, spec, folder = job
    study_id = study["study_id"]
    stem = study_filename(study_id)
    try:
        volume = load_study(study, spec)
        with atomic_path(Path(folder) / f"{stem}.npy") as tmp:
            np.save(tmp, volume)
        write_json_atomic(Path(folder) / f"{stem}.json", _sidecar(study_id, spec, inputs, volume))
    except Exception as error:  # noqa: BLE001 - one bad study must not stop the others
        logger.debug("study %r failed", study_id, exc_info=True)
        return study_id, str(error) if isinstance(error, PreprocessingError) else f"study {study_id!r}: {type(error).__name__}: {error}"
    return study_id, None


def _sidecar(study_id: str, spec: PreprocessingSpec, inputs: Mapping[str, Any], volume: np.ndarray) -> dict[str, Any]:
    import monai
    import torch

    from harness import __version__

    return {
        "study_id": study_id,
        "spec": {"name": spec.name, "version": spec.version, "digest": spec.digest},
        "inputs": dict(inputs),
        "output": {"file": f"{study_filename(study_id)}.npy", "shape": list(volume.shape), "dtype": str(volume.dtype)},
        "versions": {"brat_harness": __version__, "monai": monai.__version__, "torch": torch.__version__},
    }


def _write_previews(studies: list[dict[str, Any]], spec: PreprocessingSpec, folder: Path) -> None:
    from harness.preview import save_orthogonal_slices

    for study in studies:
        stem = study_filename(study["study_id"])
        volume = np.load(folder / f"{stem}.npy", mmap_mode="r")
        segmentation = None
        if SEGMENTATION_COLUMN in study:
            try:
                segmentation = load_segmentation(study, spec)
            except PreprocessingError as error:
                logger.warning("drawing a preview without its segmentation outline (details at DEBUG level)")
                logger.debug("segmentation for preview failed: %s", error)
        save_orthogonal_slices(volume, folder / "preview" / f"{stem}.png", segmentation=segmentation,
                               channel_names=spec.sequences)
    logger.info("wrote %d previews to %s", len(studies), folder / "preview")


__all__ = [
    "PreprocessingError",
    "PreprocessingSpec",
    "SPECS",
    "file_fingerprint",
    "get_spec",
    "intensity_transform",
    "list_specs",
    "load_segmentation",
    "load_study",
    "output_folder",
    "preprocess_manifest",
    "register_spec",
    "resample_to_grid",
    "study_filename",
    "target_grid",
]
