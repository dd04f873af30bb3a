"""The docker/ files, checked without a Docker engine (none runs here).

The compose file parses and names every service, volume and secret that
docs/deployment.md promises; the containers' commands are exactly :mod:`deploy.commands`'s (the
ones the loopback deployment test runs); the images use Flower's entry points,
start from Flower's official images (same flwr version as installed) where they
fit, and copy only paths that exist; the GPU override requests a GPU per SuperNode.
"""

import re
from pathlib import Path

import flwr
import pytest
import yaml

from deploy.commands import SUPERLINK_PORT, superlink_command, supernode_command

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SERVICES = ["superlink", "supernode-0", "supernode-1"]
SECRETS = ["ca.crt", "server.pem", "server.key", "supernode_0", "supernode_1"]
VOLUMES = ["superlink-outputs"] + [
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
    assert services["superlink"]["command"] == superlink_command("/run/secrets", SUPERLINK_PORT)[1:]
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
        assert set(service["secrets"]) == {"ca.crt", f"supernode_{i}"}  # a node sees only its own key
        mounts = {v.split(":")[1] for v in service["volumes"]}
        assert mounts == {"/models", "/data", "/state", "/outputs"}
    for name, secret in compose["secrets"].items():
        assert secret["file"].startswith("../secrets/"), name  # deploy/generate_certs.sh secrets N


def _dockerfile(name: str) -> tuple[str, list[str], list[str]]:
    text = (DOCKER / name).read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    entrypoint = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    return base, entrypoint, [src for srcs in copies for src in srcs]


@pytest.mark.parametrize(
    "name,base,program",
    [
        ("superlink.Dockerfile", f"flwr/superlink:{flwr.__version__}", "flower-superlink"),
        ("supernode.Dockerfile", f"flwr/supernode:{flwr.__version__}", "flower-supernode"),
        ("supernode-cuda.Dockerfile", "nvidia/cuda:", "flower-supernode"),
    ],
)
def test_images_use_flowers_entry_points_and_existing_sources(name, base, program):
    found_base, entrypoint, sources = _dockerfile(name)
    assert found_base.startswith(base)
    assert entrypoint == [program]
    assert program == (superlink_command("x") if "superlink" in name else supernode_command("a", "b", "c", {}))[0]
    for src in sources:
        assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"


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
