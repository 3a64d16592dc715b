"""Suite files: parsing, path resolution, and errors that name the key path."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.suite import SuiteError, check_registered_names, load_suite

VALID = {
    "name": "unit",
    "models": {
        "pva": {"kind": "brat", "pretrain": "pva"},
        "ckpt": {"kind": "brat", "path": "checkpoints/brat-tiny"},
        "random": {"kind": "brat-random", "config": "brat-tiny", "seed": 0},
    },
    "datasets": {
        "cohort": {"cohort": {"n": 24, "seed": 0, "sequences": ["t1c", "flair"]}},
        "inhouse": {"manifest": "data/manifest.csv"},
        "bimcv": {"adapter": "bimcv-r", "root": "raw/BIMCV-R", "language": "en"},
    },
    "pretrain": {"pva": {"config": "brat-tiny", "objective": "pva", "dataset": "cohort", "epochs": 1}},
    "tasks": [
        {"task": "retrieval", "dataset": "cohort", "split": "test", "params": {"pool_size": 8}},
        {"task": "retrieval", "dataset": "inhouse"},
    ],
    "seeds": [0, 1],
    "baseline": "pva",
    "bootstrap": {"n_resamples": 200},
}


def write_suite(folder: Path, content) -> Path:
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def test_valid_suite(tmp_path):
    suite = load_suite(write_suite(tmp_path, VALID))

    assert suite.name == "unit"
    assert list(suite.models) == ["pva", "ckpt", "random"]
    assert suite.models["pva"].pretrain == "pva"
    assert suite.models["ckpt"].args == {"path": str((tmp_path / "checkpoints/brat-tiny").resolve())}
    assert suite.models["random"].args == {"config": "brat-tiny", "seed": 0}
    assert suite.datasets["inhouse"].args == {"manifest": str((tmp_path / "data/manifest.csv").resolve())}
    assert suite.datasets["bimcv"].args == {"adapter": "bimcv-r", "root": str((tmp_path / "raw/BIMCV-R").resolve()), "language": "en"}
    assert suite.datasets["cohort"].args == {"n": 24, "seed": 0, "sequences": ["t1c", "flair"]}
    assert suite.pretrain["pva"].trainer == "brat"
    assert suite.pretrain["pva"].config == {"config": "brat-tiny", "objective": "pva", "epochs": 1}
    assert suite.tasks[1].split == "test"
    assert suite.tasks[1].params == {}
    assert suite.seeds == [0, 1]
    assert suite.n_resamples == 200
    assert len(suite.digest) == 64


def test_defaults_and_scalar_forms(tmp_path):
    content = copy.deepcopy(VALID)
    content["seeds"] = 3
    content["bootstrap"] = 50
    del content["baseline"]
    suite = load_suite(write_suite(tmp_path, content))
    assert suite.seeds == [3]
    assert suite.n_resamples == 50
    assert suite.baseline is None


def _set(content: dict, path: str, value) -> None:
    keys = path.split(".")
    target = content
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is _DELETE:
        del target[keys[-1]]
    elif isinstance(target, list):
        target[int(keys[-1])] = value
    else:
        target[keys[-1]] = value


_DELETE = object()

INVALID_CASES = [
    ("colour", "blue", "colour: unknown key"),
    ("name", _DELETE, "name: expected a non-empty string"),
    ("models.pva.kind", _DELETE, "models.pva.kind: expected a non-empty string"),
    ("models.pva.pretrain", "nope", "models.pva.pretrain: not a pretraining job"),
    ("models.ckpt.path", 5, "models.ckpt.path: expected a path"),
    ("datasets.inhouse.cohort", {"n": 4}, "datasets.inhouse: expected exactly one of"),
    ("datasets.cohort.cohort.n", 1, "datasets.cohort.cohort.n: expected an integer >= 2"),
    ("datasets.cohort.cohort.size", 4, "datasets.cohort.cohort.size: unknown key"),
    ("pretrain.pva.dataset", "elsewhere", "pretrain.pva.dataset: not a dataset"),
    ("pretrain.pva.epochs", 0, "pretrain.pva.epochs: expected an integer >= 1"),
    ("tasks.1.dataset", "elsewhere", "tasks[1].dataset: not a dataset"),
    ("tasks.0.params", [1], "tasks[0].params: expected a non-empty mapping"),
    ("tasks.0.spilt", "test", "tasks[0].spilt: unknown key"),
    ("seeds", [0, 0], "seeds: seeds must be distinct"),
    ("seeds", [0, -1], "seeds[1]: expected an integer >= 0"),
    ("baseline", "gpt", "baseline: not a model of this suite"),
    ("bootstrap", {"n_resample": 10}, "bootstrap.n_resample: unknown key"),
]


@pytest.mark.parametrize(("key", "value", "message"), INVALID_CASES, ids=[case[0] for case in INVALID_CASES])
def test_error_names_key_path(tmp_path, key, value, message):
    content = copy.deepcopy(VALID)
    _set(content, key, value)
    path = write_suite(tmp_path, content)
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(SuiteError, match="invalid YAML"):
        load_suite(path)
    with pytest.raises(SuiteError, match="not found"):
        load_suite(tmp_path / "absent.yaml")


def test_registered_names_checked(tmp_path):
    content = copy.deepcopy(VALID)
    content["models"]["random"]["kind"] = "no-such-loader"
    content["tasks"][0]["task"] = "no-such-task"
    content["tasks"][1]["params"] = {"pool_sise": 4}
    problems = check_registered_names(load_suite(write_suite(tmp_path, content)))

    assert any("models.random.kind: unknown encoder loader 'no-such-loader'" in p for p in problems)
    assert any("tasks[0].task: unknown task 'no-such-task'" in p for p in problems)
    assert any("tasks[1].params: unknown parameter 'pool_sise'" in p for p in problems)


def test_shipped_suites_load():
    suites = Path(__file__).resolve().parents[1] / "suites"
    for name in ("demo.yaml", "ci.yaml"):
        suite = load_suite(suites / name)
        assert suite.baseline == "clip"
        assert set(suite.models) == {"brat-tiny", "clip", "random"}
        assert check_registered_names(suite) == []


def test_validate_command_reports_key_path(tmp_path, capsys):
    content = copy.deepcopy(VALID)
    content["baseline"] = "gpt"
    assert main(["validate", str(write_suite(tmp_path, content))]) == 1
    assert "baseline: not a model of this suite" in capsys.readouterr().out


def test_ls_lists_registries(capsys):
    from harness.commands import ls

    sections = ls.collect()
    assert "retrieval" in sections["tasks"]
    assert {"brat", "brat-random"} <= set(sections["encoders"])
    assert {"brat-v1", "ct-v1"} <= set(sections["preprocessing"])
    assert "brat-tiny" in sections["configs"]
    assert any(entry.startswith("bimcv-r: ") for entry in sections["adapters"])
    assert {"suites/demo.yaml", "suites/ci.yaml"} <= set(sections["suites"])

    assert main(["ls", "adapters"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("adapters:\n  bimcv-r: ")
    assert "tasks:" not in out


def test_validate_checks_manifest_splits(tmp_path, capsys):
    import pandas as pd
    from tiny_models import make_cohort

    manifest = make_cohort(tmp_path / "data", n=4)
    content = {
        "name": "small",
        "models": {"tiny": {"kind": "tiny"}},
        "datasets": {"tiny": {"manifest": "data/manifest.csv"}},
        "tasks": [{"task": "retrieval", "dataset": "tiny", "split": "test"}],
    }
    path = write_suite(tmp_path, content)
    assert main(["validate", str(path)]) == 0
    assert "valid suite 'small': 1 models, 1 datasets, 0 pretraining jobs, 1 evaluation jobs" in capsys.readouterr().out

    frame = pd.read_csv(manifest)
    frame.loc[1, "split"] = "train"  # subject000 now in test and train
    frame.to_csv(manifest, index=False)
    assert main(["validate", str(path), "--no-images"]) == 1
    out = capsys.readouterr().out
    assert "datasets.tiny" in out
    assert "subject000" in out


def test_unknown_model_config_checked(tmp_path):
    content = copy.deepcopy(VALID)
    content["models"]["random"] = {"kind": "brat-random", "config": "brat-huge", "seed": 0}
    problems = check_registered_names(load_suite(write_suite(tmp_path, content)))

    assert any("models.random: config: unknown brat config 'brat-huge'" in p for p in problems)
