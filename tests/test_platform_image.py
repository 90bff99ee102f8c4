"""The container image, the MLflow server start-up and the compose stack, checked without a Docker engine.

No Docker daemon runs here, so the image is never built: platform/Dockerfile is linted by the rules below
(pinned base images, a non-root user, the source commit as an environment variable, a wheel and not an
editable install, CPU/CUDA by build argument), and its runtime stage's `pip install` lines are replayed in a
fresh virtualenv with the wheel built from this checkout. The compose file is validated by `docker compose
config` (or Debian's `docker-compose config` where the v2 plugin is absent) and its resolved form checked:
services, healthchecks, named volumes, loopback-only ports, every secret from the environment, a scalable
worker.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "platform" / "Dockerfile"
MLFLOW_DOCKERFILE = REPO / "platform" / "mlflow" / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


# --------------------------------------------------------------------------------------------------
# A small Dockerfile reader: instructions (continuation lines joined), stages, ARG defaults.


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ARG, ...
    args: str
    stage: int  # -1: before the first FROM (global ARGs)


def read_dockerfile(path: Path) -> list[Instruction]:
    instructions, stage, pending = [], -1, ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue  # comments and parser directives (`# syntax=`) alike
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        keyword = keyword.upper()
        stage += keyword == "FROM"
        instructions.append(Instruction(keyword, args.strip(), stage))
        pending = ""
    return instructions


def substitute(text: str, values: dict[str, str]) -> str:
    """`${NAME}` and `$NAME` replaced by `values` (as the Dockerfile's ARG/ENV substitution does)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def build_args(instructions: list[Instruction], stage: int, overrides: dict[str, str] | None = None) -> dict:
    """The ARG values seen in `stage`: global defaults, the stage's own declarations, then `overrides`."""
    overrides = overrides or {}
    values: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword != "ARG" or ins.stage not in (-1, stage):
            continue
        name, _, default = ins.args.partition("=")
        if name in overrides:
            values[name] = overrides[name]
        elif default:
            values[name] = substitute(default.strip('"'), values)
        elif ins.stage == stage and name in global_args(instructions, overrides):
            values[name] = global_args(instructions, overrides)[name]  # `ARG NAME` re-declares a global
    return values


def global_args(instructions: list[Instruction], overrides: dict[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and ins.stage == -1:
            name, _, default = ins.args.partition("=")
            values[name] = overrides.get(name, substitute(default.strip('"'), values))
    return values


def final_stage(instructions: list[Instruction]) -> int:
    return max(ins.stage for ins in instructions)


def run_commands(ins: Instruction) -> list[list[str]]:
    """A RUN instruction's shell commands (split at `&&`) as words; RUN's own flags (--mount) dropped."""
    body = ins.args
    while body.startswith("--"):
        body = body.split(" ", 1)[1].lstrip()
    return [shlex.split(part) for part in body.split("&&")]


def pip_installs(instructions: list[Instruction], stage: int, values: dict[str, str]) -> list[list[str]]:
    """The arguments after `pip install` of each pip install command in `stage`, with ARGs substituted."""
    found = []
    for ins in instructions:
        if ins.keyword != "RUN" or ins.stage != stage:
            continue
        for words in run_commands(ins):
            words = [substitute(word, values) for word in words]
            for start in range(len(words) - 1):
                if words[start].endswith("pip") and words[start + 1] == "install":
                    found.append(words[start + 2 :])
                    break
    return found


DOCKER = read_dockerfile(DOCKERFILE)
RUNTIME = final_stage(DOCKER)


# --------------------------------------------------------------------------------------------------
# Lint: the rules hadolint would hold the image to, and this project's own.


def test_every_base_image_is_pinned_by_tag_and_ray_is_the_pinned_release():
    ray_pin = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray"))
    for dockerfile in (DOCKERFILE, MLFLOW_DOCKERFILE):
        instructions = read_dockerfile(dockerfile)
        for ins in (i for i in instructions if i.keyword == "FROM"):
            image = substitute(ins.args.split()[0], build_args(instructions, ins.stage))
            if ins.args.split()[0] in {"builder", "runtime"}:
                continue  # a stage of this file, not an image
            name, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "")
            assert tag and tag != "latest" and "$" not in tag, f"{dockerfile.name}: {image} is not pinned"
    ray_images = [
        substitute(i.args.split()[0], build_args(DOCKER, i.stage)) for i in DOCKER if i.keyword == "FROM"
    ]
    for image in ray_images:
        repository, tag = image.split(":")
        assert repository == "rayproject/ray"
        version, python_tag, variant = tag.split("-")
        assert Version(version) in ray_pin.specifier, (image, str(ray_pin))  # the project's Ray pin
        assert python_tag == "py311" and variant == "cpu"
    mlflow_base = next(i.args.split()[0] for i in read_dockerfile(MLFLOW_DOCKERFILE) if i.keyword == "FROM")
    mlflow_pin = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if d.startswith("mlflow"))
    assert Version(mlflow_base.rpartition(":v")[2]) in mlflow_pin.specifier, mlflow_base


def test_cpu_and_cuda_are_one_dockerfile_chosen_by_a_build_argument():
    for overrides, variant in (({}, "cpu"), ({"VARIANT": "cu128"}, "cu128")):
        froms = [
            substitute(i.args.split()[0], build_args(DOCKER, i.stage, overrides))
            for i in DOCKER
            if i.keyword == "FROM"
        ]
        assert {image.rsplit("-", 1)[1] for image in froms} == {variant}
        torch_line = pip_installs(DOCKER, RUNTIME, build_args(DOCKER, RUNTIME, overrides))[0]
        assert f"https://download.pytorch.org/whl/{variant}" in torch_line  # CPU or CUDA torch
    builder = [i for i in DOCKER if i.keyword == "RUN" and i.stage == 0]
    deepspeed_build = next(i.args for i in builder if "deepspeed==" in i.args)
    # the CUDA variant compiles DeepSpeed's ops into its wheel, for CUDA even without a GPU in the build
    assert "DS_BUILD_FUSED_ADAM=1" in substitute(deepspeed_build, build_args(DOCKER, 0))
    assert "DS_ACCELERATOR=cuda" in deepspeed_build and '"${VARIANT}" = "cpu"' in deepspeed_build


def test_the_image_runs_as_a_non_root_user():
    users = [i.args for i in DOCKER if i.keyword == "USER" and i.stage == RUNTIME]
    assert users, "the runtime stage sets no USER: it would run as whatever the base image says"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert users[-1].split(":")[0] == "1000"  # Ray's `ray` user; numeric for Kubernetes' runAsNonRoot
    last = [i for i in DOCKER if i.stage == RUNTIME][-1]
    assert last.keyword == "USER", "nothing after the final USER may run as another user"


def test_the_source_commit_build_argument_is_exported_to_the_environment():
    runtime = [i for i in DOCKER if i.stage == RUNTIME]
    assert any(i.keyword == "ARG" and i.args.split("=")[0] == "HOVLE_SOURCE_COMMIT" for i in runtime)
    env = " ".join(i.args for i in runtime if i.keyword == "ENV")
    assert "HOVLE_SOURCE_COMMIT=${HOVLE_SOURCE_COMMIT}" in env


def test_the_source_commit_is_read_from_the_environment_before_git(monkeypatch):
    from jobs.registry import source_commit

    monkeypatch.setenv("HOVLE_SOURCE_COMMIT", "0123abc")
    assert source_commit() == "0123abc"


def test_no_instruction_fetches_a_url_and_nothing_installs_editable():
    for ins in DOCKER:
        assert not (ins.keyword == "ADD" and re.search(r"\w+://", ins.args)), f"ADD of a URL: {ins.args}"
        assert not re.search(r"\b(curl|wget)\b", ins.args), f"a download outside pip: {ins.args}"
    for stage in range(RUNTIME + 1):
        for args in pip_installs(DOCKER, stage, build_args(DOCKER, stage)):
            assert "-e" not in args and "--editable" not in args, args
    runtime_copies = [i.args for i in DOCKER if i.keyword == "COPY" and i.stage == RUNTIME]
    assert not runtime_copies, f"the runtime stage copies sources in: {runtime_copies}"
    installs = pip_installs(DOCKER, RUNTIME, build_args(DOCKER, RUNTIME))
    wheel_install = next(args for args in installs if "boto3" in str(args))
    version = PYPROJECT["project"]["version"]
    assert f"/tmp/wheels/hovle_platform-{version}-py3-none-any.whl[assets]" in wheel_install


def test_the_pinned_versions_satisfy_the_project_s_own_bounds():
    values = build_args(DOCKER, RUNTIME)
    deps = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    assert Version(values["TORCH_VERSION"]) in deps["torch"].specifier
    assert Version(values["DEEPSPEED_VERSION"]) in deps["deepspeed"].specifier
    assert values["HOVLE_VERSION"] == PYPROJECT["project"]["version"]
    assert values["TORCH_VERSION"] == build_args(DOCKER, 0)["TORCH_VERSION"]  # builder and runtime agree
    assert values["DEEPSPEED_VERSION"] == build_args(DOCKER, 0)["DEEPSPEED_VERSION"]


def test_the_build_context_lets_in_only_the_wheel_s_sources():
    ignore = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", "start from nothing: a new file (.env, data, a key) must not reach the context"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "model", "pipelines", "jobs"}
    copied = {
        word.rstrip("/")
        for i in DOCKER
        if i.keyword == "COPY" and "--from" not in i.args
        for word in i.args.split()[:-1]
        if not word.startswith("--")
    }
    assert copied <= allowed, copied - allowed


# --------------------------------------------------------------------------------------------------
# The runtime stage's pip install lines, replayed in a fresh virtualenv.


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    """What the builder stage leaves in /home/ray/wheels, made here: the project's wheel (from a copy of the
    sources, as tests/test_packaging.py builds it) and DeepSpeed's wheel (the CPU variant's: no ops)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheels")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("model", "pipelines", "jobs"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run([*build, "."], cwd=source, check=True, capture_output=True, timeout=300)
    deepspeed = f"deepspeed=={build_args(DOCKER, 0)['DEEPSPEED_VERSION']}"
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    subprocess.run([*build, deepspeed], check=True, capture_output=True, timeout=600, env=env)
    return out


def local_torch_index(tmp_path: Path, version: str) -> str:
    """A PEP 503 index holding the CPU torch wheel this machine keeps on disk (pip's find-links), standing in
    for PyTorch's CPU index (this machine reaches PyPI only)."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    wheels = [w for folder in folders for w in Path(folder).glob(f"torch-{version}+cpu-cp311-*.whl")]
    if not wheels:
        pytest.skip(f"no CPU torch {version} wheel on disk (find-links) to stand in for PyTorch's CPU index")
    page = tmp_path / "simple" / "torch" / "index.html"
    page.parent.mkdir(parents=True)
    page.write_text(f'<a href="{wheels[0].as_uri()}">{wheels[0].name}</a>\n')
    return (tmp_path / "simple").as_uri()


def replayed_installs(wheelhouse: Path, torch_index: str) -> list[list[str]]:
    values = build_args(DOCKER, RUNTIME, {"TORCH_INDEX_URL": torch_index})
    lines = pip_installs(DOCKER, RUNTIME, values)
    assert len(lines) >= 3, lines
    return [[arg.replace("/tmp/wheels", str(wheelhouse)) for arg in line] for line in lines]


PROBE = """
import json, model
from importlib.metadata import version
from model.config_files import find_preset
from model.presets import load_preset
print(json.dumps({
    "package": model.__file__,
    "preset": str(find_preset("smollm2-135m")),
    "image_tokens": load_preset("tiny").image_tokens_per_tile,
    "versions": {name: version(name) for name in ("boto3", "deepspeed", "mlflow", "ray", "torch")},
}))
"""


@pytest.mark.slow
def test_the_runtime_stage_installs_in_a_clean_venv_and_finds_its_presets(wheelhouse, tmp_path):
    """Every pip install line of the runtime stage, in order, in a new virtualenv (no site packages): then the
    project imports from that venv, not this checkout, finds a preset from another folder, and `pip check`
    finds every requirement met (boto3's botocore within aiobotocore's range, one torch)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    started = time.monotonic()
    torch_index = local_torch_index(tmp_path, build_args(DOCKER, RUNTIME)["TORCH_VERSION"])
    installs = replayed_installs(wheelhouse, torch_index)
    for line in installs:
        # --no-compile: the image byte-compiles; here it would only add minutes
        result = subprocess.run(
            [str(python), "-m", "pip", "install", "--no-compile", "-q", *line],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, f"pip install {shlex.join(line)}\n{result.stderr[-4000:]}"
    print(f"replayed the runtime stage's installs in {time.monotonic() - started:.0f} s")
    checked = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    # only the asset packages, installed --no-deps on purpose, may lack their declared dependencies
    no_deps = {Requirement(a).name for line in installs if "--no-deps" in line for a in line if a[0] != "-"}
    problems = [p for p in checked.stdout.splitlines() if p and Requirement(p.split()[0]).name not in no_deps]
    assert not problems, checked.stdout
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run(
        [str(python), "-c", PROBE], cwd=outside, env=env, capture_output=True, text=True, timeout=600
    )
    assert probe.returncode == 0, probe.stderr[-4000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(venv)  # the wheel's copy, not this checkout's
    assert Path(found["preset"]).is_relative_to(venv) and found["image_tokens"] > 0
    values = build_args(DOCKER, RUNTIME)
    assert found["versions"]["torch"] == f"{values['TORCH_VERSION']}+cpu"  # the CPU variant's torch
    assert found["versions"]["deepspeed"] == values["DEEPSPEED_VERSION"]
    assert found["versions"]["boto3"] == values["BOTO3_VERSION"]
    assert Version(found["versions"]["ray"]).base_version == build_args(DOCKER, -1)["RAY_VERSION"]
    # the console script the wheel installs, run outside the checkout, finds the packaged presets
    hovle = str(venv / "bin" / "hovle")
    shown = subprocess.run(
        [hovle, "config", "show", "smollm2-135m"], cwd=outside, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr[-4000:]
    assert yaml.safe_load(shown.stdout)["model"]["llm"]["gguf_file"]
    inspected = subprocess.run(
        [hovle, "inspect", "hovle-2.6b", "--json"], cwd=outside, env=env, capture_output=True, text=True
    )
    assert inspected.returncode == 0, inspected.stderr[-4000:]
    assert json.loads(inspected.stdout.strip().splitlines()[-1])["params_total"] > 2.5e9


# --------------------------------------------------------------------------------------------------
# The compose stack, resolved by Compose itself.

SERVICES = {"ray-head", "ray-worker", "scheduler", "mlflow", "postgres", "minio", "minio-init"}
ONE_SHOT = {"minio-init"}
REQUIRED = sorted(set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text())))


def compose_tool() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail("neither `docker compose` (v2 plugin) nor Debian's `docker-compose` is installed: "
                "apt-get install docker-compose")  # fmt: skip


def compose_config(env_file: Path) -> subprocess.CompletedProcess:
    """`compose config` of docker-compose.yml with `env_file` as its .env (no variable of it inherited)."""
    names = set(REQUIRED) | {"COMPOSE_PROJECT_NAME", "HOVLE_SCHEDULE", "HOVLE_WEBHOOK_URL"}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}
    command = [*compose_tool(), "--env-file", str(env_file), "-f", str(COMPOSE), "config"]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def markers() -> dict[str, str]:
    """A distinct value per required variable, to find where each one ends up."""
    return {name: f"marker-{index}-{name.lower().replace('_', '-')}" for index, name in enumerate(REQUIRED)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, markers) -> dict:
    env_file = tmp_path_factory.mktemp("compose") / "env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in markers.items()))
    result = compose_config(env_file)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def published(service: dict) -> list[tuple[str, str]]:
    """(host ip, host port) of each published port, from either Compose's resolved form."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):  # Compose v2: {host_ip, published, target, ...}
            out.append((port.get("host_ip", ""), str(port.get("published", ""))))
        else:  # docker-compose 1.x: "127.0.0.1:8265:8265/tcp"
            parts = str(port).split(":")
            out.append((parts[0] if len(parts) == 3 else "", parts[-2] if len(parts) > 1 else ""))
    return out


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_the_compose_file_validates_and_holds_the_platform_s_services(stack):
    assert set(stack["services"]) == SERVICES
    for name in ("ray-head", "ray-worker", "scheduler"):
        assert stack["services"][name]["image"].startswith("hovle-platform:")
        assert stack["services"][name]["build"]["dockerfile"] == "platform/Dockerfile"


def test_every_long_running_service_has_a_healthcheck_and_waits_for_what_it_needs(stack):
    for name, service in stack["services"].items():
        if name in ONE_SHOT:
            continue
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    needs = {name: set(service.get("depends_on", {})) for name, service in stack["services"].items()}
    assert {"mlflow", "minio-init"} <= needs["ray-head"] and needs["ray-worker"] == {"ray-head"}
    assert {"postgres", "minio-init"} <= needs["mlflow"] and "ray-head" in needs["scheduler"]


def test_state_lives_in_named_volumes(stack):
    assert set(stack["volumes"]) == {"postgres-data", "minio-data"}
    mounts = {
        name: [
            v if isinstance(v, str) else f"{v.get('source')}:{v.get('target')}" for v in s.get("volumes", [])
        ]
        for name, s in stack["services"].items()
    }
    assert any(m.startswith("postgres-data:/var/lib/postgresql/data") for m in mounts["postgres"])
    assert any(m.startswith("minio-data:/data") for m in mounts["minio"])


def test_every_port_is_published_on_loopback_only(stack):
    ports = {name: published(service) for name, service in stack["services"].items()}
    assert ports["ray-head"] and ports["mlflow"] and ports["minio"]
    for name, entries in ports.items():
        for host_ip, _ in entries:
            assert host_ip == "127.0.0.1", f"{name} publishes a port on {host_ip or 'every interface'}"
    assert not ports["postgres"], "PostgreSQL is for MLflow only"


def test_the_worker_scales_without_name_or_port_clashes(stack):
    worker = stack["services"]["ray-worker"]
    assert "container_name" not in worker and "hostname" not in worker and not worker.get("ports")
    assert "ray-head:6379" in str(worker["command"])
    assert not any("container_name" in service for service in stack["services"].values())


def test_every_credential_comes_from_the_env_file_and_none_is_written_in_the_compose_file(stack, markers):
    text = COMPOSE.read_text()
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(REQUIRED) <= set(example), f".env.example lacks {set(REQUIRED) - set(example)}"
    for name, value in example.items():
        if re.search(r"PASSWORD|SECRET|TOKEN|KEY", name):
            assert value.startswith("replace-me"), f".env.example holds a real-looking {name}"
            assert value not in text
    secret_names = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PGPASS")
    for name, service in stack["services"].items():
        for key, value in environment(service).items():
            if secret_names.search(key):
                assert value in markers.values(), f"{name}.{key} is not taken from .env"
    resolved = yaml.safe_dump(stack)
    assert all(value in resolved for value in markers.values())  # every required variable is used
    for uri in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI"):  # libpq reads PGPASSWORD
        assert markers["POSTGRES_PASSWORD"] not in environment(stack["services"]["mlflow"])[uri]


def test_a_missing_credential_stops_compose_with_its_name(tmp_path, markers):
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in markers.items() if k != "RAY_AUTH_TOKEN"))
    result = compose_config(env_file)
    assert result.returncode != 0 and "RAY_AUTH_TOKEN" in result.stderr + result.stdout


def test_ray_token_authentication_is_on_for_every_node_and_the_scheduler(stack, markers):
    for name in ("ray-head", "ray-worker", "scheduler"):
        env = environment(stack["services"][name])
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == markers["RAY_AUTH_TOKEN"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["MLFLOW_TRACKING_PASSWORD"] == markers["MLFLOW_ADMIN_PASSWORD"]


def test_the_scheduler_submits_the_mounted_run_config_to_the_head(stack):
    command = " ".join(stack["services"]["scheduler"]["command"])
    assert "cron_loop.py" in command and "python -m jobs.submit" in command
    assert "--address http://ray-head:8265" in command and "--config /etc/hovle/run.yaml" in command
    head_mounts = " ".join(str(v) for v in stack["services"]["ray-head"]["volumes"])
    assert "platform/compose/run.yaml" in head_mounts and "/etc/hovle/run.yaml" in head_mounts


def test_the_mlflow_service_starts_on_postgres_s3_and_basic_auth(stack):
    env = environment(stack["services"]["mlflow"])
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://hovle/")
    assert "mlflow" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")


def test_the_stack_s_run_config_keeps_everything_in_the_bucket_and_tracks_on_the_server():
    from jobs.run_config import load_run_config

    config = load_run_config(str(REPO / "platform" / "compose" / "run.yaml"))
    paths = [config.train.storage_path, config.eval.data, config.eval.text, config.retrain.prepared]
    paths += [path for stage in config.retrain.raw.values() for path in stage]
    assert all(path.startswith("s3://hovle/") for path in paths), paths
    assert config.train.tracking.uri == "http://mlflow:5000"


# --------------------------------------------------------------------------------------------------
# The MLflow server's start-up script, run with a stand-in `mlflow` that records what it was given.

START = REPO / "platform" / "mlflow" / "start.sh"
FAKE_MLFLOW = """#!/bin/sh
cp "$MLFLOW_AUTH_CONFIG_PATH" "$RECORD.ini"
printf '%s\\n' "$@" > "$RECORD.args"
"""
SERVER_ENV = {
    "MLFLOW_BACKEND_STORE_URI": "postgresql://mlflow@postgres:5432/mlflow",
    "MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow@postgres:5432/mlflow_auth",
    "MLFLOW_ARTIFACTS_DESTINATION": "s3://hovle/mlflow",
    "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-from-env",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-key-from-env",
    "PGPASSWORD": "pg-password-from-env",
}


def start_mlflow(tmp_path: Path, **overrides: str | None) -> tuple[subprocess.CompletedProcess, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "mlflow").write_text(FAKE_MLFLOW)
    (bin_dir / "mlflow").chmod(0o755)
    record = tmp_path / "record"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record), "TMPDIR": str(tmp_path), **SERVER_ENV}
    env = {k: v for k, v in {**env, **overrides}.items() if v is not None}
    return subprocess.run(["sh", str(START)], env=env, capture_output=True, text=True, timeout=60), record


def test_the_mlflow_server_starts_with_postgres_s3_artifacts_allowed_hosts_and_basic_auth(
    tmp_path, monkeypatch
):
    result, record = start_mlflow(tmp_path)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "record.args").read_text().splitlines()
    value = {flag: args[i + 1] for i, flag in enumerate(args[:-1]) if flag.startswith("--")}
    assert value["--backend-store-uri"] == SERVER_ENV["MLFLOW_BACKEND_STORE_URI"]
    assert value["--artifacts-destination"] == "s3://hovle/mlflow" and "--serve-artifacts" in args
    assert value["--app-name"] == "basic-auth" and value["--host"] == "0.0.0.0"
    assert {"mlflow", "mlflow:*"} <= set(value["--allowed-hosts"].split(","))  # reachable by service name
    # every flag is one MLflow's own `mlflow server` (the pinned version) accepts
    from mlflow.cli import server

    known = {opt for param in server.params for opt in param.opts}
    assert {flag for flag in args if flag.startswith("--")} <= known
    ini = (tmp_path / "record.ini").read_text()
    assert not any(secret in ini for secret in SERVER_ENV.values() if "from-env" in secret)
    # ... and MLflow's auth app reads that file, with the admin from the environment. Its reader is loaded
    # alone: the auth package's __init__ needs Flask-WTF (mlflow[auth]), which the server image has.
    import importlib.util

    import mlflow

    reader = Path(mlflow.__file__).parent / "server" / "auth" / "config.py"
    spec = importlib.util.spec_from_file_location("mlflow_auth_config", reader)
    auth_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auth_config)
    read_auth_config = auth_config.read_auth_config
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(tmp_path / "record.ini"))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", SERVER_ENV["MLFLOW_AUTH_ADMIN_PASSWORD"])
    config = read_auth_config()
    assert config.database_uri == SERVER_ENV["MLFLOW_AUTH_DATABASE_URI"]
    assert config.admin_password == SERVER_ENV["MLFLOW_AUTH_ADMIN_PASSWORD"]


def test_the_mlflow_server_refuses_a_missing_secret_or_a_password_inside_a_uri(tmp_path):
    result, _ = start_mlflow(tmp_path, MLFLOW_AUTH_ADMIN_PASSWORD=None)
    assert result.returncode != 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in result.stderr
    result, _ = start_mlflow(tmp_path, MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:hunter2@postgres/mlflow")
    assert result.returncode == 2 and "PGPASSWORD" in result.stderr


# --------------------------------------------------------------------------------------------------
# The scheduler's loop: cron schedules, and one logged run.

CRON_LOOP = REPO / "platform" / "scheduler" / "cron_loop.py"


@pytest.fixture(scope="module")
def cron():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hovle_cron_loop", CRON_LOOP)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_cron_schedules_name_the_next_minute_as_cron_does(cron):
    from datetime import datetime

    at = datetime(2026, 12, 3, 10, 41, 30)  # a Thursday
    assert cron.Schedule.parse("0 3 * * *").next_after(at) == datetime(2026, 12, 4, 3, 0)
    assert cron.Schedule.parse("*/15 * * * *").next_after(at) == datetime(2026, 12, 3, 10, 45)
    assert cron.Schedule.parse("30 2 * * 0").next_after(at) == datetime(2026, 12, 6, 2, 30)  # Sunday
    assert cron.Schedule.parse("0 0 1 * 7").next_after(at) == datetime(2026, 12, 6, 0, 0)  # 1st or Sunday
    assert cron.Schedule.parse("0 6 29 2 *").next_after(at) == datetime(2028, 2, 29, 6, 0)
    assert cron.Schedule.parse("5-10/5 8,20 * * 1-5").next_after(at) == datetime(2026, 12, 3, 20, 5)
    for bad in ("0 3 * *", "61 * * * *", "* * * * mon", "*/0 * * * *"):
        with pytest.raises(cron.ScheduleError):
            cron.Schedule.parse(bad)


def test_the_scheduler_logs_each_run_s_exit_code_and_final_status(tmp_path):
    command = "import json, sys; print('progress'); print(json.dumps({'status': 'locked'})); sys.exit(3)"
    log = tmp_path / "runs.jsonl"
    result = subprocess.run(
        [sys.executable, str(CRON_LOOP), "--schedule", "0 3 * * *", "--once", "--log-file", str(log),
         "--heartbeat", str(tmp_path / "alive"), "--", sys.executable, "-c", command],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    record = json.loads(log.read_text().splitlines()[-1])
    assert record["exit_code"] == 3 and record["outcome"] == "locked"
    assert record["status"] == {"status": "locked"} and (tmp_path / "alive").exists()
    assert json.loads(result.stdout.strip().splitlines()[-1]) == record  # also in the container's log
