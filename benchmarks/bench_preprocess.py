"""Measure preprocessing throughput (studies per second) and the time of each step of one study.

Without ``--manifest`` the script writes a synthetic cohort to a temporary folder:
head-sized volumes of 160x192x160 voxels at 1.2x1.2x1.5 mm, int16, seeded. Each
(spec, workers) pair preprocesses the whole cohort into a fresh output folder, so
nothing is skipped. Before the timed runs, one warm-up pool preprocesses a single
study, so the forkserver has imported MONAI once (tens of seconds on a loaded machine)
and the rates below measure steady state. Each timed pool still starts its own workers.

The in-process run (1 worker) is limited to one torch thread, like each pool worker,
so "W workers" means W cores.

Usage:
    python benchmarks/bench_preprocess.py --studies 8 --workers 1 2
    python benchmarks/bench_preprocess.py --manifest cohort/manifest.csv --specs brat-v1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (160, 192, 160)
SPACING = (1.2, 1.2, 1.5)


def write_cohort(folder: Path, n_studies: int, seed: int = 0) -> Path:
    """Write ``n_studies`` synthetic T1c volumes and a manifest; return the manifest path."""
    import nibabel as nib
    import pandas as pd

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    head = (grid**2).sum(axis=0) < 0.8
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = -np.array(SPACING) * (np.array(SHAPE) - 1) / 2
    rows = []
    for i in range(n_studies):
        data = np.where(head, 400 + 80 * rng.standard_normal(SHAPE), 0).astype(np.int16)
        path = folder / f"sub-{i:03d}_t1c.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(path))
        rows.append({"study_id": f"S{i:03d}", "subject_id": f"P{i:03d}", "split": "test",
                     "t1c": path.name, "report": "synthetic"})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def time_steps(manifest: Path, spec_name: str, repeats: int = 2) -> dict[str, float]:
    """Return the fastest time (s) of each step of the first study over ``repeats`` runs."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    from harness.manifest import read_manifest
    from harness.preprocessing import (
        _load_volume,
        _orient_and_resize,
        get_spec,
        intensity_transform,
        resample_to_grid,
        target_grid,
    )

    spec = get_spec(spec_name)
    path = read_manifest(manifest).loc[0, spec.sequences[0]]
    best: dict[str, float] = {}
    for _ in range(repeats):
        times = {}
        start = time.perf_counter()
        image = _load_volume(path, "benchmark")
        times["load"] = time.perf_counter() - start

        start = time.perf_counter()
        affine, shape = target_grid(image, spec)
        resampled = resample_to_grid(image, affine, shape, spec.resample_mode)
        times["resample (separable)"] = time.perf_counter() - start

        start = time.perf_counter()
        Spacing(pixdim=spec.pixdim, mode=spec.resample_mode)(image)
        times["resample (MONAI Spacing, reference)"] = time.perf_counter() - start

        start = time.perf_counter()
        volume = _orient_and_resize(MetaTensor(resampled, affine=affine), spec, spec.resize_mode)
        times["orient + resize"] = time.perf_counter() - start

        start = time.perf_counter()
        intensity_transform(spec)(volume)
        times["intensity"] = time.perf_counter() - start
        best = {k: min(v, best.get(k, float("inf"))) for k, v in times.items()}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, help="existing manifest; default: a synthetic cohort")
    parser.add_argument("--studies", type=int, default=8, help="synthetic studies to write (default 8)")
    parser.add_argument("--specs", nargs="+", default=["brat-v1", "brat-tiny"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    import torch

    from harness.manifest import read_manifest
    from harness.preprocessing import preprocess_manifest

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        manifest = args.manifest or write_cohort(Path(tmp), args.studies)
        n_rows = sum(1 for _ in open(manifest, encoding="utf-8")) - 1 if manifest.suffix == ".csv" else None
        print(f"manifest {manifest} ({n_rows if n_rows is not None else '?'} studies), cpus {os.cpu_count()}")

        print("\n| spec | step | seconds |\n| --- | --- | --- |")
        for spec_name in args.specs:
            for step, seconds in time_steps(manifest, spec_name).items():
                print(f"| {spec_name} | {step} | {seconds:.2f} |")

        if max(args.workers) > 1:
            warmup = Path(tmp) / "warmup.csv"
            read_manifest(manifest).head(2).to_csv(warmup, index=False)  # absolute paths, so any folder works
            preprocess_manifest(warmup, args.specs[0], Path(tmp) / "warmup", workers=2, progress=False)

        print("\n| spec | workers | studies | wall s | studies/s |\n| --- | --- | --- | --- | --- |")
        for spec_name in args.specs:
            for workers in args.workers:
                out = Path(tmp) / f"out-{spec_name}-{workers}"
                start = time.perf_counter()
                result = preprocess_manifest(manifest, spec_name, out, workers=workers, progress=False)
                wall = time.perf_counter() - start
                done = result["written"]
                print(f"| {spec_name} | {workers} | {done} | {wall:.1f} | {done / wall:.2f} |")
                if result["failed"]:
                    print(f"  {result['failed']} studies failed: {list(result['errors'].values())[:3]}")


if __name__ == "__main__":
    main()
