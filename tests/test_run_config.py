"""Run config: the pyproject defaults parse, and every bad value is reported before training."""

import tomllib
from pathlib import Path

import pytest

from fedgrow_core.growth.shapes import TransformerShape
from fedgrow_core.run_config import ConfigError, RunConfig, parse_shape, pyproject_config

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_config():
    return pyproject_config(ROOT / "pyproject.toml")


def test_pyproject_defaults_equal_the_dataclass_defaults():
    run = RunConfig.from_flower(_pyproject_config())
    assert run == RunConfig()
    assert run.client_models == ("minilm-l3", "minilm-l6", "minilm-l6-sre")
    assert run.target_shape == TransformerShape(8, 768, 1536, 12)


def test_image_preset_is_valid():
    preset = tomllib.loads((ROOT / "presets" / "image.toml").read_text())
    run = RunConfig.from_flower({**_pyproject_config(), **preset})
    assert run.task == "image" and run.dataset == "mnist"
    assert len(set(run.client_models)) == 3


def test_parse_shape():
    assert parse_shape("12x512x2048x16") == TransformerShape(12, 512, 2048, 16)
    with pytest.raises(ValueError, match="expected 'LxDxFxH'.*'12x512'"):
        parse_shape("12x512")


def test_every_problem_is_listed_at_once():
    bad = {
        "local-steps": 0,
        "batch-size": "32",
        "partitioner": "zipf",
        "fraction-train": 1.5,
        "dirichlet-alpha": -1.0,
        "target-shape": "4x256x1024x8",
        "no-such-key": 1,
    }
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower(bad)
    text = str(info.value)
    # type errors and unknown keys come first (the values cannot be built)
    assert "unknown key 'no-such-key'" in text
    assert "batch-size = '32': expected an integer" in text
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({k: v for k, v in bad.items() if k not in ("no-such-key", "batch-size")})
    problems = info.value.problems
    assert len(problems) == 5
    text = str(info.value)
    assert "local-steps = 0: expected an integer >= 1" in text
    assert "partitioner = 'zipf': expected one of ['iid', 'dirichlet', 'shards']" in text
    assert "fraction-train = 1.5: expected a number in (0, 1]" in text
    assert "dirichlet-alpha = -1.0: expected a number > 0" in text
    assert "does not fit in target-shape" in text and "layers 6 > 4" in text and "hidden 384 > 256" in text


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="seed = True: expected an integer"):
        RunConfig.from_flower({"seed": True})


def test_pyproject_overrides_are_toml_literals():
    config = pyproject_config(ROOT / "pyproject.toml", ["lr-width=2e-4", 'strategy="fedadam"', "seed=3"])
    run = RunConfig.from_flower(config)
    assert (run.lr_width, run.strategy, run.seed) == (2e-4, "fedadam", 3)
    with pytest.raises(ValueError, match="override must be key=value, got 'seed'"):
        pyproject_config(ROOT / "pyproject.toml", ["seed"])


def test_an_unwritable_output_dir_is_a_config_error(tmp_path):
    from server_app.app import check_writable

    check_writable(tmp_path / "new" / "folder")  # created
    assert (tmp_path / "new" / "folder").is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="output-dir = .*a-file.*cannot write there"):
        check_writable(blocker / "runs")


def test_evaluation_keys_reject_negative_values():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({"eval-every": -1, "eval-max-examples": -5})
    assert info.value.problems == [
        "eval-every = -1: expected an integer >= 0",
        "eval-max-examples = -5: expected an integer >= 0",
    ]
    run = RunConfig.from_flower({"eval-every": 0, "eval-max-examples": 0})
    assert not run.evaluates_round(1)
