"""One run config: every section validated by one loader, `extends`, `--set section.field`, the schema
version, and `hovle config show` / `hovle config schema`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.run_config import SECTIONS, RunConfig, load_run_config
from model.config import ConfigError
from model.config_files import SCHEMA_VERSION
from model.presets import load_preset

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def hovle(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_every_preset_loads_as_a_whole_run_config():
    for preset in (REPO / "model" / "configs").glob("*.yaml"):
        config = load_run_config(preset.stem)
        assert config.schema_version == SCHEMA_VERSION and config.model.llm is not None
        # resolved and dumped (what workers get, what `config show` prints), it validates again the same
        assert RunConfig.model_validate(config.model_dump(mode="json")) == config, preset.stem


def test_a_file_extends_a_preset_and_overrides_only_what_differs(tmp_path):
    base = load_run_config("tiny")
    path = write(
        tmp_path / "run.yaml",
        {
            "extends": "tiny",
            "model": {"image": {"tile_size": 56}},
            "train": {"seed": 3, "stages": {"align": {"lr": 0.5}}},
        },
    )
    config = load_run_config(str(path))
    assert config.model.image.tile_size == 56
    assert config.model.llm == base.model.llm and config.model.embedding == base.model.embedding
    assert config.train.seed == 3 and config.train.stages["align"].lr == 0.5
    assert config.train.stages["align"].steps == base.train.stages["align"].steps  # merged, not replaced
    assert load_preset(str(path)).tile_size == 56  # the model alone reads the same document

    child = write(tmp_path / "child.yaml", {"extends": "run.yaml", "train": {"seed": 4}})  # relative path
    extended = load_run_config(str(child))
    assert extended.train.seed == 4 and extended.model.image.tile_size == 56


def test_an_extends_loop_and_a_newer_schema_are_refused(tmp_path):
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError, match="loops"):
        load_run_config(str(tmp_path / "a.yaml"))
    newer = write(tmp_path / "newer.yaml", {"schema_version": SCHEMA_VERSION + 1, "extends": "tiny"})
    with pytest.raises(ConfigError, match="newer: upgrade"):
        load_run_config(str(newer))


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ({"trian": {}}, "trian"),
        ({"data": {"max_tokenz": 5}}, "data.max_tokenz"),
        ({"train": {"stages": {"align": {"lr": -1}}}}, "train.stages.align.lr"),
        ({"registry": {"floor": -0.5}}, "registry.floor"),
        ({"retrain": {"prepared": "p"}}, "retrain.raw"),
        ({"eval": {"text": "t.jsonl"}}, "eval.data"),
        ({"model": {"embedding": {"num_layers": 0}}}, "model.embedding.num_layers"),
    ],
)
def test_a_bad_or_unknown_field_of_any_section_is_named_with_its_dots(tmp_path, document, field):
    path = write(tmp_path / "run.yaml", {"extends": "tiny", **document})
    with pytest.raises(ConfigError, match=r"run\.yaml: .*" + re.escape(field)):
        load_run_config(str(path))


def test_set_takes_section_dotted_fields_parsed_as_yaml():
    config = load_run_config("tiny", {"train.seed": "7", "data.max_tokens": "512", "registry.floor": 0.1})
    assert (config.train.seed, config.data.max_tokens, config.registry.floor) == (7, 512, 0.1)
    with pytest.raises(ConfigError, match="the section one of"):
        load_run_config("tiny", {"seed": "7"})  # no section
    with pytest.raises(ConfigError, match="train.stages.align.steps is not a section"):
        load_run_config("tiny", {"train.stages.align.steps.x": "7"})


def test_config_show_prints_the_resolved_config_which_loads_back_the_same(tmp_path):
    result = hovle("config", "show", "tiny", "--set", "train.seed=5", "--set", "data.max_tokens=300")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["seed"] == 5 and shown["data"]["max_tokens"] == 300
    again = load_run_config(str(write(tmp_path / "shown.yaml", shown)))
    assert again == load_run_config("tiny", {"train.seed": 5, "data.max_tokens": 300})

    bad = hovle("config", "show", "tiny", "--set", "train.stages.align.lr=-1")
    assert bad.returncode == 2 and "train.stages.align.lr" in bad.stderr and "Traceback" not in bad.stderr


def test_config_schema_is_the_run_configs_json_schema():
    result = hovle("config", "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema == RunConfig.model_json_schema()
    assert set(SECTIONS) <= set(schema["properties"]) and schema["required"] == ["model"]
    assert schema["additionalProperties"] is False


def test_every_command_refuses_a_bad_set_the_same_way(tmp_path, capsys):
    from jobs import prepare, retrain, train

    output = str(tmp_path / "o")
    for main, argv in (
        (prepare.main, ["--config", "tiny", "--stage", "align", "--input", "x", "--output", output]),
        (train.main, ["--config", "tiny", "--stage", "align"]),
        (retrain.main, ["--config", "tiny"]),
    ):
        assert main([*argv, "--set", "data.max_tokens=-1"]) == 2, argv
        err = capsys.readouterr().err
        assert "data.max_tokens" in err and "Traceback" not in err, argv


NOT_A_RUN_CONFIG = {
    "not YAML": (b"model: [unclosed\n", "not YAML at line 2"),
    "a YAML list": (b"- model\n- train\n", "a run config is a YAML mapping, got list"),
    "a YAML scalar": (b"just some words\n", "a run config is a YAML mapping, got str"),
    "a binary file": (bytes(range(256)) * 4, "not a text file (not UTF-8)"),
    "extends a list": (b"extends: [tiny]\n", "extends: a preset name or a YAML path, got list"),
    "too large": (b"# " + b"x" * (1 << 20) + b"\n", "too large for a run config"),
    "a folder": (None, "not a file"),
}


@pytest.mark.parametrize("kind", NOT_A_RUN_CONFIG)
def test_every_command_refuses_a_config_that_is_not_a_run_config_in_one_line(kind, tmp_path, capsys):
    """Each kind of broken --config, through every command that takes one, in this process: exit 2 and
    one line naming the file and what is wrong, before any Ray, model or data work."""
    from jobs import inspect, prepare, retrain, run_config, train

    content, message = NOT_A_RUN_CONFIG[kind]
    config = tmp_path / "run.yaml"
    config.mkdir() if content is None else config.write_bytes(content)
    commands = {
        "prepare": (prepare.main, ["--config", str(config), "--stage", "align", "--input", str(tmp_path),
                                   "--output", str(tmp_path / "out")]),
        "train": (train.main, ["--config", str(config), "--stage", "align"]),
        "retrain": (retrain.main, ["--config", str(config)]),
        "config show": (run_config.main, ["show", str(config)]),
        "inspect": (inspect.main, [str(config)]),
    }  # fmt: skip
    for name, (main, argv) in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(config) in err[0] and message in err[0], (name, err)
    assert not (tmp_path / "out").exists()
