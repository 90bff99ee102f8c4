"""`hovle predict` / `python -m jobs.predict --model URI --image PATH --prompt "..."`: ask a model.

    python -m jobs.predict --model models:/hovle@champion --image photo.jpg --prompt "What colour is the car?"

`--model` is a registry URI (`models:/name@alias`, `models:/name/version`), a run's model (`runs:/ID/model`),
or a stage export folder (local or s3://). Registry and run URIs load through `mlflow.pyfunc.load_model`,
exactly as an application would; the tracking and registry servers come from MLFLOW_TRACKING_URI /
MLFLOW_REGISTRY_URI (default: ./mlflow.db). The image is a path, a URI or omitted (a text-only question).
The last line of stdout is one JSON object: {"model", "prompt", "answer"}.
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from pathlib import Path

from jobs.cli import USAGE_ERROR, job_parser, parse_job_args, run_command


def answer(model_uri: str, prompt: str, image: str | None = None, max_new_tokens: int = 32) -> str:
    """One answer from the model at `model_uri` (see the module docstring for the URI kinds)."""
    return answer_all(model_uri, [(prompt, image)], max_new_tokens)[0]


def answer_all(
    model_uri: str, questions: list[tuple[str, str | None]], max_new_tokens: int = 32
) -> list[str]:
    """Answers to (prompt, image path or URI or None) pairs from the model at `model_uri`, loaded once.

    The images are read here and sent as base64, as an HTTP client would: the served model reads no path
    or URI its deployment does not allow (`jobs/serving.py`)."""
    rows = [{"prompt": prompt, "image": _base64(image) if image else ""} for prompt, image in questions]
    params = {"max_new_tokens": max_new_tokens}
    if model_uri.startswith(("models:/", "runs:/")):
        import mlflow

        from jobs.tracking import tracking_uri, use_tracking_uri

        with use_tracking_uri(tracking_uri()):
            model = mlflow.pyfunc.load_model(model_uri)
        return [str(a) for a in model.predict(rows, params=params)["answer"]]

    from jobs.export import local_copy, read_export_info
    from jobs.serving import HoVLEPyfunc

    read_export_info(model_uri)  # a clear error when the folder is not a complete export
    with tempfile.TemporaryDirectory(prefix="hovle-predict-") as scratch:
        local = HoVLEPyfunc()
        local.load_context(types.SimpleNamespace(artifacts={"hf_model": local_copy(model_uri, scratch)}))
        return [str(a) for a in local.predict(None, rows, params)["answer"]]


def _base64(image: str) -> str:
    import base64

    from jobs.serving import MAX_IMAGE_BYTES
    from pipelines.storage import read_bytes

    return base64.b64encode(read_bytes(image, limit=MAX_IMAGE_BYTES)).decode("ascii")


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("hovle predict", __doc__)
    parser.add_argument("--model", required=True, help="models:/name@alias, runs:/ID/model or an export")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--image", default=None, help="image path or URI (omit for a text-only question)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parse_job_args(parser, argv)
    if args.image and "://" not in args.image and not Path(args.image).is_file():
        print(f"hovle predict: no image file {args.image}", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException

    def body() -> int:
        text = answer(args.model, args.prompt, args.image, args.max_new_tokens)
        print(json.dumps({"model": args.model, "prompt": args.prompt, "answer": text}))
        return 0

    # no such export, model, version or alias: a usage error
    return run_command("hovle predict", body, {MlflowException: USAGE_ERROR})


if __name__ == "__main__":
    raise SystemExit(main())
