"""`hovle evaluate --model URI --data JSONL [--text JSONL] [--base URI]`: how good a model is, into MLflow.

    resolve_model(uri, tracking_uri) -> (model, processor)   a stage export, a Hugging Face folder, runs:/,
                                                              models:/name@alias, models:/name/version, or
                                                              preset:<name> (the untrained preset: its LLM)
    evaluate_vqa(model, processor, data)    greedy answers on a held-out conversation JSONL (`hovle synth`'s
                                            format), normalised exact match overall and per skill
    preservation(model, processor, base, texts)   general language kept against the base (a BaseReference)
                                            (jobs/language.py: keyed text-only questions never trained on),
                                            and the perplexity ratio on held-out text (reported, not gated)
    render_gallery(report)                  an HTML page: images, question, expected and given answer

Metrics, params and the artifacts (`gallery.html`, `eval_results.json`) go to `--run-id` or a new run named
`evaluate`. The last line of stdout is one JSON object: the metrics, `run_id` and `output` (the local folder
holding the gallery and results; null when it was a temporary one). Exit codes: 0 done; 2 bad arguments, a
model, data file or run that does not exist; 1 anything unexpected (a traceback).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import os
import string
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from jobs.cli import positive_int
from jobs.export import is_export, load_export, local_copy
from jobs.logging_setup import setup_logging
from jobs.tracking import KIND_TAG, log_params
from jobs.tracking import tracking_uri as default_tracking_uri
from jobs.vision_check import image_token_spread
from model import HoVLEForConditionalGeneration, HoVLEProcessor, load_pretrained
from model.tokenizer import IMAGE_PLACEHOLDER
from pipelines import storage

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "gpt": "assistant"}
NUMBER_WORDS = {
    word: str(n) for n, word in enumerate("zero one two three four five six seven eight nine ten".split())
}
PRESET_SCHEME = "preset:"  # preset:<name or YAML>: the preset's untrained model (its LLM, identity module)
GALLERY_MAX_RECORDS = 50
THUMBNAIL_SIDE = 224
TEXT_MAX_TOKENS = 256
USAGE_ERROR = 2


class ModelNotFound(FileNotFoundError):
    """No loadable model at the URI given."""


class DataNotFound(FileNotFoundError):
    """A data file is missing, or none of its records could be evaluated."""


class RunNotFound(LookupError):
    """`--run-id` names no run in the tracking store."""


class UnusableRecord(ValueError):
    """One record cannot be evaluated (missing or unreadable image, malformed conversation)."""


# ---- models ------------------------------------------------------------------------------------------


def _load_hf_folder(folder: str) -> tuple[HoVLEForConditionalGeneration, HoVLEProcessor]:
    try:
        model = load_pretrained(folder)  # HoVLE or the compositional baseline, by its model_type
    except ValueError as err:
        raise ModelNotFound(str(err)) from err
    return model.eval(), HoVLEProcessor.from_pretrained(folder)


def resolve_model(
    uri: str, tracking_uri: str | None = None
) -> tuple[HoVLEForConditionalGeneration, HoVLEProcessor]:
    """(model in eval mode, processor) from `uri`.

    `uri` is a stage export (folder with `export.json`, local or s3://), a Hugging Face folder written by
    `save_pretrained` (local or s3://), or an MLflow model (`runs:/<run>/<path>`, `models:/<name>@<alias>`,
    `models:/<name>/<version>`): a pyfunc model whose artifact `hf_model` is the Hugging Face folder.

    Raises:
        ModelNotFound: nothing loadable at `uri` (the message says what was expected).
    """
    if uri.startswith(("runs:/", "models:/")):
        from mlflow.exceptions import MlflowException

        from jobs.registry import HF_ARTIFACT, download_hf_folder

        with tempfile.TemporaryDirectory(prefix="hovle-model-") as scratch:
            try:
                folder = download_hf_folder(uri, tracking_uri, scratch)
            except (MlflowException, OSError) as err:
                raise ModelNotFound(f"cannot download MLflow model {uri} from {tracking_uri}: {err}") from err
            if not (folder / "config.json").is_file():
                raise ModelNotFound(
                    f"{uri} holds no Hugging Face model (pyfunc artifact {HF_ARTIFACT!r}); log it with "
                    f'mlflow.pyfunc.log_model(..., artifacts={{"{HF_ARTIFACT}": <export folder>}})'
                )
            return _load_hf_folder(str(folder))
    if uri.startswith(PRESET_SCHEME):
        from model import build_model, build_processor, load_preset

        try:
            config = load_preset(uri.removeprefix(PRESET_SCHEME))
        except (FileNotFoundError, ValueError) as err:
            raise ModelNotFound(f"{uri}: {err}") from err
        return build_model(config).eval(), build_processor(config)
    if is_export(uri):
        model, processor = load_export(uri)
        return model.eval(), processor
    if storage.exists(storage.join(uri, "config.json")):
        with tempfile.TemporaryDirectory(prefix="hovle-model-") as scratch:
            return _load_hf_folder(local_copy(uri, scratch))
    raise ModelNotFound(
        f"no model at {uri}: expected a stage export (export.json), a save_pretrained folder (config.json), "
        "or an MLflow model URI (runs:/..., models:/name@alias, models:/name/version)"
    )


Chat = tuple[list[dict[str, str]], list[Image.Image]]  # messages ({"role", "content"}), their images


@torch.inference_mode()
def generate_answers(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    chats: list[Chat],
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy replies to `chats` (one `<image>` per image in the messages), as one left-padded batch."""
    batch = processor.collate(
        [
            processor(messages, images=images or None, add_generation_prompt=True)
            for messages, images in chats
        ],
        padding_side="left",
    )
    pixel_values = batch["pixel_values"]
    out = model.generate(
        input_ids=batch["input_ids"].to(model.device),
        attention_mask=batch["attention_mask"].to(model.device),
        pixel_values=None if pixel_values is None else pixel_values.to(model.device, model.dtype),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return [processor.decode(row[batch["input_ids"].shape[1] :]).strip() for row in out]


# ---- VQA accuracy ------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """`text` lowercased, surrounding whitespace and punctuation stripped, spaces collapsed, number words
    "zero".."ten" as digits: " Three. " -> "3"."""
    words = text.lower().strip(string.punctuation + string.whitespace).split()
    return " ".join(NUMBER_WORDS.get(word, word) for word in words)


@dataclass
class RecordResult:
    """One evaluated record; `given` is model output (untrusted text)."""

    id: str
    skill: str | None
    question: str
    expected: str
    given: str
    correct: bool


@dataclass
class VqaReport:
    """Results of the evaluated records, the count of skipped ones, thumbnails of the first few (gallery)."""

    results: list[RecordResult] = field(default_factory=list)
    skipped: int = 0
    thumbnails: list[list[str]] = field(default_factory=list)  # base64 PNGs, aligned with results[:50]

    def metrics(self) -> dict[str, float]:
        """`vqa_accuracy`, `vqa_accuracy/<skill>`, `vqa_samples`, `vqa_skipped`."""
        metrics = {"vqa_accuracy": _accuracy(self.results)}
        for skill in sorted({r.skill for r in self.results if r.skill}):
            metrics[f"vqa_accuracy/{skill}"] = _accuracy([r for r in self.results if r.skill == skill])
        return {**metrics, "vqa_samples": float(len(self.results)), "vqa_skipped": float(self.skipped)}


def _accuracy(results: list[RecordResult]) -> float:
    return sum(r.correct for r in results) / len(results) if results else 0.0


@dataclass
class VqaPrompt:
    id: str
    skill: str | None
    messages: list[dict[str, str]]
    images: list[Image.Image]
    question: str
    expected: str


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "://" in uri else os.path.dirname(os.path.abspath(uri))


def _read_image(uri: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
            return image.convert("RGB")
    except (OSError, Image.DecompressionBombError) as err:  # missing, truncated, not an image, too large
        raise UnusableRecord(f"image {uri}: {type(err).__name__}: {err}") from err


def parse_record(line: str, root: str) -> VqaPrompt:
    """A JSONL line -> the chat up to its last human turn, its images (paths relative to `root`), its answer.

    Raises:
        UnusableRecord: bad JSON, no human turn, no answer, a missing or unreadable image, or a different
            number of `<image>` placeholders than images.
    """
    try:
        record = json.loads(line)
        turns = record["conversations"]
        last = max(i for i, turn in enumerate(turns) if turn["from"] == "human")
        messages = [{"role": ROLES[turn["from"]], "content": turn["value"]} for turn in turns[: last + 1]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise UnusableRecord(
            f"not a conversation record with a human turn ({type(err).__name__}: {err})"
        ) from err
    expected = record.get("answer")
    if expected is None and last + 1 < len(turns):
        expected = turns[last + 1]["value"]  # no "answer" field: the reply that followed in the data
    if not isinstance(expected, str):
        raise UnusableRecord("no answer: neither an 'answer' field nor a reply to the last question")
    refs = record.get("image") or []
    images = [_read_image(storage.join(root, ref)) for ref in ([refs] if isinstance(refs, str) else refs)]
    placeholders = sum(message["content"].count(IMAGE_PLACEHOLDER) for message in messages)
    if placeholders != len(images):
        raise UnusableRecord(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
    skill = record.get("skill")
    skill = skill if isinstance(skill, str) else None
    return VqaPrompt(str(record.get("id", "")), skill, messages, images, messages[-1]["content"], expected)


def _thumbnail(image: Image.Image) -> str:
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def read_lines(uri: str, what: str) -> list[str]:
    """The non-empty lines of a text file at `uri`. Raises DataNotFound when it is not there."""
    if not storage.exists(uri):
        raise DataNotFound(f"{what} file {uri} not found")
    return [line for line in storage.read_text(uri).splitlines() if line.strip()]


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
    root, report = _parent(data), VqaReport()
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
            correct = normalize_answer(given) == normalize_answer(prompt.expected)
            report.results.append(
                RecordResult(prompt.id, prompt.skill, prompt.question, prompt.expected, given, correct)
            )
            if len(report.thumbnails) < GALLERY_MAX_RECORDS:
                report.thumbnails.append([_thumbnail(image) for image in prompt.images])
        done = len(report.results)
        if done // progress_every != (done - len(batch)) // progress_every or done == len(prompts):
            accuracy = _accuracy(report.results)
            logger.info(
                "vqa %d/%d records, accuracy %.3f, skipped %d", done, len(prompts), accuracy, report.skipped
            )
    if not report.results:
        raise DataNotFound(
            f"none of the {len(lines)} records of {data} could be evaluated ({report.skipped} skipped; "
            "see the warnings): check the file's format and that image paths are relative to its folder"
        )
    return report


# ---- language preservation ---------------------------------------------------------------------------


@torch.inference_mode()
def perplexity(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    texts: list[str],
    max_tokens: int = TEXT_MAX_TOKENS,
) -> float:
    """exp(mean next-token loss over all predicted tokens) of `texts`, each cut to `max_tokens` tokens."""
    total_loss, total_tokens = 0.0, 0
    for text in texts:
        encoded = processor.tokenizer(text, truncation=True, max_length=max_tokens, return_tensors="pt")
        ids = encoded["input_ids"].to(model.device)
        if ids.shape[1] < 2:
            continue  # nothing to predict
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        total_loss += loss.item() * (ids.shape[1] - 1)
        total_tokens += ids.shape[1] - 1
    if not total_tokens:
        raise DataNotFound("the text file holds no text of two or more tokens to compute a perplexity on")
    return math.exp(total_loss / total_tokens)


def preservation(
    model: HoVLEForConditionalGeneration,
    processor: HoVLEProcessor,
    base,
    texts: list[str] | None = None,
    questions: list | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics, per-question records) against the base (a `jobs.language.BaseReference`): the
    general-language metrics of jobs.language (`text_retained`, `text_agreement`, `answer_ppl_ratio`, ...)
    on `questions` (default: the package's keyed general questions), and with `texts` also `text_ppl`,
    `base_text_ppl` and `ppl_ratio` (text_ppl / base_text_ppl on held-out text: reported, never gated)."""
    from jobs.language import language_preservation

    metrics, records = language_preservation(model, processor, base, questions)
    if texts:
        ppl, base_ppl = perplexity(model, processor, texts), base.perplexity(texts)
        metrics.update(text_ppl=ppl, base_text_ppl=base_ppl, ppl_ratio=ppl / base_ppl)
    else:
        logger.info("no --text given: perplexity against the base is not measured")
    return metrics, records


def read_texts(uri: str) -> list[str]:
    """The `text` of each `{"id", "text"}` line of a JSONL (what `hovle synth --stage distill` writes)."""
    texts = []
    for n, line in enumerate(read_lines(uri, "text"), 1):
        try:
            texts.append(str(json.loads(line)["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            logger.warning("skipping line %d of %s: no 'text' (%s)", n, uri, err)
    return texts


# ---- gallery and tracking ----------------------------------------------------------------------------


def render_gallery(report: VqaReport, title: str = "HoVLE evaluation") -> str:
    """An HTML page of the first records (images inline); every text is escaped (answers are model output)."""
    rows = []
    for result, thumbnails in zip(report.results, report.thumbnails):
        images = "".join(f'<img src="data:image/png;base64,{t}" alt="">' for t in thumbnails)
        mark = '<td class="ok">✓</td>' if result.correct else '<td class="bad">✗</td>'
        cells = (result.id, result.skill or "", result.question, result.expected, result.given)
        text = "".join(f"<td>{html.escape(value)}</td>" for value in cells)
        rows.append(f"<tr><td>{images}</td>{text}{mark}</tr>")
    accuracy = report.metrics()["vqa_accuracy"]
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>'
        "body{font-family:sans-serif} td{border-top:1px solid #ccc;padding:4px;vertical-align:top;"
        "white-space:pre-wrap} img{margin:2px} .ok{color:green} .bad{color:red}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>accuracy {accuracy:.3f} on {len(report.results)} records "
        f"({report.skipped} skipped); the first {len(rows)} shown</p><table><tr><th>image</th><th>id</th>"
        f"<th>skill</th><th>question</th><th>expected</th><th>given</th><th></th></tr>{''.join(rows)}"
        "</table></body></html>\n"
    )


def tracking_uri_from(arg: str | None) -> str:
    """`--tracking-uri`, else MLFLOW_TRACKING_URI, else a SQLite file in the working folder (absolute)."""
    return arg or default_tracking_uri()


def log_to_mlflow(
    client: Any, run_id: str, params: dict[str, Any], metrics: dict[str, float], files: list[Path]
) -> None:
    """Params, metrics (step 0) and files as artifacts into the run `run_id`."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.utils.time import get_current_time_millis

    try:
        log_params(client, run_id, params)
    except MlflowException as err:  # an existing run evaluated again with other inputs keeps its first params
        logger.warning("MLflow run %s already has other params; keeping them (%s)", run_id, err.message)
    now = get_current_time_millis()
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])
    for path in files:
        client.log_artifact(run_id, str(path))


# ---- the job -----------------------------------------------------------------------------------------


def _image_check(model, processor, data: str, images: int = 16) -> dict[str, float]:
    """`jobs.vision_check` on the images of the first records of `data` (none when it has fewer than two)."""
    found: list[Image.Image] = []
    for line in read_lines(data, "data"):
        try:
            found += parse_record(line, _parent(data)).images
        except UnusableRecord:
            continue
        if len(found) >= images:
            break
    return image_token_spread(model, processor, found[:images]) if len(found) >= 2 else {}


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


def evaluate(args: argparse.Namespace, output: Path) -> dict[str, Any]:
    """Run the whole evaluation the parsed `args` describe; write the gallery and results into `output`.

    Returns the summary (metrics, `run_id`). Raises ModelNotFound, DataNotFound or RunNotFound, before
    any model is evaluated where it can.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking_uri = tracking_uri_from(args.tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    if args.run_id:
        try:
            client.get_run(args.run_id)  # fails now, not after the evaluation
        except MlflowException as err:
            raise RunNotFound(f"MLflow run {args.run_id} not found at {tracking_uri}: {err.message}") from err
    inputs = ((args.data, "data"), (args.text, "text"), (args.language_questions, "language questions"))
    for uri, what in inputs:
        if uri and not storage.exists(uri):
            raise DataNotFound(f"{what} file {uri} not found")
    questions = None
    if args.language_questions:
        from pipelines.general_text import parse_keyed_questions

        try:
            questions = parse_keyed_questions(read_lines(args.language_questions, "language questions"))
        except ValueError as err:
            raise DataNotFound(f"language questions {args.language_questions}: {err}") from err

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = resolve_model(args.model, tracking_uri)
    model.to(device)
    if args.base:
        from jobs.language import BaseReference

        base = BaseReference.from_uri(args.base, tracking_uri, device)
        if base.key is None:
            base.loaded()  # fails now, not after the evaluation
    else:
        base = None
    logger.info("evaluating %s on %s (max %s records)", args.model, args.data, args.max_samples or "all")
    report = evaluate_vqa(model, processor, args.data, args.max_samples, args.max_new_tokens)
    metrics = report.metrics()
    metrics.update(_image_check(model, processor, args.data))
    language: list[dict] = []
    if base is None:
        logger.info("no --base model given: language preservation not measured (the gate refuses it)")
    else:
        texts = read_texts(args.text) if args.text else None
        found, language = preservation(model, processor, base, texts, questions)
        metrics.update(found)

    output.mkdir(parents=True, exist_ok=True)
    files = [output / "gallery.html", output / "eval_results.json"]
    files[0].write_text(render_gallery(report, f"HoVLE evaluation of {args.model}"), encoding="utf-8")
    results = {"metrics": metrics, "records": [asdict(r) for r in report.results], "language": language}
    files[1].write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")

    run_id = args.run_id
    if run_id is None:
        found = client.get_experiment_by_name(args.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(args.experiment)
        run_id = client.create_run(
            experiment_id, run_name="evaluate", tags={KIND_TAG: "evaluate"}
        ).info.run_id
    params = {"model": args.model, "data": args.data, "base": args.base or ""}
    log_to_mlflow(client, run_id, {**params, "max_samples": args.max_samples or "all"}, metrics, files)
    if not args.run_id:
        client.set_terminated(run_id)  # a given run belongs to its creator, who closes it
    logger.info("vqa accuracy %.3f -> MLflow run %s at %s", metrics["vqa_accuracy"], run_id, tracking_uri)
    return {**metrics, "run_id": run_id}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="hovle-evaluate-") as scratch:
            summary = evaluate(args, args.output or Path(scratch))
    except (ModelNotFound, DataNotFound, RunNotFound) as err:
        print(f"hovle evaluate: {err}", file=sys.stderr)
        return USAGE_ERROR
    summary["output"] = str(args.output) if args.output else None
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
