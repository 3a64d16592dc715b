"""``brat-harness extract``: write image and report embeddings of a manifest to the cache."""

from __future__ import annotations

import argparse
import inspect
import logging
from typing import Any

logger = logging.getLogger(__name__)

# Parameter that a bare ``KIND:ARG`` fills for loaders that take only ``**kwargs``.
MAIN_ARGUMENTS = {"brat": "path", "brat-random": "config"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="KIND:ARG", help="encoder loader and its main argument, e.g. brat:checkpoints/brat-tiny or brat-random:brat-tiny")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="extra loader argument (repeatable), e.g. seed=0")
    parser.add_argument("--manifest", required=True, help="manifest file (CSV, TSV, JSONL or Parquet)")
    parser.add_argument("--out", required=True, help="embedding cache folder")
    parser.add_argument("--split", default=None, help="only this split (default: all rows)")
    parser.add_argument("--batch-size", type=int, default=2, help="studies per encoder batch (default: 2)")
    parser.add_argument("--workers", type=int, default=2, help="preprocessing worker processes (default: 2; 0 = in-process)")
    parser.add_argument("--no-reports", action="store_true", help="skip report embeddings")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parse_model(spec: str, extra: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``KIND:ARG`` plus ``KEY=VALUE`` items into a loader kind and keyword arguments.

    A bare ``ARG`` goes to the loader's first parameter (``path`` for ``brat``, ``config``
    for ``brat-random``); ``ARG`` may also be ``KEY=VALUE,KEY=VALUE``.
    """
    from harness.encoders import ENCODER_LOADERS
    from harness.plugins import load_plugins

    kind, _, argument = spec.partition(":")
    load_plugins()
    loader = ENCODER_LOADERS.get(kind)
    kwargs: dict[str, Any] = {}
    items = [item for item in argument.split(",") if item] if "=" in argument else []
    if argument and not items:
        kwargs[_main_argument(kind, loader)] = argument
    for item in items + list(extra):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"invalid model argument {item!r}; expected KEY=VALUE")
        kwargs[key.strip()] = _scalar(value.strip())
    return kind, kwargs


def _main_argument(kind: str, loader: Any) -> str:
    """Name of the loader parameter a bare ``KIND:ARG`` value goes to."""
    declared = getattr(loader, "main_argument", None) or MAIN_ARGUMENTS.get(kind)
    if declared:
        return declared
    names = [p.name for p in inspect.signature(loader).parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not names:
        raise ValueError(f"encoder loader {kind!r} has no named parameter for a bare argument; write {kind}:KEY=VALUE")
    return names[0]


def _scalar(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text


def run(args: argparse.Namespace) -> int:
    from harness.cache import EmbeddingCache
    from harness.encoders import load_encoder
    from harness.extract import extract_embeddings
    from harness.manifest import read_manifest

    kind, kwargs = parse_model(args.model, args.model_arg)
    encoder = load_encoder(kind, **kwargs)
    frame = read_manifest(args.manifest)
    if args.split is not None:
        frame = frame[frame["split"].astype(str) == args.split]
        if frame.empty:
            logger.error("manifest %s has no rows in split %r", args.manifest, args.split)
            return 2
    cache = EmbeddingCache(args.out, batch_size=args.batch_size, workers=args.workers)
    embeddings = extract_embeddings(encoder, frame.to_dict("records"), cache, reports=not args.no_reports, progress=not args.no_progress)
    stats = cache.stats
    print(
        f"{len(embeddings.study_ids)} studies of {args.manifest} with {encoder.name} (digest {encoder.digest[:12]}): "
        f"{stats.study_hits} from cache, {stats.study_misses} computed; reports: {stats.report_hits} from cache, "
        f"{stats.report_misses} computed; cache {args.out}"
    )
    return 0
