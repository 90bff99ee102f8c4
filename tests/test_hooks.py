"""jobs/hooks.py: hooks named in HOVLE_HOOKS load by module or file, run in order, and a bad one is a
clear configuration error before any work starts."""

import pytest

from jobs import prepare as prepare_job
from jobs.hooks import Hooks, TrainStep, from_env
from model.config import ConfigError

HOOKS = """
from pathlib import Path

class Recorder:
    def __init__(self, name):
        self.name = name

    def on_train_step(self, at):
        with (Path(__file__).parent / "calls.txt").open("a") as log:
            log.write(f"{self.name} {at.stage} {at.step}\\n")

first, second = Recorder("first"), Recorder("second")
inert = object()
"""


@pytest.fixture
def hook_file(tmp_path):
    path = tmp_path / "my_hooks.py"
    path.write_text(HOOKS)
    return path


def test_hooks_load_from_a_file_or_a_module_and_run_in_the_order_named(hook_file, monkeypatch):
    faults = "tests.faults:kill_after_two_units"
    monkeypatch.setenv("HOVLE_HOOKS", f"{hook_file}:second, {hook_file}:first,{faults}")
    hooks = Hooks(from_env())
    assert len(hooks.specs) == 3
    hooks.emit("on_train_step", TrainStep("align", 7, 0, 1, None))
    hooks.emit("on_prepare_unit", 1, 4)  # one unit: the fault waits for two
    assert (hook_file.parent / "calls.txt").read_text().splitlines() == ["second align 7", "first align 7"]
    with pytest.raises(ValueError, match="unknown hook event"):
        hooks.emit("on_tea_break")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon", "is not `module.path:name`"),
        ("no.such.module:hook", "cannot import 'no.such.module'"),
        ("/no/such/file.py:hook", "cannot import '/no/such/file.py'"),
        ("{file}:missing", "has no 'missing'"),
        ("{file}:inert", "has none of the methods on_train_step, on_prepare_unit"),
    ],
)
def test_a_bad_hook_is_a_configuration_error_naming_it(hook_file, spec, message):
    with pytest.raises(ConfigError, match="HOVLE_HOOKS") as err:
        Hooks([spec.format(file=hook_file)])
    assert message in str(err.value)


def test_prepare_exits_2_on_a_bad_hook_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOVLE_HOOKS", "no.such.module:hook")
    argv = ["--config", "tiny", "--stage", "instruct", "--input", str(tmp_path / "in.jsonl")]
    assert prepare_job.main([*argv, "--output", str(tmp_path / "out")]) == 2
    assert "HOVLE_HOOKS: cannot import 'no.such.module'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
