"""Weights load only from safetensors, GGUF or `torch.load(weights_only=True)`: a pickled payload planted
where the project reads weights or state never runs.

Each payload's `__reduce__` would create a marker file when unpickled; the marker must never appear.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.checkpoints import read_worker_state, rng_state, set_rng_state, worker_state_file
from jobs.export import write_export
from jobs.strategy import weights_only_checkpoint_engine
from model import build_model, load_pretrained
from tests.helpers import tiny_config, tiny_model


class Payload:
    """Unpickling this creates `marker` (what an attacker's code could do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> Path:
    """A torch checkpoint at `path` whose unpickling runs the payload."""
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "trap": Payload(marker)}, path)
    return path


def test_the_payload_is_real_unpickling_it_creates_the_marker(tmp_path):
    marker = tmp_path / "marker"
    with open(plant(tmp_path / "payload.bin", tmp_path / "marker"), "rb") as f:
        torch.load(f, weights_only=False)  # what must never happen in the project: proves the payload works
    assert marker.exists()
    marker.unlink()
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_an_export_holding_only_a_pickled_checkpoint_is_refused(tmp_path):
    model, processor = tiny_model()
    folder = tmp_path / "export"
    write_export(model, processor, model.state_dict(), str(folder), {"stage": "instruct"})
    (folder / "model.safetensors").unlink()
    plant(folder / "pytorch_model.bin", tmp_path / "marker")
    with pytest.raises(OSError):
        load_pretrained(folder)
    assert not (tmp_path / "marker").exists()


def test_a_pickled_checkpoint_beside_the_safetensors_is_never_read(tmp_path):
    model, processor = tiny_model()
    folder = tmp_path / "export"
    write_export(model, processor, model.state_dict(), str(folder), {"stage": "instruct"})
    plant(folder / "pytorch_model.bin", tmp_path / "marker")
    loaded = load_pretrained(folder)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert not (tmp_path / "marker").exists()


def test_an_llm_folder_with_a_pickled_checkpoint_is_refused_when_a_model_is_built(tmp_path):
    config = tiny_config()
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.text_config.to_dict()))
    plant(folder / "pytorch_model.bin", tmp_path / "marker")
    config.llm_name_or_path = str(folder)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global|unpickl"):
        build_model(config)
    assert not (tmp_path / "marker").exists()


def test_a_pickled_checkpoint_file_is_refused_on_resume(tmp_path):
    engine_file = plant(tmp_path / "mp_rank_00_model_states.pt", tmp_path / "marker")
    with pytest.raises(pickle.UnpicklingError):
        weights_only_checkpoint_engine().load(str(engine_file), map_location="cpu")  # DeepSpeed's files
    plant(tmp_path / worker_state_file(0), tmp_path / "marker")
    with pytest.raises(pickle.UnpicklingError):
        read_worker_state(str(tmp_path), 0)  # a worker's data position and RNG
    assert not (tmp_path / "marker").exists()


def test_a_worker_state_round_trips_through_the_weights_only_load(tmp_path):
    state = {"stream": {"epoch": 1, "step": 2, "next": 3, "open": [[0, 1]], "rows": 4}, "rng": rng_state()}
    torch.save(state, tmp_path / worker_state_file(1))
    again = read_worker_state(str(tmp_path), 1)
    assert again["stream"] == state["stream"]
    expected = np.random.rand(3)
    set_rng_state(again["rng"])
    assert np.array_equal(np.random.rand(3), expected)
