"""Preprocessing specs: geometry (SAR), intensity, multimodal stacking, digests, and the preprocess command."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from harness.cli import main
from harness.preprocessing import (
    PreprocessingSpec,
    get_spec,
    intensity_transform,
    list_specs,
    load_segmentation,
    load_study,
    output_folder,
    preprocess_manifest,
    register_spec,
    resample_to_grid,
    study_filename,
    target_grid,
)

FOV_MM = 70.0
MARKER_LAS = (-15.0, 15.0, 15.0)  # world RAS+ mm: left, anterior, superior
BRAT_V1_DIGEST = "3a05178aa39fd3764d2997fe4eecf0d429f2a6504af1e329ce87688d4935c643"


def _rotation(degrees_z: float, degrees_x: float) -> np.ndarray:
    z, x = np.radians(degrees_z), np.radians(degrees_x)
    rot_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rot_z @ rot_x


def _grid(spacing, flips=(1, 1, 1), degrees=(0.0, 0.0)) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Return an affine and shape covering a FOV_MM cube centred on the world origin."""
    shape = tuple(int(round(FOV_MM / s)) for s in spacing)
    linear = _rotation(*degrees) @ np.diag(np.array(flips, float) * np.array(spacing, float))
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((np.array(shape) - 1) / 2)
    return affine, shape


def _head(affine: np.ndarray, shape, marker=MARKER_LAS) -> np.ndarray:
    """A sphere of intensity 100 (radius 30 mm) with a bright marker (1000, radius 6 mm) at ``marker`` (world mm)."""
    ijk = np.indices(shape).reshape(3, -1).astype(float)
    world = affine[:3, :3] @ ijk + affine[:3, 3:4]
    data = np.where(np.linalg.norm(world, axis=0) < 30, 100.0, 0.0)
    data[np.linalg.norm(world - np.array(marker)[:, None], axis=0) < 6] = 1000.0
    return data.reshape(shape).astype(np.float32)


def _marker_fraction(channel: np.ndarray) -> np.ndarray:
    """Centroid of the bright voxels as a fraction of each axis length (0 = first index, 1 = last)."""
    bright = np.argwhere(channel > 0.6 * channel.max())
    assert len(bright), "no marker voxels found"
    return bright.mean(axis=0) / (np.array(channel.shape) - 1)


# -- geometry ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["axis-aligned RAS", "LPS", "oblique"])
@pytest.mark.parametrize("spec_name", ["brat-v1", "brat-tiny"])
def test_marker_lands_in_sar_region(write_nifti, name, spec_name):
    grids = {
        "axis-aligned RAS": _grid((1.2, 0.9, 3.0)),
        "LPS": _grid((1.2, 0.9, 3.0), flips=(-1, -1, 1)),
        "oblique": _grid((1.2, 0.9, 3.0), degrees=(20.0, 10.0)),
    }
    affine, shape = grids[name]
    path = write_nifti("t1c.nii.gz", _head(affine, shape), affine)
    spec = get_spec(spec_name)

    out = load_study({"study_id": "S1", "t1c": path}, spec)

    assert out.shape == (1, *spec.spatial_size)
    assert out.dtype == np.float32
    superior, anterior, right = _marker_fraction(out[0])
    if name == "oblique":
        # The spacing step keeps the oblique voxel axes, so only the octant is certain.
        assert superior > 0.55
        assert anterior > 0.55
        assert right < 0.45
    else:
        expected = (np.array([MARKER_LAS[2], MARKER_LAS[1], MARKER_LAS[0]]) + FOV_MM / 2) / FOV_MM
        np.testing.assert_allclose([superior, anterior, right], expected, atol=0.06)


@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, -1, 1), (-1, 1, -1)])
def test_fast_resample_matches_monai_spacing(write_nifti, flips):
    from monai.transforms import LoadImage, Spacing

    affine, shape = _grid((1.2, 0.9, 3.0), flips=flips)
    affine[:3, 3] += (0.37, -1.21, 0.5)  # sub-voxel offsets
    data = np.random.default_rng(0).random(shape).astype(np.float32) * 1000
    image = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True)(
        write_nifti("x.nii.gz", data, affine)
    )
    reference = Spacing(pixdim=(1.0, 1.0, 1.0), mode="bilinear")(image)

    grid_affine, grid_shape = target_grid(image, get_spec("brat-v1"))
    fast = resample_to_grid(image, grid_affine, grid_shape, "bilinear")

    assert grid_shape == tuple(reference.shape[1:])
    assert torch.allclose(grid_affine, reference.affine.to(grid_affine.dtype))
    assert float((fast - reference.as_tensor()).abs().max()) < 1e-4 * 1000


def test_segmentation_aligns_with_image(write_nifti):
    affine, shape = _grid((1.2, 0.9, 3.0), flips=(-1, -1, 1))
    head = _head(affine, shape)
    row = {
        "study_id": "S1",
        "t1c": write_nifti("t1c.nii.gz", head, affine),
        "segmentation": write_nifti("seg.nii.gz", (head > 500).astype(np.uint8), affine),
    }
    spec = get_spec("brat-tiny")

    image = load_study(row, spec)[0]
    segmentation = load_segmentation(row, spec)

    assert segmentation.shape == spec.spatial_size
    assert segmentation.dtype == np.int32
    assert set(np.unique(segmentation)) == {0, 1}
    # Nearest-neighbour labels include the marker's blurred rim, so compare medians.
    assert np.median(image[segmentation == 1]) > 0.8
    assert np.median(image[segmentation == 0]) < 0.5
    np.testing.assert_allclose(_marker_fraction(segmentation.astype(np.float32)), _marker_fraction(image), atol=0.03)


def test_segmentation_on_other_grid_is_rejected(write_nifti):
    affine, shape = _grid((2.0, 2.0, 2.0))
    shifted = affine.copy()
    shifted[0, 3] += 4.0
    row = {
        "study_id": "S1",
        "t1c": write_nifti("t1c.nii.gz", _head(affine, shape), affine),
        "segmentation": write_nifti("seg.nii.gz", np.zeros(shape, np.uint8), shifted),
    }
    with pytest.raises(ValueError, match="not on the grid of t1c"):
        load_segmentation(row, get_spec("brat-tiny"))


# -- intensity ---------------------------------------------------------------------------


def _zscore_minmax_by_hand(channel: np.ndarray) -> np.ndarray:
    nonzero = channel != 0
    z = channel.astype(np.float64).copy()
    z[nonzero] = (channel[nonzero] - channel[nonzero].mean()) / channel[nonzero].std()
    return (z - z.min()) / (z.max() - z.min())


def test_intensity_zscore_minmax_by_hand():
    rng = np.random.default_rng(1)
    data = rng.normal(200, 40, size=(2, 5, 6, 7)).astype(np.float32)
    data[1] *= 10
    data[:, :2] = 0.0  # background
    out = intensity_transform(get_spec("brat-v1"))(torch.from_numpy(data.copy()))
    out = np.asarray(out)

    for channel in range(2):
        expected = _zscore_minmax_by_hand(data[channel])
        np.testing.assert_allclose(out[channel], expected, atol=1e-5)
    # Background that was exactly 0 ends at a mid value, as in the released pipeline.
    background = out[0, 0, 0, 0]
    assert 0.2 < background < 0.8
    np.testing.assert_allclose(background, _zscore_minmax_by_hand(data[0])[0, 0, 0], atol=1e-5)


def test_intensity_constant_channel_stays_zero():
    data = torch.zeros((2, 4, 4, 4))
    data[0] = torch.arange(64.0).reshape(4, 4, 4)
    out = np.asarray(intensity_transform(get_spec("brat-v1-multimodal"))(data))
    assert np.all(out[1] == 0)
    assert np.all(np.isfinite(out))


def test_ct_window_scaling():
    hu = torch.tensor([-2000.0, -1000.0, 0.0, 500.0, 1000.0, 3000.0]).reshape(1, 1, 1, 6)
    out = np.asarray(intensity_transform(get_spec("ct-v1"))(hu)).ravel()
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 0.75, 1.0, 1.0], atol=1e-6)


# -- multimodal --------------------------------------------------------------------------


def _multimodal_row(write_nifti, include_t1c=True):
    """t1c and t1 share a RAS grid; FLAIR is on a rotated 2 mm LPS grid; T2 is missing."""
    ras, ras_shape = _grid((1.2, 0.9, 3.0))
    lps, lps_shape = _grid((2.0, 2.0, 2.0), flips=(-1, -1, 1), degrees=(8.0, 0.0))
    row = {
        "study_id": "S1",
        "t1": write_nifti("t1.nii.gz", _head(ras, ras_shape, marker=(15.0, -15.0, 15.0)), ras),
        "flair": write_nifti("flair.nii.gz", _head(lps, lps_shape, marker=(15.0, 15.0, -15.0)), lps),
    }
    if include_t1c:
        row["t1c"] = write_nifti("t1c.nii.gz", _head(ras, ras_shape), ras)
    return row


def test_multimodal_channel_order_and_missing_channel(write_nifti):
    spec = get_spec("brat-tiny-multimodal")
    out = load_study(_multimodal_row(write_nifti), spec)

    assert spec.sequences == ("t1c", "t1", "t2", "flair")
    assert out.shape == (4, 32, 128, 128)
    assert np.all(np.isfinite(out))
    assert np.all(out[2] == 0), "missing T2 must be an all-zero channel"
    expected = {0: (0.71, 0.71, 0.29), 1: (0.71, 0.29, 0.71), 3: (0.29, 0.71, 0.71)}  # (S, A, R) fractions
    for channel, fractions in expected.items():
        np.testing.assert_allclose(_marker_fraction(out[channel]), fractions, atol=0.08, err_msg=f"channel {channel}")


def test_multimodal_without_first_sequence(write_nifti):
    out = load_study(_multimodal_row(write_nifti, include_t1c=False), get_spec("brat-tiny-multimodal"))
    assert out.shape == (4, 32, 128, 128)
    assert np.all(out[0] == 0)
    assert np.all(out[2] == 0)
    assert out[1].max() == pytest.approx(1.0)


def test_load_study_without_any_sequence():
    with pytest.raises(ValueError, match="'S9'.*t1c"):
        load_study({"study_id": "S9", "flair": "/nowhere.nii.gz"}, get_spec("brat-v1"))


# -- specs -------------------------------------------------------------------------------


def test_spec_digest_pinned_and_distinct():
    specs = list_specs()
    names = [spec.name for spec in specs]
    assert {"brat-v1", "brat-v1-multimodal", "brat-tiny", "brat-tiny-multimodal", "ct-v1"} <= set(names)
    assert get_spec("brat-v1").digest == BRAT_V1_DIGEST
    digests = [spec.digest for spec in specs]
    assert len(set(digests)) == len(digests)


def test_spec_digest_tracks_fields_not_description():
    spec = get_spec("brat-v1")
    assert dataclasses.replace(spec, description="other words").digest == spec.digest
    assert dataclasses.replace(spec, spatial_size=(32, 256, 255)).digest != spec.digest
    assert dataclasses.replace(spec, version=2).digest != spec.digest
    assert spec.folder_name == f"brat-v1-{BRAT_V1_DIGEST[:12]}"


def test_brat_v1_fields():
    spec = get_spec("brat-v1")
    assert spec.sequences == ("t1c",)
    assert spec.pixdim == (1.0, 1.0, 1.0)
    assert spec.axcodes == "SAR"
    assert spec.spatial_size == (32, 256, 256)
    assert (spec.resample_mode, spec.resize_mode) == ("bilinear", "area")
    assert (spec.normalization, spec.nonzero, spec.channel_wise) == ("zscore-minmax", True, True)


def test_register_spec_rules():
    with pytest.raises(ValueError, match="already registered"):
        register_spec(get_spec("brat-v1"))
    with pytest.raises(KeyError, match="brat-v1"):
        get_spec("brat-v9")
    with pytest.raises(ValueError, match="axcodes"):
        PreprocessingSpec("bad", 1, ("t1c",), (1, 1, 1), "SSR", (8, 8, 8))
    with pytest.raises(ValueError, match="sequences"):
        PreprocessingSpec("bad", 1, ("dwi",), (1, 1, 1), "SAR", (8, 8, 8))


def test_study_filename_is_safe():
    assert study_filename("S-001_a.b") == "S-001_a.b"
    assert "/" not in study_filename("../etc/passwd")
    assert not study_filename("..").startswith(".")


# -- preprocess command ------------------------------------------------------------------


def _small_manifest(tmp_path, write_nifti, n=2, with_segmentation=False):
    affine, shape = _grid((2.0, 2.0, 2.5))
    rows = []
    for i in range(n):
        head = _head(affine, shape)
        row = {"study_id": f"S{i}", "subject_id": f"P{i}", "split": "train", "report": "ok",
               "t1c": os.path.relpath(write_nifti(f"img/s{i}.nii.gz", head, affine), tmp_path)}
        if with_segmentation and i == 0:
            row["segmentation"] = write_nifti("img/s0_seg.nii.gz", (head > 500).astype(np.uint8), affine)
        rows.append(row)
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path, affine, shape


def test_preprocess_writes_skips_and_recomputes(tmp_path, write_nifti, capsys):
    manifest, affine, shape = _small_manifest(tmp_path, write_nifti)
    out_dir = tmp_path / "out"
    args = ["preprocess", str(manifest), "--spec", "brat-tiny", "--out", str(out_dir), "--workers", "1", "--no-progress"]

    assert main(args) == 0
    assert "2 written, 0 skipped (up to date)" in capsys.readouterr().out
    folder = output_folder(out_dir, get_spec("brat-tiny"))
    first = np.load(folder / "S1.npy")
    assert first.shape == (1, 32, 128, 128)
    assert first.dtype == np.float32
    sidecar = json.loads((folder / "S1.json").read_text(encoding="utf-8"))
    assert sidecar["spec"]["digest"] == get_spec("brat-tiny").digest
    assert set(sidecar["inputs"]) == {"t1c"}
    assert {"size", "mtime_ns", "sha256_head_tail"} <= set(sidecar["inputs"]["t1c"])

    assert main(args) == 0
    assert "0 written, 2 skipped (up to date)" in capsys.readouterr().out

    write_nifti("img/s1.nii.gz", _head(affine, shape, marker=(15.0, 15.0, 15.0)), affine)
    result = preprocess_manifest(manifest, "brat-tiny", out_dir, workers=1, progress=False)
    assert (result["written"], result["skipped"], result["failed"]) == (1, 1, 0)
    assert not np.array_equal(np.load(folder / "S1.npy"), first)


def test_preprocess_failed_study_continues(tmp_path, write_nifti, capsys):
    manifest, _, _ = _small_manifest(tmp_path, write_nifti, n=3)
    os.remove(tmp_path / "img" / "s1.nii.gz")

    code = main(["preprocess", str(manifest), "--spec", "brat-tiny", "--out", str(tmp_path / "out"),
                 "--workers", "1", "--no-progress"])
    captured = capsys.readouterr()

    assert code == 1
    assert "2 written, 0 skipped (up to date), 1 failed" in captured.out
    assert "'S1'" in captured.err
    assert "not found" in captured.err
    assert not (output_folder(tmp_path / "out", get_spec("brat-tiny")) / "S1.npy").exists()


def test_preprocess_unknown_spec(tmp_path, write_nifti, capsys):
    manifest, _, _ = _small_manifest(tmp_path, write_nifti, n=1)
    code = main(["preprocess", str(manifest), "--spec", "brat-v9", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown preprocessing spec 'brat-v9'" in err
    assert "brat-v1" in err


def test_preprocess_preview_draws_outline(tmp_path, write_nifti):
    import matplotlib.image

    manifest, _, _ = _small_manifest(tmp_path, write_nifti, with_segmentation=True)
    result = preprocess_manifest(manifest, "brat-tiny", tmp_path / "out", workers=1, progress=False, preview=2)

    previews = {name: matplotlib.image.imread(os.path.join(result["output_dir"], "preview", f"{name}.png"))
                for name in ("S0", "S1")}
    red = {name: np.sum((p[..., 0] > 0.8) & (p[..., 1] < 0.3) & (p[..., 2] < 0.3)) for name, p in previews.items()}
    assert previews["S0"].shape[:2] == (300, 900)
    assert red["S0"] > 20, "the segmentation outline is missing"
    assert red["S1"] == 0


@pytest.mark.slow
def test_preprocess_process_pool(tmp_path, write_nifti):
    manifest, _, _ = _small_manifest(tmp_path, write_nifti, n=3)
    pooled = preprocess_manifest(manifest, "brat-tiny", tmp_path / "pool", workers=2, progress=False)
    serial = preprocess_manifest(manifest, "brat-tiny", tmp_path / "serial", workers=1, progress=False)
    assert (pooled["written"], pooled["failed"]) == (3, 0)
    for i in range(3):
        np.testing.assert_array_equal(
            np.load(os.path.join(pooled["output_dir"], f"S{i}.npy")),
            np.load(os.path.join(serial["output_dir"], f"S{i}.npy")),
        )
