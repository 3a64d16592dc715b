"""Data-parallel pretraining on two CPU processes (gloo on 127.0.0.1) against a single process.

BatchNorm semantics: under DDP each process normalises its own studies with its own batch
statistics, so the single-process reference embeds each process's studies in a separate
call (same statistics) and then computes the loss over the whole global batch.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import base_config, model_overrides, write_training_cohort

from pretrained.losses import build_loss
from pretrained.text import write_tiny_text_model
from pretrained.train import LAST_CHECKPOINT, METRICS_FILE, STATE_FILE, PretrainingModule

WORLD_SIZE = 2
LOCAL_BATCH = 4
OBJECTIVES = ("pva", "clip")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_group(rank: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)


def global_batch() -> dict[str, torch.Tensor]:
    """Eight random studies with cached-style sentence features (1 to 3 sentences each)."""
    generator = torch.Generator().manual_seed(0)
    n = WORLD_SIZE * LOCAL_BATCH
    counts = torch.tensor([3, 1, 2, 3, 2, 1, 3, 2])
    mask = torch.arange(3)[None, :] < counts[:, None]
    features = torch.randn(n, 3, 32, generator=generator) * mask[..., None]
    return {"images": torch.rand(n, 1, 16, 48, 48, generator=generator), "features": features, "sentence_mask": mask}


def build_module(text_folder: str, objective: str) -> PretrainingModule:
    from pretrained.config import get_config
    from pretrained.model import build_model

    brat = get_config("brat-tiny", **model_overrides(Path(text_folder)), objective=objective)
    module = PretrainingModule(build_model(brat, seed=0), build_loss(objective, dpp_weight=0.5))
    return module.train()


def gradient_worker(rank: int, port: int, text_folder: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    init_group(rank, port)
    try:
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = {key: value[rows] for key, value in global_batch().items()}
        for objective in OBJECTIVES:
            module = build_module(text_folder, objective)
            parallel = DistributedDataParallel(module, find_unused_parameters=True)
            loss = parallel(local)["loss"]
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
            torch.save({"loss": mean_loss / WORLD_SIZE, "grads": grads}, f"{out_dir}/{objective}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def reference(text_folder: str, objective: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and gradients of one process over the global batch, with per-process BatchNorm statistics."""
    module = build_module(text_folder, objective)
    batch = global_batch()
    parts = []
    for rank in range(WORLD_SIZE):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        parts.append(module.embed({key: value[rows] for key, value in batch.items()}))
    merged = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    loss = module.criterion(merged["views"], merged["sentences"], merged["sentence_mask"],
                            attention=merged["attention"])["loss"]  # fmt: skip
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    return write_tiny_text_model(tmp_path_factory.mktemp("tiny-bert"), hidden_size=32)


@pytest.mark.slow
def test_ddp_loss_and_gradients_match_single_process(tmp_path, text_folder, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(gradient_worker, args=(free_port(), str(text_folder), str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    for objective in OBJECTIVES:
        expected_loss, expected_grads = reference(str(text_folder), objective)
        results = [torch.load(tmp_path / f"{objective}-rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
        for result in results:
            torch.testing.assert_close(result["loss"], expected_loss, rtol=0, atol=1e-5)
            assert result["grads"].keys() == expected_grads.keys(), objective
            for name, grad in expected_grads.items():
                torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-5,
                                           msg=lambda m, n=name, o=objective: f"{o} {n}: {m}")  # fmt: skip
        assert "criterion.contrastive.log_temperature" in expected_grads


class Interrupt(RuntimeError):
    pass


def stop_at(step: int):
    def callback(current: int) -> None:
        if current == step:
            raise Interrupt(f"stopped at step {current}")

    return callback


def training_worker(rank: int, port: int, configs: dict[str, dict]) -> None:
    import torch.distributed as dist

    from pretrained.train import train
    from pretrained.train_config import parse_pretrain_config

    init_group(rank, port)
    try:
        train(parse_pretrain_config(configs["straight"]))
        interrupted = parse_pretrain_config(configs["resumed"])
        try:
            train(interrupted, on_step=stop_at(3))
        except Interrupt:
            pass
        train(interrupted, resume=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_training_resumes_exactly(tmp_path, text_folder, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    manifest = write_training_cohort(tmp_path / "cohort")
    configs = {
        name: base_config(manifest, tmp_path / name, tmp_path / "cache", text_folder, threads=1, checkpoint_every=1,
                          model_overrides=dict(model_overrides(text_folder), hidden_dropout_prob=0.1))
        for name in ("straight", "resumed")
    }  # fmt: skip
    mp.spawn(training_worker, args=(free_port(), configs), nprocs=WORLD_SIZE, join=True)

    state = torch.load(tmp_path / "resumed" / STATE_FILE, map_location="cpu", weights_only=True)
    assert (state["world_size"], state["step"], state["finished"]) == (2, 4, True)
    assert len(state["rng"]) == WORLD_SIZE
    records = [json.loads(line) for line in (tmp_path / "resumed" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [2, 4]  # 16 studies / (2 x 4) = 2 steps per epoch

    expected = load_file(str(tmp_path / "straight" / LAST_CHECKPOINT / "model.safetensors"))
    actual = load_file(str(tmp_path / "resumed" / LAST_CHECKPOINT / "model.safetensors"))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
