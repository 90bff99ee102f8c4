"""The project as a container image installs it: a wheel, not an editable checkout.

The wheel is built from this checkout and unpacked into a folder of its own; a fresh interpreter started
outside the checkout imports the packages from there and finds the presets inside them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, model
from model.presets import load_preset
from model.config_files import find_preset
print(json.dumps({
    "package": model.__file__,
    "preset": str(find_preset("smollm2-135m")),
    "image_tokens": load_preset("tiny").image_tokens_per_tile,
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources, so setuptools' build folder never lands in the checkout."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("model", "pipelines", "jobs"):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = ["wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [sys.executable, "-m", "pip", *build, "-w", str(out), "."],
        cwd=source, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (built,) = out.glob("hovle_platform-*.whl")
    return built


def test_the_wheel_ships_every_preset_and_the_packaged_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {p.name for p in (REPO / "model" / "configs").glob("*.yaml")}
    assert presets and {f"model/configs/{name}" for name in presets} <= names
    assert {"pipelines/data/general_chat.jsonl", "pipelines/data/language_eval.jsonl"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/", "platform/")) for name in names)


def test_an_installed_wheel_finds_its_presets_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(target)  # not this checkout
    assert Path(found["preset"]).is_relative_to(target / "model" / "configs")
    assert found["image_tokens"] > 0
    hovle = target / "bin" / "hovle"  # the console script pip wrote
    shown = subprocess.run(
        [str(hovle), "config", "show", "smollm2-135m"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["model"]["llm"]["gguf_file"]
    inspected = subprocess.run(
        [str(hovle), "inspect", "hovle-2.6b", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout.strip().splitlines()[-1])["params_total"] > 2.5e9


def test_the_compose_stack_publishes_its_ports_on_loopback_only():
    """MLflow has no authentication of its own and Ray's dashboard submits jobs: nothing of the stack
    is published on the host's other interfaces."""
    stack = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    published = [port for service in stack["services"].values() for port in service.get("ports", [])]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published), published
