"""The GGUF conversion cache (model.gguf_cache), portable dataset keys, and the processor-only import path."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoConfig

from model import gguf_cache
from model.presets import load_preset, resolve_path
from tests.helpers import build_context

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smollm2_gguf() -> tuple[str, str]:
    config = load_preset("smollm2-135m")
    return resolve_path(config.llm_name_or_path), config.llm_gguf_file


def test_second_load_comes_from_the_cache_and_equals_the_conversion(smollm2_gguf, tmp_path, monkeypatch):
    source_dir, gguf_file = smollm2_gguf
    directory = tmp_path / "llm"
    directory.mkdir()
    gguf = directory / gguf_file
    shutil.copy2(Path(source_dir) / gguf_file, gguf)
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    converted_config = gguf_cache.text_config(str(directory), gguf_file)
    converted_tokenizer = gguf_cache.tokenizer(str(directory), gguf_file)
    entry = gguf_cache.entry_dir(gguf)
    assert entry.parent.parent == tmp_path / "cache"
    assert (entry / "config.json").is_file() and (entry / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in entry.iterdir() if p.name.startswith(".")]  # no staging folder left behind

    # Zero the GGUF file but keep its size and time (the cache key): converting it again would fail.
    stat = gguf.stat()
    gguf.write_bytes(bytes(stat.st_size))
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf_cache.entry_dir(gguf) == entry
    with pytest.raises(ValueError):  # the zeroed file is no GGUF any more
        AutoConfig.from_pretrained(str(directory), gguf_file=gguf_file)

    cached_config = gguf_cache.text_config(str(directory), gguf_file)
    assert cached_config.to_dict() == converted_config.to_dict()
    cached_tokenizer = gguf_cache.tokenizer(str(directory), gguf_file)
    assert cached_tokenizer.get_vocab() == converted_tokenizer.get_vocab()
    assert cached_tokenizer.all_special_tokens == converted_tokenizer.all_special_tokens
    assert cached_tokenizer.chat_template == converted_tokenizer.chat_template
    text = "Héllo <|im_start|> wörld, 12345 tokens\n\ttabs"
    assert cached_tokenizer(text)["input_ids"] == converted_tokenizer(text)["input_ids"]


def test_processor_and_config_hashes_do_not_depend_on_the_cache(tmp_path, monkeypatch):
    """The dataset keys (processor hash, config hash) of a cached build equal an uncached one's."""
    monkeypatch.setenv(gguf_cache.CACHE_ENV, gguf_cache.CACHE_OFF)
    uncached = build_context("smollm2-135m", "instruct")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    build_context("smollm2-135m", "instruct")  # fills the cache
    cached = build_context("smollm2-135m", "instruct")
    assert list(tmp_path.glob("gguf/*/config.json"))
    assert cached.processor_hash == uncached.processor_hash
    assert cached.config_hash == uncached.config_hash


def test_a_changed_gguf_file_gets_a_new_entry(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF v1")
    first = gguf_cache.entry_dir(gguf)
    assert gguf_cache.entry_dir(gguf) == first
    gguf.write_bytes(b"GGUF v2, longer")
    os.utime(gguf, ns=(1, 1))
    assert gguf_cache.entry_dir(gguf) != first


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_cache.CACHE_ENV, gguf_cache.CACHE_OFF)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert gguf_cache.cache_root() is None and gguf_cache.entry_dir(gguf) is None


def test_an_unwritable_cache_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(blocker))
    written = []
    gguf_cache._publish(blocker / "gguf" / "entry", "config.json", lambda target: written.append(target))
    assert written == []
    assert "not written" in caplog.text


def test_preprocessing_actors_import_neither_torch_nor_the_network(tmp_path):
    """What a Ray Data preprocessing actor loads: the prepare module and a pickled, built context."""
    context = tmp_path / "context.pkl"
    context.write_bytes(pickle.dumps(build_context("smollm2-135m", "instruct")))
    script = textwrap.dedent(
        f"""
        import pickle, sys
        import pipelines.prepare
        ctx = pickle.loads(open({str(context)!r}, "rb").read())
        ids, labels = ctx.processor.tokenize(
            [{{"role": "user", "content": "hi"}}, {{"role": "assistant", "content": "hello"}}]
        )
        assert len(ids) == len(labels) and any(label != -100 for label in labels)
        heavy = sorted(m for m in ("torch", "model.modeling", "model.presets") if m in sys.modules)
        print("heavy:", heavy)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "heavy: []" in result.stdout, result.stdout


def test_config_hash_does_not_depend_on_where_the_llm_is_installed(tmp_path, monkeypatch):
    """The same preset in another checkout or virtualenv (the LLM's folder elsewhere) keeps its hash."""
    import model.presets

    here = build_context("smollm2-135m", "instruct")
    installed = Path(resolve_path(load_preset("smollm2-135m").llm_name_or_path))
    elsewhere = tmp_path / "other-venv" / installed.name
    elsewhere.parent.mkdir()
    elsewhere.symlink_to(installed, target_is_directory=True)
    monkeypatch.setattr(model.presets, "resolve_path", lambda path: str(elsewhere))
    moved = build_context("smollm2-135m", "instruct")
    assert load_preset("smollm2-135m").text_config._name_or_path == str(elsewhere)  # it did move
    assert moved.config_hash == here.config_hash
