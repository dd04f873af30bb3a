"""Run config: the pyproject defaults parse, and every bad value is reported before training."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from experiments.runner import run_overrides
from fedgrow_core.growth.shapes import TransformerShape
from fedgrow_core.run_config import (
    ConfigError,
    RunConfig,
    config_reference_markdown,
    parse_overrides,
    parse_shape,
    pyproject_config,
)

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_config():
    return pyproject_config(ROOT / "pyproject.toml")


def test_pyproject_defaults_equal_the_model_defaults():
    run = RunConfig.from_flower(_pyproject_config())
    assert run == RunConfig()
    pyproject, defaults = _pyproject_config(), RunConfig().to_flower()
    assert list(pyproject) == list(defaults)  # same keys, in the same order
    assert {k: (type(v), v) for k, v in pyproject.items()} == {k: (type(v), v) for k, v in defaults.items()}
    assert run.client_models == ("minilm-l3", "minilm-l6", "minilm-l6-sre")
    assert run.target_shape == TransformerShape(8, 768, 1536, 12)


def test_image_preset_is_valid():
    preset = tomllib.loads((ROOT / "presets" / "image.toml").read_text())
    run = RunConfig.from_flower({**_pyproject_config(), **preset})
    assert run.task == "image" and run.dataset == "mnist"
    assert len(set(run.client_models)) == 3


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "presets").glob("*.toml")))
def test_every_preset_gives_a_valid_run_config(preset):
    overrides = tomllib.loads((ROOT / "presets" / preset).read_text())
    run = RunConfig.from_flower({**_pyproject_config(), **overrides})  # raises ConfigError naming what is wrong
    for key, value in overrides.items():
        assert run.to_flower()[key] == value, key  # every key of the preset is a run-config key and is kept


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
    assert len(info.value.problems) == 7  # type errors, unknown keys, ranges and shapes, all at once
    assert "unknown key 'no-such-key'" in text
    assert "batch-size = '32': expected an integer >= 1" in text
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({k: v for k, v in bad.items() if k not in ("no-such-key", "batch-size")})
    problems = info.value.problems
    assert len(problems) == 5
    text = str(info.value)
    assert "local-steps = 0: expected an integer >= 1" in text
    assert "partitioner = 'zipf': expected one of ['iid', 'dirichlet', 'shards']" in text
    assert "fraction-train = 1.5: expected a number in (0, 1]" in text
    assert "dirichlet-alpha = -1.0: expected a number > 0" in text
    assert "does not fit in target-shape" in text and "layers 7 > 4" in text and "hidden 480 > 256" in text


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="seed = True: expected an integer"):
        RunConfig.from_flower({"seed": True})


def test_pyproject_overrides_are_toml_literals():
    config = pyproject_config(ROOT / "pyproject.toml", ["lr-width=2e-4", 'strategy="fedadam"', "seed=3"])
    run = RunConfig.from_flower(config)
    assert (run.lr_width, run.strategy, run.seed) == (2e-4, "fedadam", 3)
    with pytest.raises(ValueError, match="override must be key=value, got 'seed'"):
        pyproject_config(ROOT / "pyproject.toml", ["seed"])


def test_overrides_are_parsed_by_flowers_run_config_parser():
    assert parse_overrides(['strategy="fedadam" seed=3', "lr-width=1e-3", "seed=4"]) == {
        "strategy": "fedadam",
        "seed": 4,
        "lr-width": 1e-3,
    }
    for malformed in ("seed", "seed = 3", ""):
        with pytest.raises(ValueError, match="override must be key=value, got"):
            parse_overrides([malformed])
    with pytest.raises(ValueError, match="with a TOML literal value, got 'strategy=fedadam'"):
        parse_overrides(["strategy=fedadam"])  # a string needs its quotes


def test_runner_overrides_are_checked_before_anything_runs(tmp_path):
    preset = tmp_path / "preset.toml"
    preset.write_text('partitioner = "iid"\nlocal-steps = 2\n')
    assert run_overrides(preset, ["seed=3", 'mode="small-only"']) == {
        "partitioner": "iid",
        "local-steps": 2,
        "seed": 3,
        "mode": "small-only",
    }
    with pytest.raises(ValueError, match="--set expects key=value, got 'seed'"):
        run_overrides(preset, ["seed"])
    with pytest.raises(ConfigError, match="local-steps = 0: expected an integer >= 1"):
        run_overrides(preset, ["local-steps=0"])


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


def test_attribute_names_are_not_flower_keys():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({"local_steps": 3, "seed": 1})
    assert info.value.problems[0].startswith("unknown key 'local_steps'; known keys: [")
    assert RunConfig(local_steps=3) == RunConfig.from_flower({"local-steps": 3})


def test_bad_values_name_key_value_and_expectation_all_at_once():
    bad = {
        "mode": "fedsgd",
        "seed": 1.5,
        "save-models": "yes",
        "fraction-train": 0,
        "trimmed-beta": 0.5,
        "fedopt-beta-1": -0.1,
        "dp-clipping-norm": float("nan"),
        "client-models": "a,,b",
        "intermediate-shape": "6x384x1536",
        "strategy": "fedprox",
        "resume-from": "outputs/run",
    }
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower(bad)
    assert info.value.problems == [
        "mode = 'fedsgd': expected one of ['fedgrow', 'scratch-fedavg', 'independent-ligo', "
        "'independent-dual-ligo', 'small-only'] (the registered modes)",
        "client-models = 'a,,b': expected comma-separated model names",
        "intermediate-shape = '6x384x1536': expected 'LxDxFxH' (layers x hidden x ffn x heads, e.g. "
        "'12x512x2048x16'), got '6x384x1536'",
        "fraction-train = 0: expected a number in (0, 1]",
        "fedopt-beta-1 = -0.1: expected a number in [0, 1)",
        "trimmed-beta = 0.5: expected a number in [0, 0.5)",
        "dp-clipping-norm = nan: expected a finite number",
        "seed = 1.5: expected an integer",
        "save-models = 'yes': expected true or false",
        # the checks between keys, after every key's own check, on the keys that passed theirs
        "proximal-mu = 0.0: strategy 'fedprox' needs proximal-mu > 0 (with 0 it is FedAvg)",
    ]
    # checks against another key run once that key is valid
    with pytest.raises(ConfigError, match="resume-from = 'outputs/run': mode 'small-only' is not checkpointed"):
        RunConfig.from_flower({"mode": "small-only", "resume-from": "outputs/run"})
    with pytest.raises(ConfigError, match="global-rank = 500: expected an integer in \\[0, 480\\]"):
        RunConfig(global_rank=500)  # the constructor checks too


def test_no_mode_averages_the_grown_models():
    # the clients' grown models share no coordinate system (docs/method.md), so no mode fine-tunes them federatedly
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flower({"mode": "fedgrow-fedft"})
    assert info.value.problems == [
        "mode = 'fedgrow-fedft': expected one of ['fedgrow', 'scratch-fedavg', 'independent-ligo', "
        "'independent-dual-ligo', 'small-only'] (the registered modes)"
    ]
    assert "mode = 'fedgrow-fedft'" in str(info.value)


def test_a_config_is_frozen_and_hashable():
    run = RunConfig()
    with pytest.raises(ValueError):
        run.seed = 1
    assert hash(run) == hash(RunConfig()) and run != RunConfig(seed=1)
    with pytest.raises(ConfigError, match="local-steps = 0"):
        run.model_copy(update={"local_steps": 0}).check()


def test_the_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == config_reference_markdown()
    for field in RunConfig.model_fields.values():
        assert field.description and "\n" not in field.description and "|" not in field.description
    printed = subprocess.run(
        [sys.executable, "-m", "fedgrow_core.run_config", "--markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert printed.stdout == config_reference_markdown()


def test_every_run_config_key_is_read_by_the_code_that_runs():
    """A key no code reads would be silently ignored: each one is read outside its own declaration.

    Read means an attribute access ``.<name>`` (or the name as a string, for the strategy knobs that
    ``server_app/orchestration/strategy.py`` maps to Flower's arguments) in the library or the apps.
    """
    root = Path(__file__).resolve().parents[1]
    sources = [
        path.read_text()
        for folder in ("fedgrow_core", "server_app", "client_app")
        for path in (root / folder).rglob("*.py")
        if path.name != "run_config.py"
    ]
    run_config = (root / "fedgrow_core" / "run_config.py").read_text()
    methods = run_config.split("    def __init__(self, **values", 1)[1]  # RunConfig's methods read keys too
    code = "\n".join([*sources, methods])
    unread = [name for name in RunConfig.model_fields if not re.search(rf"\.{name}\b|[\"']{name}[\"']", code)]
    assert not unread, f"run-config keys no code reads: {unread}"
