"""Only ``fedgrow_core`` is installed: the Flower apps load from the project folder, never from the environment."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_library_is_a_package_of_the_distribution():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["fedgrow_core*"]


def test_the_apps_are_not_importable_outside_the_project_folder(tmp_path):
    probe = (
        "import importlib.util as u; "
        "print([n for n in ('server_app', 'client_app', 'fedgrow_core') if u.find_spec(n) is not None])"
    )
    env = {"PATH": "", "HOME": str(tmp_path)}
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "['fedgrow_core']"


def test_every_package_the_code_imports_is_declared():
    """deptry: no import of an undeclared package, and no declared package left unused (pyproject's exceptions)."""
    deptry = Path(sys.executable).parent / "deptry"
    assert deptry.is_file(), "deptry is a dev dependency: make setup installs it"
    found = subprocess.run([str(deptry), "."], cwd=ROOT, capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr


def test_each_app_moves_the_objects_its_imports_left_out_of_the_garbage_collectors_reach():
    """A full collection walks every tracked object; the apps freeze what importing the libraries made."""
    probe = (
        "import gc, sys, importlib; importlib.import_module(sys.argv[1]); "
        "print(gc.get_freeze_count(), len(gc.get_objects()))"
    )
    for app in ("client_app.app", "server_app.app"):
        found = subprocess.run([sys.executable, "-c", probe, app], cwd=ROOT, capture_output=True, text=True)
        assert found.returncode == 0, found.stderr
        frozen, tracked = found.stdout.split()
        assert int(frozen) > 100_000  # torch, transformers, timm and Flower's objects
        assert int(tracked) < int(frozen) / 10  # what a full collection still walks
