"""`hovle evaluate --model URI --data JSONL [--text JSONL] [--base URI]`: how good a model is, into MLflow.

    evaluate(model_uri, EvalSettings) -> EvalReport    answers, scores, language kept (the plain function)
    run_evaluation(model_uri, settings, ...) -> dict   + gallery.html and eval_results.json, logged into an
                                                       MLflow run: what `demo`, `retrain` and the CLI call

VQA is greedy answers to a held-out conversation JSONL (`hovle synth`'s format, or any LLaVA-style one),
scored by normalised exact match overall and per skill (jobs.scoring); language preservation is
jobs.language's. Models resolve through jobs.models. Metrics, params and the artifacts go to `--run-id` or a
new run named `evaluate`. The last line of stdout is one JSON object: the metrics, `run_id` and `output` (the
local folder holding the gallery and results; null when it was a temporary one). Exit codes: 0 done; 2 bad
arguments, a model, data file or run that does not exist; 1 anything unexpected (a traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from jobs.cli import USAGE_ERROR, positive_int, run_command
from jobs.gallery import GALLERY_MAX_RECORDS, render_gallery, thumbnail
from jobs.logging_setup import setup_logging
from jobs.models import generate_answers, resolve_model
from jobs.run_config import EvalSettings
from jobs.scoring import RecordResult, accuracy, answers_match, vqa_metrics
from jobs.tracking import KIND_TAG, experiment_id, log_results
from jobs.tracking import tracking_uri as default_tracking_uri
from jobs.vision_check import image_token_spread
from model import HoVLEForConditionalGeneration, HoVLEProcessor
from pipelines import storage
from pipelines.settings import PrepareSettings
from pipelines.validate import RejectedSample, load_image, parse_conversation

logger = logging.getLogger(__name__)

VISION_CHECK_IMAGES = 16  # held-out images the blindness check compares
_LIMITS = PrepareSettings()  # the image bounds a record is read with: prepare's defaults
MAX_INPUT_BYTES = 1 << 30  # a held-out file larger than this is not one


class DataNotFound(FileNotFoundError):
    """A data file is missing, or none of its records could be evaluated."""


class RunNotFound(LookupError):
    """`--run-id` names no run in the tracking store."""


class UnusableRecord(ValueError):
    """One record cannot be evaluated (missing or unreadable image, malformed conversation)."""


# ---- VQA ---------------------------------------------------------------------------------------------


@dataclass
class VqaReport:
    """Results of the evaluated records, the count of skipped ones, thumbnails of the first few (gallery),
    and the first records' images (the blindness check's input: no second read of the data)."""

    results: list[RecordResult] = field(default_factory=list)
    skipped: int = 0
    thumbnails: list[list[str]] = field(default_factory=list)  # base64 PNGs, aligned with results[:50]
    images: list[Image.Image] = field(default_factory=list, repr=False)  # at most VISION_CHECK_IMAGES

    def metrics(self) -> dict[str, float]:
        return vqa_metrics(self.results, self.skipped)


@dataclass
class VqaPrompt:
    id: str
    skill: str | None
    messages: list[dict[str, str]]
    images: list[Image.Image]
    question: str
    expected: str


def parse_record(line: str, root: str) -> VqaPrompt:
    """A JSONL line -> the chat up to its last user turn, its images (paths relative to `root`), its answer
    (the `answer` field, else the reply that followed). Conversations are read as training reads them
    (pipelines.validate.parse_conversation).

    Raises:
        UnusableRecord: bad JSON, a malformed conversation, no user turn, no answer, a missing or unreadable
            image, or a different number of `<image>` placeholders than images.
    """
    try:
        record = json.loads(line)
        refs = record.get("image") or []
        refs = [refs] if isinstance(refs, str) else refs
        messages = parse_conversation(record.get("conversations"), len(refs))
    except (json.JSONDecodeError, AttributeError, TypeError) as err:
        raise UnusableRecord(f"not a conversation record ({type(err).__name__}: {err})") from err
    except RejectedSample as err:
        raise UnusableRecord(str(err)) from err
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    if not users:
        raise UnusableRecord("no human/user turn to answer")
    last = users[-1]
    expected = record.get("answer")
    if expected is None and last + 1 < len(messages):
        expected = messages[last + 1]["content"]  # no "answer" field: the reply that followed in the data
    if not isinstance(expected, str):
        raise UnusableRecord("no answer: neither an 'answer' field nor a reply to the last question")
    try:  # as prepare reads them: inside the file's folder, regular files, bounded bytes and pixels
        limits = (_LIMITS.max_file_bytes, _LIMITS.max_image_pixels)
        images = [load_image(str(ref), None, root, *limits, index)[0] for index, ref in enumerate(refs)]
    except RejectedSample as err:
        raise UnusableRecord(str(err)) from err
    skill = record.get("skill")
    skill = skill if isinstance(skill, str) else None
    prompt = messages[: last + 1]
    return VqaPrompt(str(record.get("id", "")), skill, prompt, images, prompt[-1]["content"], expected)


def read_lines(uri: str, what: str) -> list[str]:
    """The non-empty lines of a text file at `uri`. Raises DataNotFound when it is not there, or is not a
    regular UTF-8 text file of at most MAX_INPUT_BYTES."""
    if not storage.exists(uri):
        raise DataNotFound(f"{what} file {uri} not found")
    try:
        text = storage.read_text(uri, limit=MAX_INPUT_BYTES)
    except UnicodeDecodeError:
        raise DataNotFound(f"{what} file {uri}: not UTF-8 text") from None
    except ValueError as err:
        raise DataNotFound(f"{what} file {err}") from None
    return [line for line in text.splitlines() if line.strip()]


def evaluate_vqa(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    data: str,
    max_samples: int | None = None,
    max_new_tokens: int = 16,
    progress_every: int = 10,
    batch_size: int = 8,
) -> VqaReport:
    """Answer the first `max_samples` records of the conversation JSONL at `data` and score them.

    Records that cannot be evaluated are skipped with a warning and counted.

    Raises:
        DataNotFound: `data` is missing, or no record of it could be evaluated.
    """
    lines = read_lines(data, "data")[:max_samples]
    root = data.rsplit("/", 1)[0] if "://" in data else os.path.dirname(os.path.abspath(data))
    report = VqaReport()
    prompts: list[VqaPrompt] = []
    for n, line in enumerate(lines, 1):
        try:
            prompts.append(parse_record(line, root))
        except UnusableRecord as err:
            report.skipped += 1
            logger.warning("skipping record %d of %s: %s", n, data, err)
    for start in range(0, len(prompts), batch_size):  # left-padded batches: one generate call each
        batch = prompts[start : start + batch_size]
        chats = [(prompt.messages, prompt.images) for prompt in batch]
        for prompt, given in zip(batch, generate_answers(model, processor, chats, max_new_tokens)):
            correct = answers_match(given, prompt.expected)
            report.results.append(
                RecordResult(prompt.id, prompt.skill, prompt.question, prompt.expected, given, correct)
            )
            if len(report.thumbnails) < GALLERY_MAX_RECORDS:
                report.thumbnails.append([thumbnail(image) for image in prompt.images])
            report.images += prompt.images[: VISION_CHECK_IMAGES - len(report.images)]
        done = len(report.results)
        if done // progress_every != (done - len(batch)) // progress_every or done == len(prompts):
            logger.info(
                "vqa %d/%d records, accuracy %.3f, skipped %d",
                done, len(prompts), accuracy(report.results), report.skipped,
            )  # fmt: skip
    if not report.results:
        raise DataNotFound(
            f"none of the {len(lines)} records of {data} could be evaluated ({report.skipped} skipped; "
            "see the warnings): check the file's format and that image paths are relative to its folder"
        )
    return report


# ---- language preservation ---------------------------------------------------------------------------


def read_texts(uri: str) -> list[str]:
    """The `text` of each `{"id", "text"}` line of a JSONL (what `hovle synth --stage distill` writes)."""
    texts = []
    for n, line in enumerate(read_lines(uri, "text"), 1):
        try:
            texts.append(str(json.loads(line)["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            logger.warning("skipping line %d of %s: no 'text' (%s)", n, uri, err)
    return texts


# ---- the evaluation ----------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """What `evaluate` found: the metrics, every answered record, the language check's records."""

    model: str
    settings: EvalSettings
    metrics: dict[str, float]
    vqa: VqaReport
    language: list[dict] = field(default_factory=list)

    def write(self, folder: Path) -> list[Path]:
        """`gallery.html` and `eval_results.json` into `folder`; returns their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        gallery, results = folder / "gallery.html", folder / "eval_results.json"
        page = render_gallery(
            self.vqa.results, self.vqa.thumbnails, self.vqa.skipped, f"HoVLE evaluation of {self.model}"
        )
        gallery.write_text(page, encoding="utf-8")
        records = [asdict(r) for r in self.vqa.results]
        document = {"metrics": self.metrics, "records": records, "language": self.language}
        results.write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8")
        return [gallery, results]


def check_inputs(settings: EvalSettings) -> list | None:
    """Fail before any model loads: every input file is readable text; returns the parsed language
    questions."""
    from pipelines.general_text import parse_keyed_questions

    named = {"data": settings.data, "text": settings.text, "language questions": settings.language_questions}
    lines = {what: read_lines(uri, what) for what, uri in named.items() if uri}  # small: read again later
    if "language questions" not in lines:
        return None
    try:
        return parse_keyed_questions(lines["language questions"])
    except ValueError as err:
        raise DataNotFound(f"language questions {settings.language_questions}: {err}") from err


def evaluate(model_uri: str, settings: EvalSettings, tracking_uri: str | None = None) -> EvalReport:
    """Evaluate the model at `model_uri` (anything jobs.models.resolve_model takes) as `settings` say.

    Raises ModelNotFound or DataNotFound, before any model is evaluated where it can.
    """
    questions = check_inputs(settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = resolve_model(model_uri, tracking_uri)
    model.to(device)
    base = None
    if settings.base:
        from jobs.language import BaseReference, preservation

        base = BaseReference.from_uri(settings.base, tracking_uri, device)
        if base.key is None:
            base.loaded()  # fails now, not after the evaluation
    logger.info(
        "evaluating %s on %s (max %s records)", model_uri, settings.data, settings.max_samples or "all"
    )
    vqa = evaluate_vqa(model, processor, settings.data, settings.max_samples, settings.max_new_tokens)
    metrics = vqa.metrics()
    if len(vqa.images) >= 2:  # is the model blind: do different images look alike to the LLM
        metrics.update(image_token_spread(model, processor, vqa.images))
    language: list[dict] = []
    if base is None:
        logger.info("no --base model given: language preservation not measured (the gate refuses it)")
    else:
        texts = read_texts(settings.text) if settings.text else None
        try:
            found, language = preservation(model, processor, base, texts, questions)
        except ValueError as err:  # no held-out text to compute a perplexity on
            raise DataNotFound(f"text file {settings.text}: {err}") from err
        metrics.update(found)
    return EvalReport(model_uri, settings, metrics, vqa, language)


def run_evaluation(
    model_uri: str,
    settings: EvalSettings,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    output: Path | None = None,
    experiment: str = "hovle",
) -> dict[str, Any]:
    """`evaluate`, its files into `output` (a temporary folder when None), all of it logged into MLflow run
    `run_id` (a new run named `evaluate` when None). Returns the metrics with `run_id`.

    Raises RunNotFound, ModelNotFound or DataNotFound before the evaluation where it can.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking_uri = tracking_uri or default_tracking_uri()
    if run_id:
        try:
            MlflowClient(tracking_uri=tracking_uri).get_run(run_id)  # fails now, not after the evaluation
        except MlflowException as err:
            raise RunNotFound(f"MLflow run {run_id} not found at {tracking_uri}: {err.message}") from err
    report = evaluate(model_uri, settings, tracking_uri)  # bad inputs fail before a store is touched
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="hovle-evaluate-") as scratch:
        files = report.write(output or Path(scratch))
        target = (
            run_id
            or client.create_run(
                experiment_id(client, experiment), run_name="evaluate", tags={KIND_TAG: "evaluate"}
            ).info.run_id
        )
        params = {"model": model_uri, "data": settings.data, "base": settings.base or ""}
        params["max_samples"] = settings.max_samples or "all"
        log_results(client, target, params, report.metrics, files)
    if not run_id:
        client.set_terminated(target)  # a given run belongs to its creator, who closes it
    logger.info(
        "vqa accuracy %.3f -> MLflow run %s at %s", report.metrics["vqa_accuracy"], target, tracking_uri
    )
    return {**report.metrics, "run_id": target}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hovle evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="export folder, HF folder, runs:/ or models:/ URI")
    parser.add_argument("--data", required=True, help="held-out conversation JSONL (hovle synth's format)")
    parser.add_argument("--text", help="held-out text JSONL ({id, text}) for perplexity")
    parser.add_argument(
        "--base", help="the base model, for language preservation (a model URI, or preset:<name>: its LLM)"
    )
    parser.add_argument(
        "--language-questions",
        help="keyed general questions JSONL ({id, question, keys}); default: the package's, never trained on",
    )
    parser.add_argument("--max-samples", type=positive_int, help="evaluate the first N records only")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16, help="answer length (default 16)")
    parser.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--experiment", default="hovle", help="experiment of a new run (default hovle)")
    parser.add_argument("--run-id", help="log into this MLflow run instead of a new one")
    parser.add_argument("--output", type=Path, help="keep gallery.html and eval_results.json here")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    settings = EvalSettings(**{k: v for k, v in vars(args).items() if k in EvalSettings.model_fields})

    def body() -> int:
        summary = run_evaluation(
            args.model, settings, args.tracking_uri, args.run_id, args.output, args.experiment
        )
        summary["output"] = str(args.output) if args.output else None
        print(json.dumps(summary))
        return 0

    return run_command("hovle evaluate", body, {RunNotFound: USAGE_ERROR})


if __name__ == "__main__":
    sys.exit(main())
