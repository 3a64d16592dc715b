"""Registers the brat encoder loaders with the harness.

``brat``: ``path=`` a checkpoint folder (ours or a converted release).
``brat-random``: ``config=`` a config name and ``seed=``, a random initialisation.
Heavy imports happen inside the loaders, so registration stays cheap.
"""

from harness.encoders import ENCODER_ARGUMENT_CHECKS, ENCODER_LOADERS


def _load_brat(**kwargs):
    from pretrained.encoder import load_brat

    return load_brat(**kwargs)


def _load_brat_random(**kwargs):
    from pretrained.encoder import load_brat_random

    return load_brat_random(**kwargs)


def _check_brat_random(config: str = "brat-tiny", **_ignored) -> list[str]:
    from pretrained.config import list_configs

    if config not in list_configs():
        return [f"config: unknown brat config {config!r}; available: {', '.join(list_configs())}"]
    return []


for _name, _loader in (("brat", _load_brat), ("brat-random", _load_brat_random)):
    if _name not in ENCODER_LOADERS:
        ENCODER_LOADERS.register(_name, _loader)
if "brat-random" not in ENCODER_ARGUMENT_CHECKS:
    ENCODER_ARGUMENT_CHECKS.register("brat-random", _check_brat_random)


def _pretrain_brat(config, out_dir):
    from pretrained.train import pretrain

    return pretrain(config, out_dir)


def _register_pretrainer() -> None:
    # Suites name the trainer "brat" (the default of a pretrain entry).
    from harness.runner import PRETRAINERS

    if "brat" not in PRETRAINERS:
        PRETRAINERS.register("brat", _pretrain_brat)


_register_pretrainer()
