"""FLOPs per token of a stage's training step, and MFU from it on GPUs.

Per token, a dense layer with N weights costs 2N FLOPs forward, 2N backward to its input (needed whenever
anything before it trains) and 2N backward to its weights (only when it trains). Attention's score and
value products add 2 * 2 * layers * hidden * context per token forward (x3 with both backward parts);
with packing the context is the sample, not the row, so the average sample length is used.

    distill:  only the embedding module runs (the LLM is not called): 6 * N_embedding
    align:    all forward, backward through the LLM down to the embedding: 2N + 2N + 2 * N_embedding
    instruct: all train: 6N
Embedding tables (the LLM's untied input table, the embedding module's text table) are lookups and are
left out of N. The vision teacher's forward (stage 1) is per tile, not per token, and is left out; so is
the compositional model's frozen vision encoder, whose projector plays the embedding module's part (no
attention layers).
"""

from __future__ import annotations

from torch import nn

# Dense bf16 peak of common accelerators, TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def _count(module: nn.Module) -> int:
    """Parameters of `module`, also when ZeRO-3 has partitioned them (`ds_numel` is the full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def flops_per_token(model: nn.Module, stage: str, context: float) -> float:
    """Training FLOPs per token of `stage` for a HoVLE `model` at average sample length `context`."""
    config = model.config
    front = getattr(model, "embedding", None)  # the compositional model: its projector instead
    embedding = _count(front if front is not None else model.projector)
    table = getattr(front, "embed_tokens", None)
    if table is not None:
        embedding -= _count(table)  # the module's text table: a lookup, not a matmul
    text = config.text_config
    llm = _count(model.language_model)
    if not getattr(text, "tie_word_embeddings", False):
        llm -= text.vocab_size * text.hidden_size  # the input table: a lookup, not a matmul
    emb_layers = config.embedding_num_layers if front is not None else 0
    attention = 4 * text.hidden_size * context  # per layer, forward
    if stage == "distill":
        return 6 * embedding + 3 * attention * emb_layers
    forward = 2 * (embedding + llm) + attention * (emb_layers + text.num_hidden_layers)
    if stage == "align":
        return 2 * forward + 2 * embedding + attention * emb_layers
    return 3 * forward


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one accelerator by its name (e.g. 'NVIDIA H100 80GB HBM3'), or None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name.upper():
            return tflops * 1e12
    return None
