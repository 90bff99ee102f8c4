"""`hovle synth --stage {distill,align,instruct} --n N --seed S --output DIR`: a corpus with ground truth.

Sources: `shapes` (Pillow-drawn coloured shapes and rendered words, the default), `fashion-mnist` and
`emoji` (real images from Debian packages). The same arguments write byte-identical files; another seed
writes a held-out set, and `--phrasing heldout` asks its questions in words training never uses (instruct
only). `--skills colour shape count` (shapes only) asks those skills in turn: 300 records hold 100 of each.
The last line of stdout is one JSON object: {"output": JSONL path, "records": n, "images": count,
"stage": ..., "source": ..., "phrasing": ...}, plus "text" (the text.jsonl path) for distill.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from jobs.cli import FAILED, USAGE_ERROR, positive_int, run_command
from jobs.logging_setup import setup_logging
from model.stages import STAGE_NAMES
from pipelines.corpora.corpus import PHRASINGS
from pipelines.corpora.scenes import MissingPackageError
from pipelines.corpora.synthetic import INSTRUCT_SKILLS

log = logging.getLogger(__name__)

SOURCES = ("shapes", "fashion-mnist", "emoji")
DEFAULT_IMAGE_SIZE = {"shapes": 224, "fashion-mnist": 112, "emoji": 112}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hovle synth", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stage", choices=STAGE_NAMES, required=True, help="the HoVLE stage the corpus is for"
    )
    parser.add_argument("--n", type=positive_int, required=True, help="number of records")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0); evaluate on another")
    parser.add_argument("--output", type=Path, required=True, help="folder for data.jsonl and images/")
    parser.add_argument("--source", choices=SOURCES, default="shapes", help="what to draw (default shapes)")
    size, split = "image side in pixels (default per source)", "Fashion-MNIST split (default train)"
    parser.add_argument("--image-size", type=positive_int, default=None, help=size)
    parser.add_argument("--split", choices=("train", "test"), default="train", help=split)
    phrasing = "question wording: train (default) or heldout, paraphrases training never uses (instruct only)"
    parser.add_argument("--phrasing", choices=PHRASINGS, default="train", help=phrasing)
    skills = "shapes instruct only: ask these skills in turn, e.g. `colour shape count` (default: at random)"
    parser.add_argument("--skills", nargs="+", choices=INSTRUCT_SKILLS, default=None, help=skills)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def write(args: argparse.Namespace) -> Path:
    """Write the corpus the parsed arguments describe; returns its JSONL path."""
    image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.source]
    if args.source == "shapes":
        from pipelines.corpora.synthetic import generate

        return generate(args.stage, args.n, args.seed, args.output, image_size, args.phrasing, args.skills)
    if args.skills:
        raise ValueError(f"--skills chooses among the shapes source's skills, not {args.source}'s")
    from pipelines.corpora.emoji import import_emoji
    from pipelines.corpora.fashion_mnist import import_fashion_mnist

    if args.source == "fashion-mnist":
        return import_fashion_mnist(
            args.output, args.n, args.seed, args.split, args.stage, image_size, args.phrasing
        )
    return import_emoji(args.output, args.n, args.seed, args.stage, image_size, args.phrasing)


def count_records_and_images(jsonl: Path) -> tuple[int, int]:
    """(records, distinct image files referenced) of a conversation JSONL."""
    records, images = 0, set()
    with jsonl.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            records += 1
            refs = record.get("image", [])
            images.update([refs] if isinstance(refs, str) else refs)
    return records, len(images)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        jsonl = write(args)
        records, images = count_records_and_images(jsonl)
        summary = {"output": str(jsonl), "records": records, "images": images}
        summary |= {"stage": args.stage, "source": args.source, "phrasing": args.phrasing}
        text = jsonl.with_name("text.jsonl")
        if args.stage == "distill" and text.is_file():
            summary["text"] = str(text)  # the unpaired text corpus beside the images
        print(json.dumps(summary))
        return 0

    # a missing package fails (1); a bad size, a request larger than the dataset, an option the stage
    # lacks is a usage error (2)
    return run_command("hovle synth", body, {MissingPackageError: FAILED, ValueError: USAGE_ERROR})


if __name__ == "__main__":
    sys.exit(main())
