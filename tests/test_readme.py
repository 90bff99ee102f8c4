"""The README as a newcomer reads it: every command block runs as typed, in order, in a fresh clone.

The blocks run on the tiny preset: `smollm2-135m` is read as `tiny` and `make demo` gets
`DEMO_ARGS="--preset tiny --steps 2 --samples 12"`. A block is skipped only where the README marks it
(`<!-- not run by tests/test_readme.py: why -->`) as the suite itself, a server, a cluster or longer
than a minute. The shell carries over from block to block (`source .venv/bin/activate`, `export ...`),
as in the reader's terminal.
"""

import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SKIP_MARK = "<!-- not run by tests/test_readme.py: "
SKIP_REASONS = ("it is the test suite", "a server", "a cluster", "longer than a minute")
BLOCK = re.compile(
    r"(?:^" + re.escape(SKIP_MARK) + r"(?P<skip>.+?) -->\n)?^```(?P<lang>bash|python)\n(?P<body>.*?)^```$",
    re.S | re.M,
)
TINY_DEMO = "--preset tiny --steps 2 --samples 12"


@dataclass
class Block:
    line: int
    lang: str
    body: str
    skip: str | None


@dataclass
class Ran:
    block: Block
    returncode: int
    output: str
    seconds: float


def readme_blocks() -> list[Block]:
    text = (REPO_ROOT / "README.md").read_text()
    return [
        Block(text.count("\n", 0, m.start("body")) + 1, m["lang"], m["body"], m["skip"])
        for m in BLOCK.finditer(text)
    ]


def fresh_clone(into: Path) -> Path:
    """The checkout's files as a clone would have them (tracked and new, not ignored), with this
    checkout's .venv linked in so nothing is installed again."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, into / name)  # mtimes kept: make sees the installed .venv as current
    stamp = REPO_ROOT / ".venv" / ".installed"  # the Makefile's: .venv is current with pyproject.toml
    if not stamp.is_file() or stamp.stat().st_mtime < (REPO_ROOT / "pyproject.toml").stat().st_mtime:
        # the clone's `make demo` would reinstall the project into this linked .venv, editable from the
        # temporary clone, and leave it pointing at a folder that is then deleted
        pytest.fail(".venv is older than pyproject.toml: run `make venv` (make test does) before this test")
    (into / ".venv").symlink_to(REPO_ROOT / ".venv")  # compiled ops and conversions: the machine-wide cache
    return into


def run_block(block: Block, clone: Path, state: Path, index: int) -> Ran:
    """One block in bash, in the clone, with the shell state the blocks before it left."""
    body = block.body.replace("smollm2-135m", "tiny")
    script = clone.parent / f"block-{index:02d}.{'sh' if block.lang == 'bash' else 'py'}"
    script.write_text(body)
    command = f"source {script}" if block.lang == "bash" else f"python {script}"
    shell = f"set -eo pipefail; source {state}; cd {clone}; {command}; export -p > {state}"
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", shell], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )
    return Ran(block, done.returncode, done.stdout + done.stderr, time.monotonic() - started)


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> tuple[Path, list[Ran]]:
    root = tmp_path_factory.mktemp("readme")
    clone = fresh_clone((root / "clone").resolve())
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST")}
    env["DEMO_ARGS"] = TINY_DEMO
    # the clone's linked .venv is a new install path for DeepSpeed's comm op: its one build stays here
    env["TORCH_EXTENSIONS_DIR"] = str(root / "torch_extensions")
    env.pop("VIRTUAL_ENV", None)  # a newcomer's shell: .venv is not active until the README activates it
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    state = root / "shell-state.sh"
    state.write_text("".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items()))
    ran = []
    for index, block in enumerate(readme_blocks()):
        if block.skip is None:
            ran.append(run_block(block, clone, state, index))
            if ran[-1].returncode != 0:
                break  # the blocks after it build on it
    return clone, ran


@pytest.mark.slow
def test_every_command_block_runs_as_typed_in_order_from_a_fresh_clone(walkthrough):
    _, ran = walkthrough
    for done in ran:
        print(f"README line {done.block.line:>4}: {done.seconds:6.1f} s, exit {done.returncode}")
        where = f"README line {done.block.line}:\n{done.block.body}"
        assert done.returncode == 0, f"{where}\n{done.output[-4000:]}"
    assert len(ran) == sum(block.skip is None for block in readme_blocks())


def test_only_the_suite_servers_clusters_and_long_commands_are_skipped():
    blocks = readme_blocks()
    skipped = [block.skip for block in blocks if block.skip]
    assert all(reason.startswith(SKIP_REASONS) for reason in skipped), skipped
    assert len(skipped) <= len(blocks) // 2
    kept = "\n".join(block.body for block in blocks if not block.skip)
    for command in (
        "make demo",
        "hovle prepare",
        "hovle config show",
        "hovle evaluate",
        "hovle predict",
        "evaluate(",
    ):
        assert command in kept


@pytest.mark.slow
def test_the_demo_tells_the_whole_story_on_the_tiny_preset(walkthrough):
    clone, ran = walkthrough
    demo = next(done for done in ran if "make demo" in done.block.body)
    out = demo.output
    assert demo.returncode == 0, out[-3000:]
    assert "hovle-2.6b" in out and "2606.3M" in out
    real = 1 if "+ 1 Fashion-MNIST photos per stage" in out else 0  # 12 // 8, where the package is installed
    assert "   distill   read   24  written   24  rejected 0" in out
    chats = 8  # the tiny plan's general text-only conversations, in align and instruct
    for stage in ("align", "instruct"):
        counts = re.search(rf"   {stage} +read +(\d+) +written +(\d+) +rejected (\d+)", out)
        read, written, rejected = map(int, counts.groups())
        # byte-level tokens: some of the long general answers exceed the tiny plan's 256-token budget
        assert read == 12 + real + chats and written == read - rejected and rejected < chats
    for stage in ("distill", "align", "instruct"):
        assert f"   {stage:<9}     2" in out  # the summary: the stage's last logged step
    assert "held-out VQA accuracy" in out and "language kept: text_retained" in out
    # a random tiny model has no language to keep: the gate's default floors leave it a challenger
    assert "registered model hovle v1, alias challenger (language preservation" in out
    assert "Q: Who wrote Romeo and Juliet?" in out
    assert "A: " in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert (clone / "outputs" / "demo" / "mlflow.db").is_file()
    # Ray Train's placement-group cleaner finds the State API (the dashboard) and stays quiet
    assert "Failed to query Ray Train Controller" not in out
    # quiet by default: no progress bars (MLflow's artifact downloads), no Ray Train line per reported
    # checkpoint, no MLflow warning about predict's type hints (each was there before it was silenced)
    for noise in ("it/s]", "Reporting training result", "Add type hints to the `predict` method"):
        assert noise not in out, noise


@pytest.mark.slow
def test_the_example_config_is_complete_and_its_inputs_are_what_the_readme_writes(walkthrough):
    """configs/example.yaml: every section, loadable, and the retrain it describes finds its raw data and
    held-out sets once the README's commands have run (its retrain block is the one long step skipped)."""
    from jobs.run_config import SECTIONS, load_run_config

    clone, ran = walkthrough
    document = yaml.safe_load((REPO_ROOT / "configs" / "example.yaml").read_text())
    assert set(SECTIONS) <= set(document)
    config = load_run_config(str(REPO_ROOT / "configs" / "example.yaml"))
    assert config.eval is not None and config.retrain is not None
    assert config.model.llm.gguf_file  # the preset it extends: the real SmolLM2
    raw = [path for paths in config.retrain.raw.values() for path in paths]
    inputs = [config.eval.data, config.eval.text, *raw]
    assert all(done.returncode == 0 for done in ran)
    missing = [path for path in inputs if not (clone / path).is_file()]
    assert not missing, missing
