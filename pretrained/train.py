"""brat pretraining: a data-parallel training loop with exact resumption (config keys: :mod:`pretrained.train_config`).

Run it with ``brat-harness pretrain CONFIG.yaml`` (one process) or
``torchrun --nproc-per-node N -m harness.cli pretrain CONFIG.yaml`` (data-parallel with
torch DDP: ``gloo`` on CPU, ``nccl`` on GPU).

Data parallelism: every process embeds its own ``batch_size`` studies, and views,
sentence embeddings and masks are all-gathered with gradients
(:func:`pretrained.losses.gather_features`), so the contrastive negatives span the
global batch of ``batch_size * world_size`` studies. Each process scores its own studies
and their reports against the global batch, and DDP averages the gradients, which gives
the gradient of the loss over the global batch. BatchNorm statistics stay per process
(DDP's default), so batch statistics come from the local ``batch_size`` studies and the
running statistics of rank 0 are broadcast at every forward pass. ``sync_batchnorm:
true`` switches to ``SyncBatchNorm``, which torch (2.14) rejects on the CPU.

Output folder:

- ``checkpoint-last/``: checkpoint folder (:func:`pretrained.checkpoint.save_checkpoint`)
  of the latest weights, written every ``checkpoint_every`` steps, at every epoch end
  and when training finishes. :func:`pretrain` returns it.
- ``best/``: the epoch-end weights with the highest validation image-to-report R@5
  (the earlier epoch wins a tie).
- ``training-state.pt``: everything ``--resume`` needs (weights, optimizer, scheduler,
  step, epoch, batches done in the epoch, RNG states of every process, metric records),
  written together with ``checkpoint-last/``.
- ``metrics.jsonl``: one record per ``log_every`` steps (``kind: step``) and per epoch
  (``kind: epoch``, with validation recall@k).
- ``train_config.json``: the validated config; a resume with different settings fails.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from harness.io import atomic_path, write_json_atomic, write_text_atomic
from pretrained.config import BratConfig
from pretrained.data import (
    PretrainingDataset,
    SentenceFeatureCache,
    array_folder_for,
    collate_studies,
    load_split_records,
    preprocess_for_training,
    seed_worker,
)
from pretrained.losses import build_loss, gather_features
from pretrained.train_config import (
    RUNTIME_KEYS,
    PretrainConfig,
    PretrainConfigError,
    parse_pretrain_config,
)

logger = logging.getLogger(__name__)

STATE_FILE = "training-state.pt"
LAST_CHECKPOINT = "checkpoint-last"
BEST_CHECKPOINT = "best"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
STATE_FORMAT = 1
BEST_METRIC = "val/i2t/R@5"
RECALL_KS = (1, 5, 10)

# --------------------------------------------------------------------------- processes and seeds


@dataclass
class DistributedContext:
    """Rank, world size and device of this process; ``owns_group`` is True when this module created the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def setup_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, or use one already set up.

    Without ``WORLD_SIZE > 1`` in the environment and no initialised group, this is a
    single process. The backend is ``nccl`` when the device is CUDA and ``gloo`` otherwise.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but CUDA is not available; set device: cpu or auto")
    if not use_cuda:
        target = torch.device("cpu")
    elif ":" in device:
        target = torch.device(device)
    else:
        target = torch.device(f"cuda:{local_rank}")
    if use_cuda:
        torch.cuda.set_device(target)

    owns_group = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        owns_group = True
    if dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, target, owns_group)
    return DistributedContext(device=target)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Return the RNG states of python, numpy and torch as tensors and plain values."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- model, loss and optimiser


def project_sentence_features(model: nn.Module, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``text_proj`` to cached text-encoder features as :meth:`BratModel.encode_sentences` does.

    Args:
        features: ``(B, S, H)`` sentence features of the frozen text encoder, zero at padding.
        mask: ``(B, S)`` bool.

    Returns:
        sentences ``(B, S, D)`` unit-norm and zero at padding, and the mask; ``S = 1`` for
        single-view models (the re-normalised sum of the sentence embeddings).
    """
    sentences = nn.functional.normalize(model.text_proj(features), dim=-1)
    sentences = sentences * mask.unsqueeze(-1).to(sentences.dtype)
    if model.config.single_view:
        sentences = nn.functional.normalize(sentences.sum(dim=1, keepdim=True), dim=-1)
        mask = mask.any(dim=1, keepdim=True)
    return sentences, mask


class PretrainingModule(nn.Module):
    """The brat model and its loss in one module, so that DDP synchronises the temperature too.

    ``forward(batch)`` embeds the local batch, all-gathers the embeddings and returns the
    loss components of this process's studies (see :class:`pretrained.losses.BratLoss`).
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.autocast_dtype = autocast_dtype

    def embed(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Embed a collated batch; returns float32 ``views (B, Q, D)``, ``attention (B, Q, L)``,
        ``sentences (B, S, D)`` and ``sentence_mask (B, S)``."""
        images = batch["images"]
        if images.device.type == "cpu" and images.dim() == 5:
            images = images.contiguous(memory_format=torch.channels_last_3d)
        enabled = self.autocast_dtype is not None
        with torch.autocast(images.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=enabled):
            image = self.model.encode_image(images)
            if "features" in batch:
                sentences, mask = project_sentence_features(self.model, batch["features"], batch["sentence_mask"])
            else:
                sentences, mask = self.model.encode_sentences(batch["sentences"])
        return {
            "views": image.views.float(),
            "attention": image.attention.float(),
            "sentences": sentences.float(),
            "sentence_mask": mask,
        }

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        local = self.embed(batch)
        views, sentences, mask, rows = gather_features(local["views"], local["sentences"], local["sentence_mask"])
        owned = rows if views.shape[0] != local["views"].shape[0] else None
        return self.criterion(views, sentences, mask, attention=local["attention"], rows=owned)


def build_optimizer(module: nn.Module, config: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay applies to matrices and other tensors with 2+ dims only."""
    decay, no_decay = [], []
    for _, parameter in module.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps)


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate factor: linear from ``1 / (warmup_steps + 1)`` to 1 over the warm-up, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: PretrainConfig, total_steps: int):
    if config.warmup_steps is not None:
        warmup = config.warmup_steps
    else:
        warmup = int(round((config.warmup_fraction or 0.0) * total_steps))
    factor = functools.partial(warmup_cosine_factor, warmup_steps=warmup, total_steps=total_steps,
                               min_ratio=config.min_lr_ratio)  # fmt: skip
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- data and evaluation


@dataclass
class TrainingData:
    """The train and validation datasets of one run."""

    train: PretrainingDataset
    val: PretrainingDataset


def prepare_data(config: PretrainConfig, brat: BratConfig, model: nn.Module, context: DistributedContext) -> TrainingData:
    """Preprocess the manifest and cache sentence features on the main process, then load both splits everywhere.

    Sentence features are cached when the model's text encoder is frozen (``text_path:
    hf`` with ``text_frozen: true``); otherwise batches carry sentence text.
    """
    if context.is_main:
        preprocess_for_training(config.manifest, config.spec_name, config.preprocessed_dir,
                                workers=config.preprocess_workers, progress=config.progress)  # fmt: skip
    context.barrier()

    folder = array_folder_for(config.preprocessed_dir, config.spec_name)
    train_records = load_split_records(config.manifest, config.train_split, folder)
    val_records = load_split_records(config.manifest, config.val_split, folder)
    feature_cache = None
    if _caches_features(brat):
        if context.is_main:
            sentences = [s for record in (*train_records, *val_records) for s in record.sentences]
            _feature_cache(config, brat).update(sentences, model.text_encoder)
        context.barrier()
        feature_cache = _feature_cache(config, brat)
    return TrainingData(PretrainingDataset(train_records, feature_cache), PretrainingDataset(val_records, feature_cache))


def split_dataset(config: PretrainConfig, model: nn.Module, split: str) -> PretrainingDataset:
    """Return the dataset of another split (e.g. ``test``) of an already preprocessed manifest, in one process."""
    records = load_split_records(config.manifest, split, array_folder_for(config.preprocessed_dir, config.spec_name))
    feature_cache = None
    if _caches_features(model.config):
        feature_cache = _feature_cache(config, model.config)
        feature_cache.update([s for record in records for s in record.sentences], model.text_encoder)
    return PretrainingDataset(records, feature_cache)


def _caches_features(brat: BratConfig) -> bool:
    return brat.text_path == "hf" and brat.text_frozen


def _feature_cache(config: PretrainConfig, brat: BratConfig) -> SentenceFeatureCache:
    from pretrained.checkpoint import referenced_text_encoder_digest

    digest = referenced_text_encoder_digest(brat.text_encoder)
    return SentenceFeatureCache(config.preprocessed_dir, digest, brat.text_max_length)


@torch.no_grad()
def embed_dataset(
    model: nn.Module, dataset: PretrainingDataset, batch_size: int, device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Embed every study of ``dataset`` in eval mode.

    Returns float32 CPU tensors ``views (N, Q, D)``, ``attention (N, Q, L)``,
    ``sentences (N, S_max, D)`` and ``sentence_mask (N, S_max)``, in dataset order.
    """
    from torch.utils.data import DataLoader

    from harness.scoring import pad_sentences

    was_training = model.training
    model.eval()
    module = PretrainingModule(model, nn.Identity(), autocast_dtype)
    views, attention, reports = [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_studies)
    for batch in loader:
        batch = _to_device(batch, device)
        output = module.embed(batch)
        views.append(output["views"].cpu())
        attention.append(output["attention"].cpu())
        for row, mask in zip(output["sentences"].cpu(), output["sentence_mask"].cpu(), strict=True):
            reports.append(row[mask])
    model.train(was_training)
    sentences, sentence_mask = pad_sentences(reports)
    return {"views": torch.cat(views), "attention": torch.cat(attention), "sentences": sentences,
            "sentence_mask": sentence_mask}  # fmt: skip


def retrieval_values(embeddings: Mapping[str, torch.Tensor], scorer: str) -> dict[str, float]:
    """Image-to-report and report-to-image recall@k, median and mean rank with the model's scorer."""
    from harness.scoring import SCORERS
    from tasks.retrieval.metrics import retrieval_metrics

    scores = SCORERS.get(scorer)(embeddings["views"], embeddings["sentences"], embeddings["sentence_mask"])
    return retrieval_metrics(scores, ks=RECALL_KS).values


def mean_view_cosine(views: torch.Tensor) -> float:
    """Mean cosine similarity between different views of the same study.

    Args:
        views: ``(N, Q, D)`` unit-norm views with ``Q >= 2``.

    Returns:
        The mean over studies and over the ``Q * (Q - 1)`` ordered view pairs.
    """
    n_views = views.shape[1]
    if n_views < 2:
        raise ValueError(f"views has Q={n_views}; the view cosine needs at least 2 views per study")
    similarity = views @ views.transpose(1, 2)  # (N, Q, Q)
    off_diagonal = similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(dim=1)
    return float((off_diagonal / (n_views * (n_views - 1))).mean())


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# --------------------------------------------------------------------------- training loop

StepCallback = Callable[[int], None]


class Trainer:
    """One pretraining run: builds the model, data and optimiser, trains, checkpoints and resumes.

    Use :func:`train`; the class keeps the loop's state (step, epoch, running sums,
    records) in one place so that checkpoints can store all of it.
    """

    def __init__(self, config: PretrainConfig, context: DistributedContext) -> None:
        from pretrained.model import build_model

        self.config, self.context = config, context
        self.brat = config.brat_config()
        self.output = config.output
        self.autocast_dtype = _autocast_dtype(config.precision, context.device)
        model = build_model(self.brat, seed=config.seed)
        self.data = prepare_data(config, self.brat, model, context)
        criterion = build_loss(
            self.brat.objective, dpp_weight=config.dpp_weight, init_temperature=config.temperature_init,
            min_temperature=config.temperature_min, max_temperature=config.temperature_max,
        )  # fmt: skip
        if context.device.type == "cpu":
            # oneDNN's 3D convolutions run faster in channels-last layout (1.6 times for a
            # densenet-tiny step, benchmarks/bench_backbone.py). embed() converts the images to match.
            model.visual_encoder.to(memory_format=torch.channels_last_3d)
        self.module = PretrainingModule(model, criterion, self.autocast_dtype).to(context.device)
        self.parallel = self._wrap(self.module)
        self.optimizer = build_optimizer(self.module, config)
        self.steps_per_epoch = self._steps_per_epoch()
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.records: list[dict[str, Any]] = []
        self.finished = False
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # learning rate of the latest step
        self.started = time.perf_counter()

    @property
    def model(self) -> nn.Module:
        return self.module.model

    def _wrap(self, module: PretrainingModule) -> nn.Module:
        if not self.context.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        if self.config.sync_batchnorm:
            if self.context.device.type != "cuda":
                raise PretrainConfigError(f"{self.config.source}: key 'sync_batchnorm': SyncBatchNorm needs CUDA "
                                          "devices; set it to false on the CPU")  # fmt: skip
            module.model = nn.SyncBatchNorm.convert_sync_batchnorm(module.model)
        # find_unused_parameters: some trainable tensors take no gradient in a step, e.g. the
        # DenseNet class_layers and the Q-Former's text-only feed-forward blocks.
        device_ids = [self.context.device.index] if self.context.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)

    def _steps_per_epoch(self) -> int:
        global_batch = self.config.batch_size * self.context.world_size
        steps = len(self.data.train) // global_batch
        if steps < 1:
            raise PretrainConfigError(
                f"{self.config.source}: key 'batch_size': {self.config.batch_size} per process x "
                f"{self.context.world_size} processes = {global_batch} exceeds the {len(self.data.train)} "
                f"training studies of split {self.config.train_split!r}; lower batch_size"
            )
        return steps

    # ------------------------------------------------------------------ loop

    def run(self, on_step: StepCallback | None = None) -> Path:
        logger.info(
            "pretraining %s: objective %s, %d train / %d val studies, %d processes x batch %d, %d steps "
            "(%d epochs), device %s, %d threads",
            self.brat.name, self.brat.objective, len(self.data.train), len(self.data.val), self.context.world_size,
            self.config.batch_size, self.total_steps, self.config.epochs, self.context.device, torch.get_num_threads(),
        )  # fmt: skip
        while self.epoch < self.config.epochs:
            self._train_epoch(on_step)
            self._end_epoch()
        self.finished = True
        self.save()
        logger.info("pretraining finished after %d steps in %.1f s", self.step, time.perf_counter() - self.started)
        return self.output / LAST_CHECKPOINT

    def _train_epoch(self, on_step: StepCallback | None) -> None:
        from tqdm import tqdm

        self.module.train()
        loader = self._loader()
        bar = tqdm(loader, total=self.steps_per_epoch, initial=self.batch_in_epoch, unit="step",
                   desc=f"epoch {self.epoch + 1}/{self.config.epochs}",
                   disable=not (self.config.progress and self.context.is_main))  # fmt: skip
        for batch in bar:
            values = self._train_step(batch)
            self.step += 1
            self.batch_in_epoch += 1
            self.epoch_count += 1
            for key, value in values.items():
                self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + value
            bar.set_postfix({key: f"{value:.4g}" for key, value in values.items()})
            if self.step % self.config.log_every == 0:
                self.records.append({"kind": "step", "epoch": self.epoch + 1, "step": self.step,
                                     "lr": self.last_lr, **values})  # fmt: skip
            if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                self.save()
            if on_step is not None:
                on_step(self.step)
        bar.close()

    def _loader(self):
        from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

        sampler = DistributedSampler(
            self.data.train, num_replicas=self.context.world_size, rank=self.context.rank,
            shuffle=True, seed=self.config.seed, drop_last=True,
        )  # fmt: skip
        sampler.set_epoch(self.epoch)
        # Resuming mid-epoch skips the batches already done; the order is the same as before.
        indices = list(sampler)[self.batch_in_epoch * self.config.batch_size :]
        batches = BatchSampler(indices, self.config.batch_size, drop_last=True)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch)
        return DataLoader(
            self.data.train, batch_sampler=batches, collate_fn=collate_studies, num_workers=self.config.num_workers,
            worker_init_fn=seed_worker, generator=generator, pin_memory=self.context.device.type == "cuda",
        )  # fmt: skip

    def _train_step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        outputs = self.parallel(_to_device(batch, self.context.device))
        self.optimizer.zero_grad(set_to_none=True)
        outputs["loss"].backward()
        if self.config.grad_clip is not None:
            trainable = [p for p in self.module.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trainable, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return self._reduce_for_logging(outputs)

    def _reduce_for_logging(self, outputs: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Average the loss components over processes, because each process computes the loss of its own studies."""
        names = sorted(outputs)
        values = torch.stack([outputs[name].detach().float() for name in names])
        if self.context.enabled:
            dist.all_reduce(values)
            values /= self.context.world_size
        return {name: float(value) for name, value in zip(names, values.tolist(), strict=True)}

    def _end_epoch(self) -> None:
        record: dict[str, Any] = {
            "kind": "epoch", "epoch": self.epoch + 1, "step": self.step, "lr": self.last_lr,
            **{f"train/{key}": total / max(1, self.epoch_count) for key, total in self.epoch_sums.items()},
        }  # fmt: skip
        improved = False
        if self.context.is_main:
            embeddings = embed_dataset(self.model, self.data.val, self.config.eval_batch_size, self.context.device,
                                       self.autocast_dtype)  # fmt: skip
            record.update({f"val/{key}": value for key, value in retrieval_values(embeddings, self.brat.scorer).items()})
            if not self.brat.single_view:
                record["val/view_cosine"] = mean_view_cosine(embeddings["views"])
            improved = self.best_value is None or record[BEST_METRIC] > self.best_value
            if improved:
                self.best_value, self.best_epoch = record[BEST_METRIC], self.epoch + 1
            logger.info(
                "epoch %d/%d: loss %.4f, val i2t R@1 %.3f R@5 %.3f, t2i R@5 %.3f (%d studies)",
                self.epoch + 1, self.config.epochs, record.get("train/loss", float("nan")), record["val/i2t/R@1"],
                record[BEST_METRIC], record["val/t2i/R@5"], len(self.data.val),
            )  # fmt: skip
        self.context.barrier()
        self.records.append(record)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_sums, self.epoch_count = {}, 0
        self.save(best=improved)

    # ------------------------------------------------------------------ checkpoints

    def save(self, best: bool = False) -> None:
        """Write ``checkpoint-last/``, the training state and ``metrics.jsonl`` (and ``best/`` when ``best``).

        Every process must call this at the same step: the RNG states of all processes
        are gathered into the state file.
        """
        from pretrained.checkpoint import save_checkpoint

        rng_states = [capture_rng_state()]
        if self.context.enabled:
            rng_states = [None] * self.context.world_size
            dist.all_gather_object(rng_states, capture_rng_state())
        if not self.context.is_main:
            return

        metadata = {"run": self.config.name, "objective": self.brat.objective, "step": self.step,
                    "epoch": self.epoch, "finished": self.finished, "best_epoch": self.best_epoch,
                    "best_" + BEST_METRIC.replace("/", "_"): self.best_value}  # fmt: skip
        save_checkpoint(self.model, self.output / LAST_CHECKPOINT, extra=metadata)
        if best:
            save_checkpoint(self.model, self.output / BEST_CHECKPOINT, extra=metadata)
        state = {
            "format": STATE_FORMAT, "config_digest": self.config.digest(), "world_size": self.context.world_size,
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "epoch_sums": dict(self.epoch_sums), "epoch_count": self.epoch_count,
            "best_value": self.best_value, "best_epoch": self.best_epoch, "finished": self.finished,
            "records": list(self.records), "rng": rng_states,
            "model": {k: v.detach().cpu() for k, v in self.model.checkpoint_state_dict().items()},
            "criterion": self.module.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
        }  # fmt: skip
        with atomic_path(self.output / STATE_FILE) as tmp:
            torch.save(state, tmp)
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in self.records)
        write_text_atomic(self.output / METRICS_FILE, lines)
        logger.info("saved checkpoint at step %d (epoch %d) to %s", self.step, self.epoch, self.output)

    def load_state(self, path: Path) -> None:
        """Restore a training state written by :meth:`save`, including this process's RNG state."""
        from pretrained.checkpoint import load_state_strict

        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: training state format {state.get('format')!r}, expected {STATE_FORMAT}")
        if state["world_size"] != self.context.world_size:
            raise ValueError(
                f"{path}: saved with {state['world_size']} processes but this run has {self.context.world_size}; "
                "resume with the same number of processes, because the data order depends on it"
            )
        load_state_strict(self.model, state["model"], source=str(path))
        self.module.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.epoch_sums, self.epoch_count = dict(state["epoch_sums"]), state["epoch_count"]
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.records, self.finished = list(state["records"]), state["finished"]
        restore_rng_state(state["rng"][self.context.rank])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step, self.epoch + 1,
                    self.batch_in_epoch)  # fmt: skip


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (``auto`` or ``bf16``); the CPU always trains in float32."""
    if device.type != "cuda":
        if precision == "bf16":
            logger.warning("precision bf16 applies to CUDA devices only; training in float32 on %s", device)
        return None
    return None if precision == "fp32" else torch.bfloat16


def _default_threads(context: DistributedContext) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", context.world_size))
    return max(1, cores // max(1, local_processes))


def _prepare_output(config: PretrainConfig, resume: bool, context: DistributedContext) -> bool:
    """Check the output folder against ``resume``; return True when a finished run is there already."""
    state_path = config.output / STATE_FILE
    if state_path.is_file() and not resume:
        raise FileExistsError(
            f"{config.output} already contains a training run ({STATE_FILE}); pass --resume to continue it "
            "or choose another output folder (--out)"
        )
    config_path = config.output / CONFIG_FILE
    if resume and config_path.is_file():
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        current = config.to_dict()
        changed = sorted(k for k in set(saved) | set(current) if k not in RUNTIME_KEYS and saved.get(k) != current.get(k))
        if changed:
            raise PretrainConfigError(
                f"{config.source}: cannot resume the run in {config.output}: settings {changed} differ from "
                f"{config_path}; restore them or start a new run in another output folder"
            )
    if context.is_main:
        write_json_atomic(config_path, config.to_dict())
    metadata = config.output / LAST_CHECKPOINT / "metadata.json"
    return resume and metadata.is_file() and bool(json.loads(metadata.read_text(encoding="utf-8")).get("finished"))


def train(config: PretrainConfig, resume: bool = False, on_step: StepCallback | None = None) -> Path:
    """Pretrain a brat model with the settings in ``config`` and return the ``checkpoint-last`` folder.

    Args:
        config: a validated config (:func:`load_pretrain_config`).
        resume: continue the run in ``config.output`` from its training state; without a
            state there this starts a new run. A finished run returns at once.
        on_step: called with the global step after every optimiser step (tests use it to
            interrupt a run).

    Raises:
        FileExistsError: ``config.output`` holds a run and ``resume`` is False.
    """
    if not config.manifest.is_file():
        raise FileNotFoundError(
            f"{config.source}: manifest {config.manifest} does not exist; fix 'manifest' in the config "
            "(relative paths resolve against the config file's folder)"
        )
    context = setup_distributed(config.device)
    try:
        torch.set_num_threads(config.threads or _default_threads(context))
        seed_everything(config.seed + context.rank)
        config.output.mkdir(parents=True, exist_ok=True)
        if _prepare_output(config, resume, context):
            logger.info("the run in %s has already finished; nothing to do", config.output)
            return config.output / LAST_CHECKPOINT
        context.barrier()
        trainer = Trainer(config, context)
        state_path = config.output / STATE_FILE
        if resume and state_path.is_file():
            trainer.load_state(state_path)
        elif resume:
            logger.info("no training state in %s; starting a new run", config.output)
        return trainer.run(on_step)
    finally:
        if context.owns_group:
            dist.destroy_process_group()


def pretrain(config_dict: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """Pretrainer for suites: train from a config mapping into ``out_dir`` and return ``checkpoint-last``.

    ``config_dict`` contains the keys of a pretraining YAML (``config`` or ``model``,
    ``objective``, ``epochs``, ``manifest``, ...); ``out_dir`` replaces ``output``. An
    interrupted run in ``out_dir`` is resumed.
    """
    data = dict(config_dict, output=str(Path(out_dir).absolute()))
    config = parse_pretrain_config(data, source=f"pretrain entry {data.get('name', '(unnamed)')!r}")
    return train(config, resume=True)
