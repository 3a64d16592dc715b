"""Time brat-tiny pretraining on the synthetic cohort and measure test retrieval and view diversity.

Usage:
    python benchmarks/bench_pretrain.py [--cohort DIR] [--n 600] [--objectives pva,pva-no-qd,clip]
        [--epochs E] [--batch-size B] [--lr LR] [--dpp-weight W] [--seed S] [--out DIR] [--figures DIR] [--resume]

Steps, each timed: generate the T1c-only cohort (skipped when ``DIR/manifest.csv``
exists), preprocess it with the ``brat-tiny`` spec (studies already done are skipped),
then for each objective pretrain from ``configs/pretrain-brat-tiny.yaml`` (``clip``:
``configs/pretrain-clip-tiny.yaml``) and evaluate the last checkpoint (and, for
comparison, ``best/``) on the ``test`` split: image-to-report (i2t) and report-to-image
(t2i) recall@k with the model's scorer, chance R@5 = 5 / N_test, top-5 hubness (how many
images have the most retrieved report in their top 5, and the share of reports in no
top-5 list) and the mean cosine between different views of a study. The ``pva`` run
also writes two figures: attention maps of four views over one study, and an MDS map of
the test-split view embeddings (``pva-no-qd`` gets an MDS map as well). With
``--resume``, a finished run in ``--out`` is evaluated again without training, and the
printed training time is then only that of loading the run.

Prints one summary line per objective and writes ``OUT/bench_pretrain.json``. The load
average is printed, because other processes on the machine slow the run.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"clip": REPO / "configs" / "pretrain-clip-tiny.yaml"}
DEFAULT_CONFIG = REPO / "configs" / "pretrain-brat-tiny.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, default=REPO / "data" / "cohort600", help="cohort folder (default data/cohort600)")
    parser.add_argument("--n", type=int, default=600, help="studies to generate when the cohort is missing (default 600)")
    parser.add_argument("--objectives", default="pva,pva-no-qd,clip", help="comma-separated objectives to train")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    parser.add_argument("--lr", type=float, default=None, help="override the config's learning rate")
    parser.add_argument("--dpp-weight", type=float, default=None, help="override the DPP weight of the pva objective")
    parser.add_argument("--seed", type=int, default=None, help="override the config's seed (initialisation and batch order)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-pretrain", help="run folders and results JSON")
    parser.add_argument("--figures", type=Path, default=REPO / "benchmarks" / "figures", help="PNG output folder")
    parser.add_argument("--resume", action="store_true", help="resume runs left in --out instead of failing")
    return parser.parse_args()


def prepare_cohort(args: argparse.Namespace) -> tuple[Path, float | None]:
    """Return the manifest and the generation time (None when the cohort was reused)."""
    from harness.cohort import generate_cohort

    manifest = args.cohort / "manifest.csv"
    if manifest.is_file():
        return manifest, None
    started = time.perf_counter()
    generate_cohort(args.cohort, args.n, seed=0, sequences=("t1c",), workers=min(2, os.cpu_count() or 1))
    return manifest, time.perf_counter() - started


def run_config(args: argparse.Namespace, objective: str, manifest: Path):
    from pretrained.train_config import parse_pretrain_config

    path = CONFIGS.get(objective, DEFAULT_CONFIG)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.update(objective=objective, manifest=str(manifest), cache_dir=str(args.cohort / "preprocessed"),
                output=str(args.out / objective), name=f"bench-{objective}")  # fmt: skip
    if args.epochs is not None:
        data["epochs"] = args.epochs
    if args.batch_size is not None:
        data["batch_size"] = args.batch_size
    if args.lr is not None:
        data.setdefault("optimizer", {})["lr"] = args.lr
    if args.seed is not None:
        data["seed"] = args.seed
    if args.dpp_weight is not None and objective == "pva":
        data["dpp_weight"] = args.dpp_weight
    return parse_pretrain_config(data, source=str(path), base_dir=path.parent)


def hubness(embeddings: dict, scorer: str, k: int = 5) -> dict:
    """Measure how unevenly reports appear in the images' top-k lists (the k-occurrence N_k of each report).

    A hub is a report that is among the top k for many images. With no hubs every report
    appears about k times. Returns the largest k-occurrence and the fraction of reports
    that appear in no top-k list.
    """
    import torch

    from harness.scoring import SCORERS

    scores = SCORERS.get(scorer)(embeddings["views"], embeddings["sentences"], embeddings["sentence_mask"])
    top = scores.topk(k, dim=1).indices.flatten()
    occurrence = torch.bincount(top, minlength=scores.shape[1])
    return {f"hubness/max_N{k}": int(occurrence.max()), f"hubness/never_in_top{k}": float((occurrence == 0).float().mean())}


def evaluate(config, checkpoint: Path, figures: Path | None) -> dict:
    """Test-split retrieval, chance R@5 and mean view cosine of a checkpoint; optionally write figures."""
    import torch

    from pretrained.checkpoint import load_checkpoint
    from pretrained.figures import plot_attention_maps, plot_view_mds, token_grid
    from pretrained.train import embed_dataset, mean_view_cosine, retrieval_values, split_dataset

    model = load_checkpoint(checkpoint)
    dataset = split_dataset(config, model, "test")
    embeddings = embed_dataset(model, dataset, config.eval_batch_size, torch.device("cpu"))
    values = retrieval_values(embeddings, model.config.scorer)
    result = {"n_test": len(dataset), "chance_R@5": 5 / len(dataset), **{f"test/{k}": v for k, v in values.items()}}
    result["R@5_over_chance"] = result["test/i2t/R@5"] / result["chance_R@5"]
    result.update(hubness(embeddings, model.config.scorer))
    if embeddings["views"].shape[1] > 1:
        result["view_cosine"] = mean_view_cosine(embeddings["views"])
    if figures is not None and embeddings["views"].shape[1] > 1:
        objective = model.config.objective
        plot_view_mds(embeddings["views"].numpy(), figures / f"view-mds-{objective}.png", seed=0,
                      title=f"{objective}: views of {len(dataset)} test studies (MDS)")  # fmt: skip
        if objective == "pva":
            grid, spans_slices = token_grid(model.config)
            plot_attention_maps(dataset[0]["image"].numpy(), embeddings["attention"][0].numpy(), grid, spans_slices,
                                figures / "attention-maps-pva.png", views=(0, 1, 2, 3), n_slices=4,
                                title="pva: cross-attention of 4 views over one test study")  # fmt: skip
    return result


def main() -> None:
    from harness.io import write_json_atomic
    from pretrained.data import array_folder_for, preprocess_for_training
    from pretrained.train import BEST_CHECKPOINT, train

    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_before = os.getloadavg()[0]
    manifest, cohort_seconds = prepare_cohort(args)

    started = time.perf_counter()
    folder, errors = preprocess_for_training(manifest, "brat-tiny", args.cohort / "preprocessed", workers=2, progress=True)
    preprocess_seconds = time.perf_counter() - started
    n_arrays = len(list(folder.glob("*.npy")))
    cohort_note = "reused" if cohort_seconds is None else f"generated in {cohort_seconds:.0f} s"
    print(f"cohort: {manifest} ({cohort_note})")
    print(f"preprocess: {preprocess_seconds:.0f} s for {n_arrays} arrays in {array_folder_for(args.cohort / 'preprocessed', 'brat-tiny')} ({len(errors)} failed)")

    results = {"cohort": str(manifest), "cohort_seconds": cohort_seconds, "preprocess_seconds": preprocess_seconds,
               "cpu_count": os.cpu_count(), "runs": {}}  # fmt: skip
    for objective in args.objectives.split(","):
        config = run_config(args, objective, manifest)
        started = time.perf_counter()
        checkpoint = train(config, resume=args.resume)
        train_seconds = time.perf_counter() - started
        args.figures.mkdir(parents=True, exist_ok=True)
        result = {"train_seconds": train_seconds, "epochs": config.epochs, "batch_size": config.batch_size,
                  "lr": config.lr, **evaluate(config, checkpoint, args.figures)}  # fmt: skip
        best = evaluate(config, checkpoint.parent / BEST_CHECKPOINT, None)
        result["best_checkpoint"] = {key: best[key] for key in ("test/i2t/R@5", "test/t2i/R@5", "R@5_over_chance")}
        results["runs"][objective] = result
        cosine = f", view cosine {result['view_cosine']:.3f}" if "view_cosine" in result else ""
        print(
            f"{objective}: train {train_seconds / 60:.1f} min ({config.epochs} epochs, batch {config.batch_size}); "
            f"test N={result['n_test']}: i2t R@1 {result['test/i2t/R@1']:.3f} R@5 {result['test/i2t/R@5']:.3f} "
            f"({result['R@5_over_chance']:.1f}x chance {result['chance_R@5']:.3f}), t2i R@5 {result['test/t2i/R@5']:.3f}"
            f"{cosine}; top-5 hubness: largest N5 {result['hubness/max_N5']}, "
            f"{result['hubness/never_in_top5']:.0%} of reports in no top-5 list; "
            f"best/ (by val R@5): i2t R@5 {best['test/i2t/R@5']:.3f}",
            flush=True,
        )
    results["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    write_json_atomic(args.out / "bench_pretrain.json", results)
    print(f"load average (1 min) before {load_before:.1f}, after {os.getloadavg()[0]:.1f}; results in {args.out / 'bench_pretrain.json'}")


if __name__ == "__main__":
    main()
