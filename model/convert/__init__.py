"""Checkpoint importers: a released checkpoint's layout -> one transformers loads natively (no remote code).

`shards` streams safetensors shard by shard; `internlm2` maps InternLM2 (fused `wqkv`) onto Llama.
"""


class ConversionError(ValueError):
    """A source checkpoint this importer cannot convert (wrong model type, unsafe pickle, bad layout)."""
