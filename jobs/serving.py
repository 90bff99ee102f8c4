"""The MLflow pyfunc model of a HoVLE (or compositional baseline) export: image + prompt -> answer.

Logged as "model from code" (`jobs.registry.log_hovle_model`): MLflow copies this file and the `model/`
package into the logged model, and the Hugging Face folder into its artifacts (`hf_model`). Loading it
(`mlflow.pyfunc.load_model("models:/hovle@champion")`, `mlflow models serve`) needs neither this repo's
training code nor Ray nor DeepSpeed: only mlflow, torch, transformers, pillow and the copied `model/`.

Input (a DataFrame, or a list of dicts): `prompt` (str), and the image as `image` (str: base64, a local
path, or an http(s)/s3 URI) or `image_bytes` (bytes); no image asks a text-only question. Params:
`max_new_tokens` (int, default 32). Output: a DataFrame with one `answer` column.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import mlflow
from mlflow.models import set_model

HF_ARTIFACT = "hf_model"  # the artifacts key (and folder) that holds the Hugging Face export
DEFAULT_MAX_NEW_TOKENS = 32


def read_image(value: Any):
    """An image from bytes, base64 text, a local path or a URI -> an RGB PIL image (None for no image)."""
    from PIL import Image

    if value is None or (isinstance(value, float) and value != value) or value == "":  # NaN: a missing cell
        return None
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str) and "://" in value:
        import fsspec

        with fsspec.open(value, "rb") as handle:
            data = handle.read()
    elif isinstance(value, str) and len(value) < 4096 and _is_file(value):
        with open(value, "rb") as handle:
            data = handle.read()
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except binascii.Error:
            raise ValueError("image: not a readable path or URI, and not base64") from None
    else:
        raise ValueError(f"image: expected bytes, base64 text, a path or a URI, got {type(value).__name__}")
    return Image.open(io.BytesIO(data)).convert("RGB")


def _is_file(path: str) -> bool:
    import os

    return os.path.isfile(path)


class HoVLEPyfunc(mlflow.pyfunc.PythonModel):
    """Answers a prompt about an image with the HoVLE model in the `hf_model` artifact."""

    def load_context(self, context) -> None:
        import torch

        from model import HoVLEProcessor, load_pretrained

        folder = context.artifacts[HF_ARTIFACT]
        # HoVLE or the compositional baseline, by the folder's model_type
        self.model = load_pretrained(folder, dtype=torch.float32).eval()
        self.processor = HoVLEProcessor.from_pretrained(folder)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        answers = []
        for row in rows:
            image = read_image(row.get("image_bytes")) or read_image(row.get("image"))
            prompt = str(row.get("prompt") or "")
            content = f"<image>\n{prompt}" if image is not None and "<image>" not in prompt else prompt
            inputs = self.processor(
                [{"role": "user", "content": content}],
                images=[image] if image is not None else None,
                add_generation_prompt=True,
            )
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=inputs["input_ids"],
                    attention_mask=inputs["attention_mask"],
                    pixel_values=inputs.get("pixel_values"),
                    max_new_tokens=max_new_tokens,
                )
            answers.append(self.processor.decode(out[0, inputs["input_ids"].shape[1] :]).strip())
        return pd.DataFrame({"answer": answers})


set_model(HoVLEPyfunc())
