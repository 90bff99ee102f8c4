"""The project as a container image installs it: a wheel, not an editable checkout. The wheel built from
this checkout ships every preset and the packaged data (tests/test_platform_image.py installs it in a
clean virtualenv, as the image does, and runs `hovle` from there outside the checkout)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


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


def test_the_compose_stack_publishes_its_ports_on_loopback_only():
    """MLflow has no authentication of its own and Ray's dashboard submits jobs: nothing of the stack
    is published on the host's other interfaces."""
    stack = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    published = [port for service in stack["services"].values() for port in service.get("ports", [])]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published), published
