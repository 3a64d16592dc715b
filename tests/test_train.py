"""Tests for brat pretraining: config validation, the loop, checkpoints and exact resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train_fixtures import base_config, model_overrides, write_training_cohort

from pretrained.text import write_tiny_text_model
from pretrained.train import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    METRICS_FILE,
    STATE_FILE,
    PretrainingModule,
    mean_view_cosine,
    project_sentence_features,
    train,
    warmup_cosine_factor,
)
from pretrained.train_config import PretrainConfigError, load_pretrain_config, parse_pretrain_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A cohort, a tiny text encoder and a preprocessing cache shared by the tests of this module."""
    root = tmp_path_factory.mktemp("train")
    return {
        "root": root,
        "manifest": write_training_cohort(root / "cohort"),
        "text": write_tiny_text_model(root / "tiny-bert", hidden_size=32),
        "cache": root / "cache",
    }


def make_config(workspace: dict[str, Path], output: Path, **changes):
    data = base_config(workspace["manifest"], output, workspace["cache"], workspace["text"], **changes)
    return parse_pretrain_config(data, source="test.yaml")


# --------------------------------------------------------------------------- config


CONFIG_ERRORS = [
    ({"learning_rate": 0.1}, "unknown key(s) ['learning_rate']"),
    ({"optimizer": {"lr": -1}}, "key 'optimizer.lr': invalid value -1"),
    ({"optimizer": {"betas": [0.9]}}, "key 'optimizer.betas': invalid value [0.9]"),
    ({"objective": "simclr"}, "key 'objective': invalid value 'simclr'"),
    ({"model": "brat-huge"}, "key 'model': invalid value 'brat-huge'"),
    ({"model_overrides": {"num_querys": 2}}, "key 'model_overrides'"),
    ({"preprocessing": "brat-tiny"}, "key 'preprocessing': invalid value 'brat-tiny'"),
    ({"preprocessing": "no-such-spec"}, "key 'preprocessing': invalid value 'no-such-spec'"),
    ({"batch_size": 1}, "key 'batch_size': invalid value 1; expected an integer >= 2"),
    ({"epochs": 1.5}, "key 'epochs': invalid value 1.5"),
    ({"scheduler": {"warmup_steps": 2, "warmup_fraction": 0.1}}, "key 'scheduler.warmup_fraction'"),
    ({"temperature": {"init": 0.9}}, "key 'temperature'"),
    ({"device": "tpu"}, "key 'device': invalid value 'tpu'"),
    ({"config": "brat-tiny"}, "either 'model' or 'config'"),
]


@pytest.mark.parametrize(("changes", "message"), CONFIG_ERRORS)
def test_config_errors_name_key_and_value(workspace, tmp_path, changes, message):
    data = base_config(workspace["manifest"], tmp_path / "out", workspace["cache"], workspace["text"], **changes)
    with pytest.raises(PretrainConfigError) as error:
        parse_pretrain_config(data, source="run.yaml")
    assert str(error.value).startswith("run.yaml: ")
    assert message in str(error.value)


def test_config_missing_manifest(workspace, tmp_path):
    data = base_config(workspace["manifest"], tmp_path / "out", workspace["cache"], workspace["text"])
    del data["manifest"]
    with pytest.raises(PretrainConfigError, match="missing key 'manifest'"):
        parse_pretrain_config(data, source="run.yaml")



def test_absent_manifest_file_leaves_no_output(workspace, tmp_path):
    data = base_config(workspace["manifest"], tmp_path / "out", workspace["cache"], workspace["text"])
    config = parse_pretrain_config(dict(data, manifest=str(tmp_path / "missing.csv")), source="test.yaml")
    with pytest.raises(FileNotFoundError, match=r"test\.yaml: manifest .*missing\.csv does not exist"):
        train(config)
    assert not (tmp_path / "out").exists()

def test_config_file_paths_relative_to_file(workspace, tmp_path):
    data = base_config(workspace["manifest"], "runs/a", workspace["cache"], workspace["text"])
    path = tmp_path / "configs" / "run.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    config = load_pretrain_config(path)
    assert config.output == tmp_path / "configs" / "runs" / "a"
    assert config.name == "test"
    assert load_pretrain_config(path, output=tmp_path / "elsewhere").output == tmp_path / "elsewhere"


def test_config_file_error_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("manifest: m.csv\noutput: out\nepochs: zero\n")
    with pytest.raises(PretrainConfigError, match=r"bad\.yaml: key 'epochs': invalid value 'zero'"):
        load_pretrain_config(path)


def test_suite_entry_keys_accepted(workspace, tmp_path):
    data = base_config(workspace["manifest"], tmp_path / "out", workspace["cache"], workspace["text"])
    data["config"] = data.pop("model")
    config = parse_pretrain_config(data)
    assert config.model == "brat-tiny"
    assert config.brat_config().objective == "pva"


def test_shipped_configs_valid():
    folder = Path(__file__).parents[1] / "configs"
    paths = sorted(folder.glob("*.yaml"))
    assert [p.name for p in paths] == ["pretrain-brat-tiny.yaml", "pretrain-clip-tiny.yaml"]
    objectives = [load_pretrain_config(p).brat_config().objective for p in paths]
    assert objectives == ["pva", "clip"]


def test_warmup_cosine_factor():
    assert warmup_cosine_factor(0, 4, 20, 0.0) == pytest.approx(0.2)
    assert warmup_cosine_factor(3, 4, 20, 0.0) == pytest.approx(0.8)
    assert warmup_cosine_factor(4, 4, 20, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(12, 4, 20, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_factor(20, 4, 20, 0.1) == pytest.approx(0.1)


# --------------------------------------------------------------------------- model pieces


def test_cached_features_match_model_text_path(workspace):
    from pretrained.model import build_model

    for objective in ("pva", "clip"):
        brat = make_config(workspace, workspace["root"] / "unused", objective=objective).brat_config()
        model = build_model(brat, seed=0).eval()
        reports = [["A lesion in the left frontal lobe.", "No shift."], ["Normal study."]]
        with torch.no_grad():
            expected, expected_mask = model.encode_sentences(reports)
            features, mask = model.text_encoder(reports)
            projected, projected_mask = project_sentence_features(model, features, mask)
        torch.testing.assert_close(projected, expected)
        assert torch.equal(projected_mask, expected_mask)


def test_mean_view_cosine():
    identical = torch.nn.functional.normalize(torch.ones(2, 3, 4), dim=-1)
    assert mean_view_cosine(identical) == pytest.approx(1.0)
    orthogonal = torch.eye(4)[:3].expand(2, 3, 4)
    assert mean_view_cosine(orthogonal) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="Q=1"):
        mean_view_cosine(identical[:, :1])


@pytest.mark.slow
def test_loss_decreases_on_fixed_batch(workspace):
    from pretrained.data import collate_studies
    from pretrained.losses import build_loss
    from pretrained.model import build_model
    from pretrained.train import DistributedContext, prepare_data

    config = make_config(workspace, workspace["root"] / "unused")
    brat = config.brat_config()
    torch.manual_seed(0)
    model = build_model(brat, seed=0)
    data = prepare_data(config, brat, model, DistributedContext())
    batch = collate_studies([data.train[i] for i in range(8)])
    module = PretrainingModule(model, build_loss("pva", dpp_weight=0.1)).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)

    history = []
    for _ in range(10):
        output = module(batch)
        optimizer.zero_grad()
        output["loss"].backward()
        optimizer.step()
        history.append({key: float(value.detach()) for key, value in output.items()})
    assert set(history[0]) == {"loss", "contrastive", "dpp", "temperature"}
    assert history[-1]["loss"] < 0.8 * history[0]["loss"], history
    assert history[-1]["contrastive"] < history[0]["contrastive"], history
    assert history[-1]["dpp"] < history[0]["dpp"], history


# --------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def finished_run(workspace):
    """A 2-epoch run through the command line."""
    from harness.cli import main

    data = base_config(workspace["manifest"], "out", workspace["cache"], workspace["text"])
    path = workspace["root"] / "cli" / "run.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    assert main(["-q", "pretrain", str(path)]) == 0
    return path.parent / "out"


def test_run_writes_checkpoint_folders(finished_run):
    from pretrained.checkpoint import load_checkpoint

    for name in (LAST_CHECKPOINT, BEST_CHECKPOINT):
        files = sorted(p.name for p in (finished_run / name).iterdir())
        assert files == ["adaptation.json", "config.json", "metadata.json", "model.safetensors", "preprocessing.json"]
    metadata = json.loads((finished_run / LAST_CHECKPOINT / "metadata.json").read_text())
    assert (metadata["step"], metadata["epoch"], metadata["finished"]) == (8, 2, True)
    model = load_checkpoint(finished_run / LAST_CHECKPOINT)
    assert model.config.objective == "pva"
    state = torch.load(finished_run / STATE_FILE, map_location="cpu", weights_only=True)
    for key, value in model.checkpoint_state_dict().items():
        assert torch.equal(value, state["model"][key]), key


def test_run_writes_metrics(finished_run):
    records = [json.loads(line) for line in (finished_run / METRICS_FILE).read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("train/loss", "train/contrastive", "train/dpp", "train/temperature", "val/i2t/R@1", "val/i2t/R@5",
                "val/t2i/R@5", "val/view_cosine"):  # fmt: skip
        assert key in epochs[-1], key
    assert 0.0 <= epochs[-1]["val/i2t/R@5"] <= 1.0
    assert steps[0]["lr"] < steps[1]["lr"]  # linear warm-up over the first step


def test_finished_run_needs_resume_flag(finished_run):
    config = load_pretrain_config(finished_run.parent / "run.yaml")
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)
    assert train(config, resume=True) == finished_run / LAST_CHECKPOINT


def test_resume_rejects_changed_settings(finished_run):
    config = load_pretrain_config(finished_run.parent / "run.yaml")
    config.lr = 0.5
    with pytest.raises(PretrainConfigError, match=r"settings \['optimizer'\] differ"):
        train(config, resume=True)


class Interrupt(RuntimeError):
    pass


def with_dropout(workspace: dict[str, Path]) -> dict:
    return dict(model_overrides(workspace["text"]), hidden_dropout_prob=0.1)


def interrupt_at(step: int):
    def callback(current: int) -> None:
        if current == step:
            raise Interrupt(f"stopped at step {current}")

    return callback


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["pva", "clip"])
def test_resume_equals_uninterrupted(workspace, tmp_path, objective):
    # The interrupt after step 6 (mid-epoch 2) loses steps 5 and 6; the resumed run repeats
    # them from the state saved at step 4, the end of epoch 1.
    # Dropout is on, so the run depends on the torch RNG state that the checkpoint restores.
    changes = dict(objective=objective, checkpoint_every=4, model_overrides=with_dropout(workspace))
    straight = make_config(workspace, tmp_path / "straight", **changes)
    interrupted = make_config(workspace, tmp_path / "resumed", **changes)
    train(straight)
    with pytest.raises(Interrupt):
        train(interrupted, on_step=interrupt_at(6))
    state = torch.load(tmp_path / "resumed" / STATE_FILE, map_location="cpu", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 0)
    torch.manual_seed(1234)  # a resumed run must not depend on the caller's RNG state
    train(interrupted, resume=True)

    expected = load_file(str(tmp_path / "straight" / LAST_CHECKPOINT / "model.safetensors"))
    actual = load_file(str(tmp_path / "resumed" / LAST_CHECKPOINT / "model.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)
    losses = [[r.get("train/loss") for r in map(json.loads, (tmp_path / run / METRICS_FILE).read_text().splitlines())
               if r["kind"] == "epoch"] for run in ("straight", "resumed")]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.slow
def test_resume_mid_epoch_checkpoint(workspace, tmp_path):
    straight = make_config(workspace, tmp_path / "straight", epochs=1, checkpoint_every=2)
    interrupted = make_config(workspace, tmp_path / "resumed", epochs=1, checkpoint_every=2)
    train(straight)
    with pytest.raises(Interrupt):
        train(interrupted, on_step=interrupt_at(3))
    state = torch.load(tmp_path / "resumed" / STATE_FILE, map_location="cpu", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 2)
    train(interrupted, resume=True)

    expected = load_file(str(tmp_path / "straight" / LAST_CHECKPOINT / "model.safetensors"))
    actual = load_file(str(tmp_path / "resumed" / LAST_CHECKPOINT / "model.safetensors"))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-6, msg=key)


def test_sentence_features_cached_on_disk(workspace, finished_run):
    from pretrained.checkpoint import referenced_text_encoder_digest
    from pretrained.data import SentenceFeatureCache

    digest = referenced_text_encoder_digest(str(workspace["text"]))
    cache = SentenceFeatureCache(workspace["cache"], digest, 128)
    assert cache.path.is_file()
    sentence = "There is an enhancing lesion in the left frontal lobe."
    assert cache.features([sentence]).shape == (1, 32)
    assert cache.update([sentence], text_encoder=None) == 0  # cached: the encoder is not called


def test_figures_from_checkpoint(workspace, finished_run, tmp_path):
    from pretrained.checkpoint import load_checkpoint
    from pretrained.figures import plot_attention_maps, plot_view_mds, token_grid
    from pretrained.train import embed_dataset, split_dataset

    config = load_pretrain_config(finished_run.parent / "run.yaml")
    model = load_checkpoint(finished_run / LAST_CHECKPOINT)
    dataset = split_dataset(config, model, "test")
    embeddings = embed_dataset(model, dataset, batch_size=4, device=torch.device("cpu"))
    assert embeddings["views"].shape == (4, 4, 16)
    grid, spans_slices = token_grid(model.config)
    assert (grid, spans_slices) == ((3, 3), False)

    volume = dataset[0]["image"].numpy()
    attention = plot_attention_maps(volume, embeddings["attention"][0].numpy(), grid, spans_slices,
                                    tmp_path / "attention.png", views=(0, 1, 2), n_slices=3)  # fmt: skip
    mds = plot_view_mds(embeddings["views"][:3].numpy(), tmp_path / "mds.png", seed=0)
    for path in (attention, mds):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="token grid"):
        plot_attention_maps(volume, embeddings["attention"][0, :, :4].numpy(), grid, spans_slices, tmp_path / "x.png")


def test_registered_pretrainer_for_suites(workspace, tmp_path):
    from harness.plugins import load_plugins
    from harness.runner import PRETRAINERS

    load_plugins()
    entry = base_config(workspace["manifest"], "ignored", workspace["cache"], workspace["text"], epochs=1)
    entry["config"] = entry.pop("model")
    del entry["output"]
    checkpoint = PRETRAINERS.get("brat")(entry, tmp_path / "checkpoint")
    assert checkpoint == tmp_path / "checkpoint" / LAST_CHECKPOINT
    assert (checkpoint / "model.safetensors").is_file()
    modified = (checkpoint / "model.safetensors").stat().st_mtime_ns
    assert PRETRAINERS.get("brat")(entry, tmp_path / "checkpoint") == checkpoint  # finished: nothing reruns
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == modified
