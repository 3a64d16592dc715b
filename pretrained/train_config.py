"""Pretraining configs: the YAML keys, their defaults and validation with errors that name the key.

An example is ``configs/pretrain-brat-tiny.yaml``. Keys, with defaults in brackets:

- Model: ``model`` [brat-tiny] names a config of :func:`pretrained.config.get_config`
  (suite files call it ``config``). ``model_overrides`` replaces config fields.
  ``objective`` [the model's] is one of :data:`pretrained.losses.OBJECTIVES`.
- Loss: ``dpp_weight`` [0.1] and ``temperature`` with ``init`` [0.07], ``min`` [0.001]
  and ``max`` [0.5].
- Data: ``manifest`` (required), ``train_split`` [train], ``val_split`` [val],
  ``preprocessing`` [the model's spec], ``preprocess_workers`` [2] and ``cache_dir``
  [OUTPUT/preprocessed], the folder for preprocessed arrays and sentence features.
- Run: ``output`` (required, or ``--out``), ``name``, ``seed`` [0], ``epochs`` [1],
  ``batch_size`` [8 per process] and ``eval_batch_size`` [16].
- Optimiser: ``optimizer`` sets AdamW's ``lr`` [1e-4], ``weight_decay`` [0.05],
  ``betas`` [[0.9, 0.98]] and ``eps`` [1e-8]. ``scheduler`` sets a linear warm-up of
  ``warmup_steps`` or ``warmup_fraction`` of all steps [0], followed by cosine decay to
  ``min_lr_ratio`` [0] times ``lr``. ``grad_clip`` [1.0] is the max gradient norm
  (null turns clipping off).
- Runtime: ``checkpoint_every`` [null: epoch ends only] and ``log_every`` [10] count
  steps. ``num_workers`` [0] sets DataLoader workers and ``threads`` [cores / local
  processes] the torch threads. ``device`` [auto], ``precision`` [auto: bf16 autocast on
  CUDA, float32 on the CPU], ``sync_batchnorm`` [false, CUDA only], ``progress`` [true].

Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from pretrained.config import BratConfig, get_config
from pretrained.losses import OBJECTIVES

# Settings that change speed or logging but not the trained weights; a resume may change them.
RUNTIME_KEYS = ("num_workers", "threads", "progress", "log_every", "preprocess_workers", "output", "cache_dir")


class PretrainConfigError(ValueError):
    """An invalid pretraining config; the message names the file, the key and the value."""


# --------------------------------------------------------------------------- config


@dataclass
class PretrainConfig:
    """A validated pretraining config (see :func:`parse_pretrain_config` for the YAML keys).

    ``batch_size`` is per process; the contrastive batch is ``batch_size * world_size``.
    """

    manifest: Path
    output: Path
    model: str = "brat-tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None
    dpp_weight: float = 0.1
    temperature_init: float = 0.07
    temperature_min: float = 0.001
    temperature_max: float = 0.5
    name: str = "pretrain"
    train_split: str = "train"
    val_split: str = "val"
    preprocessing: str | None = None
    cache_dir: Path | None = None
    preprocess_workers: int = 2
    seed: int = 0
    epochs: int = 1
    batch_size: int = 8
    eval_batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-8
    warmup_steps: int | None = None
    warmup_fraction: float | None = None
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    checkpoint_every: int | None = None
    log_every: int = 10
    num_workers: int = 0
    threads: int | None = None
    device: str = "auto"
    precision: str = "auto"
    sync_batchnorm: bool = False
    progress: bool = True
    source: str = field(default="config", compare=False)

    def brat_config(self) -> BratConfig:
        """Return the model config: the named config with overrides and the objective applied."""
        overrides = dict(self.model_overrides)
        if self.objective is not None:
            overrides["objective"] = self.objective
        return get_config(self.model, **overrides)

    @property
    def spec_name(self) -> str:
        return self.preprocessing or self.brat_config().preprocessing

    @property
    def preprocessed_dir(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else self.output / "preprocessed"

    def to_dict(self) -> dict[str, Any]:
        """Return the config in the YAML layout (JSON-ready)."""
        data = {
            "name": self.name, "model": self.model, "model_overrides": dict(self.model_overrides),
            "objective": self.objective, "dpp_weight": self.dpp_weight,
            "temperature": {"init": self.temperature_init, "min": self.temperature_min, "max": self.temperature_max},
            "manifest": str(self.manifest), "output": str(self.output),
            "train_split": self.train_split, "val_split": self.val_split, "preprocessing": self.preprocessing,
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
            "preprocess_workers": self.preprocess_workers, "seed": self.seed, "epochs": self.epochs,
            "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
            "optimizer": {"lr": self.lr, "weight_decay": self.weight_decay, "betas": list(self.betas), "eps": self.adam_eps},
            "scheduler": {"warmup_steps": self.warmup_steps, "warmup_fraction": self.warmup_fraction,
                          "min_lr_ratio": self.min_lr_ratio},
            "grad_clip": self.grad_clip, "checkpoint_every": self.checkpoint_every, "log_every": self.log_every,
            "num_workers": self.num_workers, "threads": self.threads, "device": self.device,
            "precision": self.precision, "sync_batchnorm": self.sync_batchnorm, "progress": self.progress,
        }  # fmt: skip
        return json.loads(json.dumps(data))

    def digest(self) -> str:
        """SHA-256 of the settings that determine the trained weights (runtime settings excluded)."""
        data = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_KEYS}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


class _ConfigReader:
    """Typed access to one mapping of a config, with errors that name the file and the key."""

    def __init__(self, data: Mapping[str, Any], source: str, prefix: str = "") -> None:
        self.data, self.source, self.prefix = data, source, prefix

    def fail(self, key: str, value: Any, expected: str) -> NoReturn:
        raise PretrainConfigError(f"{self.source}: key {self.prefix + key!r}: invalid value {value!r}; expected {expected}")

    def check_keys(self, known: tuple[str, ...]) -> None:
        unknown = sorted(set(self.data) - set(known))
        if unknown:
            raise PretrainConfigError(
                f"{self.source}: unknown key(s) {[self.prefix + k for k in unknown]}; known keys: {sorted(known)}"
            )

    def number(self, key: str, default: float | None, low: float | None = None, high: float | None = None,
               low_open: bool = False, optional: bool = False) -> float | None:  # fmt: skip
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, str):
            # PyYAML follows YAML 1.1 and reads 3e-4 (no dot) as a string.
            try:
                value = float(value)
            except ValueError:
                self.fail(key, value, "a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(key, value, "a number")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            bounds = f"{'>' if low_open else '>='} {low}" if low is not None else ""
            bounds += f"{' and ' if bounds else ''}<= {high}" if high is not None else ""
            self.fail(key, value, f"a number {bounds}")
        return float(value)

    def integer(self, key: str, default: int | None, low: int, optional: bool = False) -> int | None:
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.fail(key, value, f"an integer >= {low}")
        return int(value)

    def string(self, key: str, default: str | None, choices: tuple[str, ...] | None = None,
               optional: bool = False) -> str | None:  # fmt: skip
        value = self.data.get(key, default)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            self.fail(key, value, "a non-empty string" if choices is None else f"one of {list(choices)}")
        if choices is not None and value not in choices:
            self.fail(key, value, f"one of {list(choices)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, value, "true or false")
        return value

    def mapping(self, key: str) -> _ConfigReader:
        value = self.data.get(key) or {}
        if not isinstance(value, Mapping):
            self.fail(key, value, "a mapping")
        return _ConfigReader(value, self.source, f"{self.prefix}{key}.")

    def path(self, key: str, base_dir: Path, optional: bool = False) -> Path | None:
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            self.fail(key, value, "a path (relative paths start at the config file's folder)")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base_dir / path)


_TOP_KEYS = (
    "name", "model", "config", "model_overrides", "objective", "dpp_weight", "temperature", "manifest", "output",
    "train_split", "val_split", "preprocessing", "cache_dir", "preprocess_workers", "seed", "epochs", "batch_size",
    "eval_batch_size", "optimizer", "scheduler", "grad_clip", "checkpoint_every", "log_every", "num_workers",
    "threads", "device", "precision", "sync_batchnorm", "progress",
)  # fmt: skip


def parse_pretrain_config(data: Mapping[str, Any], source: str = "config", base_dir: Path | None = None) -> PretrainConfig:
    """Validate a config mapping (parsed YAML) and return a :class:`PretrainConfig`.

    ``config`` is accepted as another name for ``model`` (suite files use it). Relative
    paths resolve against ``base_dir`` (default: the working directory).

    Raises:
        PretrainConfigError: naming ``source``, the key and the value.
    """
    if not isinstance(data, Mapping):
        raise PretrainConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    base_dir = Path.cwd() if base_dir is None else base_dir
    read = _ConfigReader(data, source)
    read.check_keys(_TOP_KEYS)
    if "model" in data and "config" in data:
        read.fail("config", data["config"], "either 'model' or 'config' (the same setting), not both")
    if "manifest" not in data:
        raise PretrainConfigError(f"{source}: missing key 'manifest' (path of the study manifest)")
    if "output" not in data:
        raise PretrainConfigError(f"{source}: missing key 'output' (folder for checkpoints and metrics), or pass --out")

    model_key = "config" if "config" in data else "model"
    optimizer, scheduler, temperature = read.mapping("optimizer"), read.mapping("scheduler"), read.mapping("temperature")
    optimizer.check_keys(("lr", "weight_decay", "betas", "eps"))
    scheduler.check_keys(("warmup_steps", "warmup_fraction", "min_lr_ratio"))
    temperature.check_keys(("init", "min", "max"))
    overrides = data.get("model_overrides") or {}
    if not isinstance(overrides, Mapping):
        read.fail("model_overrides", overrides, "a mapping of model config fields")

    config = PretrainConfig(
        manifest=read.path("manifest", base_dir),
        output=read.path("output", base_dir),
        model=read.string(model_key, "brat-tiny"),
        model_overrides=dict(overrides),
        objective=read.string("objective", None, OBJECTIVES, optional=True),
        dpp_weight=read.number("dpp_weight", 0.1, low=0.0),
        temperature_init=temperature.number("init", 0.07, low=0.0, low_open=True),
        temperature_min=temperature.number("min", 0.001, low=0.0, low_open=True),
        temperature_max=temperature.number("max", 0.5, low=0.0, low_open=True),
        name=read.string("name", Path(source).stem if source.endswith((".yaml", ".yml")) else "pretrain"),
        train_split=read.string("train_split", "train"),
        val_split=read.string("val_split", "val"),
        preprocessing=read.string("preprocessing", None, optional=True),
        cache_dir=read.path("cache_dir", base_dir, optional=True),
        preprocess_workers=read.integer("preprocess_workers", 2, 1),
        seed=read.integer("seed", 0, 0),
        epochs=read.integer("epochs", 1, 1),
        batch_size=read.integer("batch_size", 8, 2),
        eval_batch_size=read.integer("eval_batch_size", 16, 1),
        lr=optimizer.number("lr", 1e-4, low=0.0, low_open=True),
        weight_decay=optimizer.number("weight_decay", 0.05, low=0.0),
        betas=_betas(optimizer),
        adam_eps=optimizer.number("eps", 1e-8, low=0.0, low_open=True),
        warmup_steps=scheduler.integer("warmup_steps", None, 0, optional=True),
        warmup_fraction=scheduler.number("warmup_fraction", None, low=0.0, high=1.0, optional=True),
        min_lr_ratio=scheduler.number("min_lr_ratio", 0.0, low=0.0, high=1.0),
        grad_clip=read.number("grad_clip", 1.0, low=0.0, low_open=True, optional=True),
        checkpoint_every=read.integer("checkpoint_every", None, 1, optional=True),
        log_every=read.integer("log_every", 10, 1),
        num_workers=read.integer("num_workers", 0, 0),
        threads=read.integer("threads", None, 1, optional=True),
        device=_device_name(read),
        precision=read.string("precision", "auto", ("auto", "fp32", "bf16")),
        sync_batchnorm=read.boolean("sync_batchnorm", False),
        progress=read.boolean("progress", True),
        source=source,
    )
    _check_cross_fields(config, read, scheduler, model_key)
    return config


def _betas(optimizer: _ConfigReader) -> tuple[float, float]:
    value = optimizer.data.get("betas", [0.9, 0.98])
    valid = isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in value
    )
    if not valid:
        optimizer.fail("betas", value, "two numbers in [0, 1), e.g. [0.9, 0.98]")
    return float(value[0]), float(value[1])


def _device_name(read: _ConfigReader) -> str:
    value = read.string("device", "auto")
    if value not in ("auto", "cpu", "cuda") and not (value.startswith("cuda:") and value[5:].isdigit()):
        read.fail("device", value, "'auto', 'cpu', 'cuda' or 'cuda:N'")
    return value


def _check_cross_fields(config: PretrainConfig, read: _ConfigReader, scheduler: _ConfigReader, model_key: str) -> None:
    """Check settings that depend on each other: model config, spec, temperatures, warm-up."""
    from harness.preprocessing import get_spec

    if config.warmup_steps is not None and config.warmup_fraction is not None:
        scheduler.fail("warmup_fraction", config.warmup_fraction, "either warmup_steps or warmup_fraction, not both")
    if not config.temperature_min <= config.temperature_init <= config.temperature_max:
        read.fail("temperature", read.data.get("temperature"), "min <= init <= max")
    try:
        brat = config.brat_config()
    except KeyError as error:
        read.fail(model_key, config.model, f"a model config name ({error.args[0]})")
    except (TypeError, ValueError) as error:
        read.fail("model_overrides", config.model_overrides, f"valid model config fields ({error})")
    try:
        spec = get_spec(config.spec_name)
    except KeyError as error:
        read.fail("preprocessing", config.spec_name, f"a registered preprocessing spec ({error.args[0]})")
    if tuple(spec.spatial_size) != tuple(brat.image_size) or tuple(spec.sequences) != tuple(brat.sequences):
        read.fail(
            "preprocessing", config.spec_name,
            f"a spec with spatial_size {list(brat.image_size)} and sequences {list(brat.sequences)} as model "
            f"{brat.name!r} needs (spec {spec.name!r} has {list(spec.spatial_size)} and {list(spec.sequences)})",
        )  # fmt: skip


def load_pretrain_config(path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None) -> PretrainConfig:
    """Read and validate a pretraining YAML file; ``output`` replaces the file's ``output`` key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PretrainConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise PretrainConfigError(f"{path}: invalid YAML: {error}") from None
    if isinstance(data, dict) and output is not None:
        data = dict(data, output=str(Path(output).absolute()))
    return parse_pretrain_config(data, source=str(path), base_dir=path.parent.absolute())
