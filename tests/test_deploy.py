"""The deployment files are checked against the code, so they cannot rot silently.

No Docker engine runs on the test machines: these tests parse the files, they do not build images.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from adapruner.cache import ENV_VAR as CACHE_VAR
from service.cli import build_parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.gpu"]
LIBRARY_VARS = {CACHE_VAR, "ADAPRUNER_HEARTBEAT_SECONDS", "ADAPRUNER_GRACE_SECONDS"}
SETTINGS_VARS = {f"ADAPRUNER_{name.upper()}" for name in Settings.model_fields}


def parses(argv: list[str]) -> None:
    assert argv[0] == "adapruner", argv
    build_parser().parse_args(argv[1:])  # argparse exits (and the test fails) on anything unknown


WORKERS = sorted(name for name in COMPOSE["services"] if name.startswith("worker"))


def test_compose_names_its_services():
    assert {"postgres", "migrate", "api", "dashboard", "worker-gpu0", "worker-gpu1"} <= set(COMPOSE["services"])


@pytest.mark.parametrize("service", ["migrate", "api", "dashboard", *WORKERS])
def test_compose_commands_exist_in_the_cli(service):
    parses(COMPOSE["services"][service]["command"])


def test_compose_env_vars_exist_in_settings():
    used = set()
    for service in COMPOSE["services"].values():
        used |= {k for k in (service.get("environment") or {}) if k.startswith("ADAPRUNER_")}
    assert used, "the compose file configures nothing through ADAPRUNER_ variables"
    assert used <= SETTINGS_VARS | LIBRARY_VARS, used - SETTINGS_VARS - LIBRARY_VARS


def test_compose_variables_are_in_the_example_env():
    text = (ROOT / "docker" / "compose.yaml").read_text()
    example = {line.split("=", 1)[0] for line in (ROOT / "docker" / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#")}
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required <= example, required - example
    assert {k for k in example if k.startswith("ADAPRUNER_")} <= SETTINGS_VARS | LIBRARY_VARS


def test_compose_gives_each_gpu_its_own_worker_and_keeps_the_dashboard_private():
    gpus = []
    for name in WORKERS:
        worker = COMPOSE["services"][name]
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"], name
        assert "count" not in device, name
        gpus += device["device_ids"]
        assert worker["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        assert "--device" in worker["command"]
    assert len(WORKERS) >= 2
    assert sorted(gpus) == sorted(set(gpus))  # N GPUs, N workers, one GPU each
    assert all(port.startswith("127.0.0.1:") for port in COMPOSE["services"]["dashboard"]["ports"])


@pytest.mark.parametrize(("service", "port"), [("api", 8080), ("dashboard", 8081)])
def test_compose_healthchecks_ask_each_service_on_its_own_port(service, port):
    check = " ".join(COMPOSE["services"][service]["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/" in check
    assert str({8080: 8081, 8081: 8080}[port]) not in check


def test_the_cpu_image_pulls_no_cuda_wheels():
    for name in ("api", "dashboard", "migrate"):
        assert COMPOSE["services"][name]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert 'TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"' in (ROOT / "docker" / "Dockerfile").read_text()


def torch_floor(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in re.search(r"torch>=(\d+)\.(\d+)", text).groups())


def test_image_torch_agrees_with_the_package_and_transformers_imports():
    floor = torch_floor((ROOT / "pyproject.toml").read_text())
    assert floor >= (2, 6)  # transformers 5's own floor
    gpu = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    base = tuple(int(v) for v in re.search(r"pytorch/pytorch:(\d+)\.(\d+)", gpu).groups())
    assert base >= floor
    assert torch_floor((ROOT / "docker" / "Dockerfile").read_text()) >= floor
    for dockerfile in DOCKERFILES:
        assert "from transformers import AutoModelForCausalLM" in dockerfile.read_text(), dockerfile.name


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_copy_what_exists_and_run_real_commands(dockerfile):
    text = dockerfile.read_text()
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.M)
    assert copies
    for line in copies:
        *sources, _dest = shlex.split(line)
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
            assert source not in ignored, f"{source} is copied but .dockerignore excludes it"
    cmd = re.search(r"^CMD\s+(\[.*\])$", text, flags=re.M).group(1)
    parses(yaml.safe_load(cmd))
    assert re.search(r"^USER\s+adapruner$", text, flags=re.M), "images run as a non-root user"
    for var in re.findall(r"\b(ADAPRUNER_\w+)=", text):
        assert var in SETTINGS_VARS | LIBRARY_VARS, var
    assert not re.search(r"(TOKEN|PASSWORD)\s*=", text), "no secrets baked into images"


def test_cpu_image_has_a_healthcheck_on_healthz():
    assert "/healthz" in (ROOT / "docker" / "Dockerfile").read_text().split("HEALTHCHECK", 1)[1]


def test_the_deploy_guide_commands_exist():
    guide = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", guide, flags=re.S)
    commands = [line.strip().removeprefix("$ ") for block in blocks for line in block.splitlines()]
    commands = [shlex.split(c.split(" &")[0].split(" |")[0]) for c in commands if c.startswith("adapruner ")]
    assert len(commands) >= 5
    for argv in commands:
        parses(argv)
    variables = set(re.findall(r"\b(ADAPRUNER_[A-Z_]+)\b", guide))
    assert variables <= SETTINGS_VARS | LIBRARY_VARS, variables - SETTINGS_VARS - LIBRARY_VARS


def test_docker_compose_accepts_the_file_where_it_is_installed(tmp_path):
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True) if shutil.which("docker") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("docker compose is not installed here (the tests above parse the file instead)")
    env = {**os.environ, "POSTGRES_PASSWORD": "x", "ADAPRUNER_API_TOKENS": "x"}
    result = subprocess.run(["docker", "compose", "-f", str(ROOT / "docker" / "compose.yaml"), "config", "-q"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def kubernetes_example() -> list[dict]:
    guide = (ROOT / "docs" / "deploy.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", guide.split("## Kubernetes", 1)[1], flags=re.S)[:1]
    return [doc for doc in yaml.safe_load_all(block) if doc]


def test_the_kubernetes_example_gives_each_worker_one_gpu_and_shares_the_data_volume():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in kubernetes_example()}
    assert {("Deployment", "adapruner-worker"), ("Deployment", "adapruner-api"), ("Job", "adapruner-migrate"),
            ("StatefulSet", "postgres"), ("PersistentVolumeClaim", "adapruner-data")} <= set(objects)
    assert objects[("PersistentVolumeClaim", "adapruner-data")]["spec"]["accessModes"] == ["ReadWriteMany"]
    (worker,) = objects[("Deployment", "adapruner-worker")]["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for obj in objects.values():
        spec = obj["spec"].get("template", {}).get("spec", {})
        for container in spec.get("containers", []):
            if container["image"].startswith("adapruner"):
                parses(container["command"])
                names = {e["name"] for e in container.get("env", [])}
                assert names <= SETTINGS_VARS | LIBRARY_VARS, names - SETTINGS_VARS - LIBRARY_VARS
        claims = [v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
                  if "persistentVolumeClaim" in v]
        assert claims in ([], ["adapruner-data"])
