"""The `hovle` command and `jobs.inspect`: dispatch, usage errors, and the paper-scale size report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli

REPO_ROOT = Path(__file__).resolve().parent.parent
PAPER_CONFIG = REPO_ROOT / "model" / "configs" / "hovle-2.6b.yaml"


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_registered_subcommand():
    result = run_module("jobs.cli", "--help")

    assert result.returncode == 0, result.stderr
    for name, (_, summary) in cli.SUBCOMMANDS.items():
        assert name in result.stdout
        assert summary in result.stdout


def test_unknown_subcommand_exits_2_and_names_the_choices():
    result = run_module("jobs.cli", "no-such-job")

    assert result.returncode == 2
    assert "unknown subcommand 'no-such-job'" in result.stderr
    assert "inspect" in result.stderr


def test_no_subcommand_prints_usage_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "usage: hovle" in capsys.readouterr().err


def test_subcommand_runs_its_module_main_with_the_remaining_arguments(tmp_path, monkeypatch):
    (tmp_path / "echo_job.py").write_text(
        "def main(argv):\n    return 7 if argv == ['--flag', 'value'] else 1\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    monkeypatch.setitem(cli.SUBCOMMANDS, "echo", ("echo_job", "test job"))

    assert cli.main(["echo", "--flag", "value"]) == 7


def test_registered_subcommand_without_its_module_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("jobs.no_such_module", "missing"))

    assert cli.main(["ghost"]) == 2
    assert "jobs.no_such_module was not found" in capsys.readouterr().err


def test_zero1_matches_zero2_on_one_gpu_and_costs_more_on_many():
    from jobs.inspect import zero_model_states_bytes

    params, largest = 1_000_000_000, 100_000_000
    one_gpu = zero_model_states_bytes(params, largest, gpus_per_node=1, nodes=1)
    eight_gpus = zero_model_states_bytes(params, largest, gpus_per_node=8, nodes=1)

    assert one_gpu["1"] == one_gpu["2"] == 20 * params  # 2 + 18 bytes per parameter, nothing to split
    assert eight_gpus["1"] == 4 * params + 16 * params // 8
    assert eight_gpus["3"] < eight_gpus["2"] < eight_gpus["1"]


def test_inspect_missing_config_is_a_usage_error_that_lists_the_presets():
    result = run_module("jobs.inspect", "configs/does-not-exist.yaml")

    assert result.returncode == 2
    assert "no config file 'configs/does-not-exist.yaml' and no preset of that name" in result.stderr
    assert "hovle-2.6b" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def paper_report() -> dict:
    result = run_module("jobs.inspect", "hovle-2.6b", "--json", "--gpus", "8")  # a preset name
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_inspect_counts_the_paper_scale_model_at_2_6_billion(paper_report):
    assert paper_report["params_total"] == pytest.approx(2.6e9, rel=0.03)
    assert paper_report["params_embedding"] + paper_report["params_llm"] == paper_report["params_total"]
    assert set(paper_report["trainable"]) >= {"distill", "align", "instruct"}
    assert paper_report["gpus"] == 8


def test_inspect_zero3_needs_less_memory_per_gpu_than_zero1_at_8_gpus(paper_report):
    assert paper_report["zero"]["3"] < paper_report["zero"]["1"]


def test_inspect_table_shows_parts_stages_and_zero_memory(capsys):
    from jobs.inspect import main

    assert main([str(PAPER_CONFIG), "--gpus", "8"]) == 0
    table = capsys.readouterr().out
    for label in ("embedding module", "language model", "distill", "align", "instruct", "ZeRO-1", "ZeRO-3"):
        assert label in table


@pytest.mark.slow
def test_run_command_maps_expected_errors_to_exit_codes_and_lets_the_rest_through(capsys):
    """The one error -> exit-code table of every job CLI: the command's own errors first, then a bad config
    or a missing input as a usage error (2); anything else is a bug and keeps its traceback."""
    from jobs.cli import FAILED, USAGE_ERROR, run_command
    from model.config import ConfigError

    class Busy(Exception):
        pass

    def raising(err: Exception):
        def body() -> int:
            raise err

        return body

    assert run_command("hovle x", lambda: 0) == 0
    assert run_command("hovle x", raising(ConfigError("train.seed: not an int"))) == USAGE_ERROR
    assert capsys.readouterr().err == "hovle x: train.seed: not an int\n"
    assert run_command("hovle x", raising(FileNotFoundError("no data.jsonl"))) == USAGE_ERROR
    assert run_command("hovle x", raising(Busy("held")), {Busy: 3}) == 3
    assert run_command("hovle x", raising(Busy("held")), {(KeyError, Busy): FAILED}) == FAILED
    with pytest.raises(ZeroDivisionError):
        run_command("hovle x", raising(ZeroDivisionError("a bug")), {Busy: 3})
    assert "Traceback" not in capsys.readouterr().err


def test_jobs_are_quiet_by_default_and_verbose_brings_the_libraries_back(monkeypatch):
    """No transformers progress bars (the GGUF conversion's, in every worker), library progress loggers at
    WARNING; --verbose turns them back on and exports HOVLE_VERBOSE for the Ray workers the job starts."""
    import logging
    import os

    from transformers.utils import logging as transformers_logging

    from jobs.logging_setup import VERBOSE_ENV, setup_logging

    monkeypatch.delenv(VERBOSE_ENV, raising=False)
    try:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
        setup_logging()
        assert not transformers_logging.is_progress_bar_enabled()
        assert logging.getLogger("transformers").level == logging.WARNING
        assert VERBOSE_ENV not in os.environ
        # what a Ray worker started now inherits: tqdm bars made directly (the GGUF conversion's) are off
        child = subprocess.run(
            [sys.executable, "-c", "import tqdm; print(tqdm.tqdm([1]).disable)"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert child.stdout.strip() == "True", child.stderr
        setup_logging(verbose=True)
        assert transformers_logging.is_progress_bar_enabled()
        assert logging.getLogger("ray.train").level == logging.INFO
        assert os.environ[VERBOSE_ENV] == "1" and "TQDM_DISABLE" not in os.environ
    finally:
        monkeypatch.delenv(VERBOSE_ENV, raising=False)
        setup_logging()
        transformers_logging.enable_progress_bar()


@pytest.mark.parametrize("fault", ["no credentials", "no endpoint"])
def test_object_storage_out_of_reach_is_one_line_and_exit_2_for_every_command(
    fault, tmp_path, monkeypatch, capsys
):
    """An s3:// input with no credentials anywhere (environment, profile, instance role), or with an
    endpoint nothing listens on: every command says so in one line, in bounded time, instead of a
    traceback."""
    import s3fs

    from jobs import evaluate, prepare, train

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role here: do not wait for one
    if fault == "no credentials":
        monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # bounded either way; one attempt keeps the test short
    uri = "s3://hovle-unreachable/data"
    commands = {
        "prepare": (prepare.main, ["--config", "tiny", "--stage", "align", "--input", uri,
                                   "--output", str(tmp_path / "out")]),
        "train": (train.main, ["--config", "tiny", "--stage", "align", "--data", uri]),
        "evaluate": (evaluate.main, ["--model", str(tmp_path), "--data", f"{uri}/heldout.jsonl",
                                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]),
    }  # fmt: skip
    try:
        for name, (main, argv) in commands.items():
            assert main(argv) == 2, name
            err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hovle ")]
            assert len(err) == 1 and "AWS_ENDPOINT_URL" in err[0], (name, err)
    finally:  # fsspec caches filesystems by their arguments: later tests must not get a credential-less one
        s3fs.S3FileSystem.clear_instance_cache()


def test_an_input_prepare_cannot_read_is_one_line_and_exit_2(tmp_path, capsys):
    """A Parquet file with neither image nor text columns, and a device, as --input."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import prepare

    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), tmp_path / "no-columns.parquet")
    for source, message in (
        (tmp_path / "no-columns.parquet", "no image column"),
        (Path("/dev/zero"), "/dev/zero"),
    ):
        argv = [
            "--config",
            "tiny",
            "--stage",
            "align",
            "--input",
            str(source),
            "--output",
            str(tmp_path / "o"),
        ]
        assert prepare.main(argv) == 2, source
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hovle ")]
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o" / "manifest.json").exists()
