"""How intact is a model's text path? For each model: the embedding module's outputs on a text-only chat
against the LLM's own input embeddings (cosine, norm ratio: 1.0 and 1.0 = the identity the module starts
as), and its greedy answers to three general questions.

    .venv/bin/python benchmarks/probe_text_path.py preset:smollm2-135m runs/x/exports/distill ...

Each model is anything `hovle evaluate --model` takes. One JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.models import generate_answers, resolve_model  # noqa: E402

QUESTIONS = ("What is the capital of France?", "Who wrote Romeo and Juliet?", "How many days are in a week?")


@torch.inference_mode()
def probe(uri: str) -> dict:
    model, processor = resolve_model(uri)
    inputs = processor([{"role": "user", "content": QUESTIONS[0]}], add_generation_prompt=True)
    states = model.embedding(inputs["input_ids"])
    targets = model.language_model.get_input_embeddings()(inputs["input_ids"])
    cosine = torch.nn.functional.cosine_similarity(states, targets, dim=-1).mean().item()
    ratio = (states.norm(dim=-1) / targets.norm(dim=-1)).mean().item()
    chats = [([{"role": "user", "content": q}], []) for q in QUESTIONS]
    answers = generate_answers(model, processor, chats, 24)
    return {"model": uri, "cosine": round(cosine, 4), "norm_ratio": round(ratio, 4), "answers": answers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    for uri in parser.parse_args(argv).models:
        print(json.dumps(probe(uri)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
