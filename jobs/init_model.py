"""The model a training run starts from, given as a folder: `hovle train --init` and `retrain.init`.

`model_folder` checks the folder against the run config's `model:` section; `init_export` turns it into an
export every worker reads. `field` names the setting the folder came from (`--init`, `<config>:
retrain.init`), so each command's error says which of its own inputs is wrong.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from model.config import ConfigError
from model.presets import ModelSpec, config_from_spec
from pipelines import storage

MODEL_FILES = ("config.json", "tokenizer_config.json", "processor_config.json")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")

# what the prepared data depends on: the tokens, the chat template, the image tiling
PREPARED_WITH = (
    "img_context_token_id", "img_start_token_id", "img_end_token_id", "chat_template",
    "tile_size", "patch_size", "pixel_shuffle_ratio", "min_tiles", "max_tiles", "use_thumbnail",
)  # fmt: skip


def model_folder(folder: str, model: ModelSpec, field: str) -> str:
    """`folder`'s URI (a local path made absolute: the workers run elsewhere), checked to be a stage
    export, or a model folder (`hovle import`'s output) of a model type this platform trains whose tokens,
    chat template and image tiling are those of `model` (whose processor prepares the data); else
    ConfigError, naming `field`."""
    from jobs.export import is_export
    from model.stages import STAGES_BY_MODEL_TYPE

    uri = folder if storage.is_remote(folder) else str(Path(folder).expanduser().resolve())
    if is_export(uri):
        return uri
    missing = [name for name in MODEL_FILES if not storage.exists(storage.join(uri, name))]
    if not any(storage.exists(storage.join(uri, name)) for name in WEIGHTS):
        missing.append(" or ".join(WEIGHTS))
    if missing:
        raise ConfigError(
            f"{field}: {folder} is not a model folder (no {', '.join(missing)}): give `hovle import`'s "
            "output or a stage export"
        )
    config = json.loads(storage.read_text(storage.join(uri, "config.json")))
    if config.get("model_type") not in STAGES_BY_MODEL_TYPE:
        raise ConfigError(
            f"{field}: {folder} holds a {config.get('model_type')!r} model, not one this platform trains "
            f"({', '.join(STAGES_BY_MODEL_TYPE)})"
        )
    expected = config_from_spec(model).to_dict()
    differ = [k for k in PREPARED_WITH if k in config and config[k] != expected.get(k)]
    vocab = config.get("text_config", {}).get("vocab_size"), expected["text_config"].get("vocab_size")
    differ += ["text_config.vocab_size"] if vocab[0] != vocab[1] else []
    if differ:
        raise ConfigError(
            f"{field}: {folder} is another model than the `model:` section's, whose processor prepares "
            f"the data ({', '.join(differ)} differ): extend the folder's model.yaml "
            f"(extends: {storage.join(folder, 'model.yaml')})"
        )
    return uri


def init_export(uri: str, shared_root: str) -> str:
    """The model folder at `uri` (checked by `model_folder`) as an export every training worker starts
    from: a stage export as it is; a model folder (`hovle import`'s output) copied to
    `<shared_root>/init-<key>` with an export.json (`stage: import`, `base_model`: the folder) that the
    model card follows to name the base. The key hashes the folder's path, config and file sizes: a model
    is copied once, and a folder imported again is copied again."""
    from jobs.export import EXPORT_INFO, is_export

    if is_export(uri):
        return uri
    fs, path = storage.filesystem(uri)
    sizes = sorted((Path(f["name"]).name, f["size"]) for f in fs.ls(path, detail=True))
    config = storage.read_text(storage.join(uri, "config.json"))
    key = hashlib.sha256(json.dumps([uri, config, sizes]).encode()).hexdigest()[:12]
    target = storage.join(shared_root, f"init-{key}")
    if is_export(target):  # export.json lands last: the copy is complete
        return target
    with tempfile.TemporaryDirectory(prefix="hovle-init-") as scratch:
        if storage.is_remote(uri):
            storage.get_directory(uri, scratch)
        storage.put_directory(scratch if storage.is_remote(uri) else uri, target)
    info = {"stage": "import", "base_model": uri, "steps": 0}
    storage.write_text_atomic(storage.join(target, EXPORT_INFO), json.dumps(info, indent=2, sort_keys=True))
    return target
