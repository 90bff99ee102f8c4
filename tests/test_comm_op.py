"""DeepSpeed's CPU comm op (built by torch's JIT on a worker's first start) after a build killed midway.

torch marks a build in progress with a `lock` file that only the builder removes; before jobs.strategy's
`load_comm_op`, a build killed midway left it and every later DeepSpeed start on the machine waited forever
(a fresh-clone test run interrupted by a restart did so to this machine's cache). Each test works on a copy of
the machine's built op in an extensions folder of its own, so the suite's other training is never touched.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.strategy import comm_op_folder
from tests.conftest import REPO_ROOT

OP = "deepspeed_shm_comm"
LOAD = "from jobs.strategy import load_comm_op; load_comm_op(); print('loaded')"


STARTED: list[subprocess.Popen] = []


def load(extensions: Path) -> subprocess.Popen:
    """`load_comm_op()` in a process (and session) of its own, with `extensions` as TORCH_EXTENSIONS_DIR."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    STARTED.append(subprocess.Popen(
        [sys.executable, "-c", LOAD], cwd=REPO_ROOT, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ))  # fmt: skip
    return STARTED[-1]


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    """(an extensions folder, the op's build folder in it) holding a copy of the built op (mtimes kept:
    torch's ninja finds it current)."""
    done = load(Path(os.environ["TORCH_EXTENSIONS_DIR"]))  # builds it into the machine's cache if not there
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0 and "loaded" in out, err[-3000:]
    built = comm_op_folder(OP)
    root = tmp_path / "extensions"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    folder = comm_op_folder(OP)
    shutil.copytree(built, folder, ignore=shutil.ignore_patterns("lock"))
    yield root, folder
    for process in STARTED:  # one that failed the test by waiting forever does not outlive it
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    STARTED.clear()


def test_a_start_after_a_build_killed_midway_builds_again_instead_of_waiting_forever(extensions):
    extensions, folder = extensions
    lock = folder / "lock"
    (folder / f"{OP}.so").unlink()  # the next load links it again: a build of a second or two
    build = load(extensions)
    deadline = time.monotonic() + 120
    while not lock.exists() and build.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(build.pid, signal.SIGKILL)  # the build and its compiler, midway
    build.wait(timeout=30)
    assert lock.exists(), "the build finished before it could be killed"

    start = load(extensions)
    out, err = start.communicate(timeout=300)  # waited forever before
    assert start.returncode == 0 and "loaded" in out, err[-3000:]
    assert "left by a build that did not finish" in err
    assert not lock.exists() and (folder / f"{OP}.so").is_file()


def test_a_build_in_progress_elsewhere_is_waited_for_and_not_disturbed(extensions):
    extensions, folder = extensions
    lock = folder / "lock"
    # another process of the platform building: it holds the flock and torch's `lock` is its own
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)",
         str(folder.parent / f"{OP}.flock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        lock.touch()
        waiting = load(extensions)
        time.sleep(5)
        assert waiting.poll() is None, waiting.communicate()[1][-3000:]  # it waits for the build ...
        assert lock.exists()  # ... and leaves its lock alone
    finally:
        holder.kill()  # that build dies midway: its flock goes with it, its `lock` stays
        holder.wait()
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0 and "loaded" in out, err[-3000:]
    assert not lock.exists()


def test_each_install_of_deepspeed_and_torch_builds_in_a_folder_of_its_own(tmp_path):
    """A clone of its own venv (the README walkthrough's clone links this one's) keeps its build apart: the
    build file names the sources by path, so a shared folder was rebuilt at every switch between the two."""
    linked = tmp_path / "clone-venv"
    linked.symlink_to(REPO_ROOT / ".venv")
    show = "from jobs.strategy import comm_op_folder; print(comm_op_folder())"
    shown = subprocess.run(
        [str(linked / "bin" / "python"), "-c", show],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-3000:]
    here = comm_op_folder(OP)
    there = Path(shown.stdout.strip().splitlines()[-1])
    assert there != here and there.name == here.name == OP
    assert there.parent.parent == here.parent.parent == Path(os.environ["TORCH_EXTENSIONS_DIR"])
    assert comm_op_folder(OP) == here  # the same install, the same folder
