"""The reproduction's data (benchmarks/reproduce.py): the demo's corpora and prepared datasets, made once
per workdir, and one held-out set for every row: the demo's shapes questions (new images, phrasings training
never uses, `heldout` per skill) and as many Fashion-MNIST class questions on test-split photos."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jobs.cycle import prepare_cycle
from jobs.demo import PLANS, Corpora, make_corpora, merge_jsonl, run_config
from jobs.run_config import load_run_config

SKILLS = ("colour", "shape", "count")


def reproduction_plan(preset: str, heldout: int, samples: int | None) -> dict[str, Any]:
    """The demo's plan for `preset`, asking the three skills, `heldout` held-out questions per skill."""
    plan = copy.deepcopy(PLANS[preset])
    plan.update(heldout=heldout, skills=SKILLS)
    if samples:
        plan["samples"] = samples
    return plan


def corpora_and_data(preset: str, plan: dict[str, Any], root: Path, seed: int) -> tuple[Corpora, dict, Path]:
    """(corpora, prepared datasets, HoVLE config) made once under root; a rerun reads them back."""
    record = root / "corpora.json"
    root.mkdir(parents=True, exist_ok=True)
    config = run_config(preset, plan, root, None, seed, run_name="repro-data")
    if not record.is_file():
        started = time.perf_counter()
        corpora = make_corpora(plan, root, plan["samples"], seed)
        corpora.heldout, corpora.heldout_count = heldout_set(corpora, plan, root / "heldout", seed)
        reports = prepare_cycle(load_run_config(str(config)), corpora.raw, str(root / "prepared"))
        datasets = {stage: report["output"] for stage, report in reports.items()}
        saved = {**asdict(corpora), "heldout": str(corpora.heldout), "text": str(corpora.text)}
        seconds = time.perf_counter() - started
        record.write_text(json.dumps({"corpora": saved, "datasets": datasets, "seconds": seconds}, indent=2))
    saved = json.loads(record.read_text())
    corpora = Corpora(**saved["corpora"])
    corpora.heldout, corpora.text = Path(corpora.heldout), Path(corpora.text)
    return corpora, saved["datasets"], config


def heldout_set(corpora: Corpora, plan: dict[str, Any], folder: Path, seed: int) -> tuple[Path, int]:
    """The demo's held-out shapes questions (`plan["heldout"]` per skill, new images, held-out phrasings)
    and, where Fashion-MNIST is installed, as many class questions on its test photos ("which garment is
    this?", held-out phrasings): folder/reproduce.jsonl and its record count."""
    from pipelines.corpora.fashion_mnist import import_fashion_mnist

    parts = [folder / "shapes" / "data.jsonl"]
    if corpora.real:  # the importer asks several kinds of question: draw until enough ask the class
        wanted, drawn = plan["heldout"], 4 * plan["heldout"]
        while True:
            jsonl = import_fashion_mnist(
                folder / "fashion-all", drawn, seed, "test", "instruct", plan["image_size"], "heldout"
            )
            records = [r for r in jsonl.read_text().splitlines() if json.loads(r).get("skill") == "class"]
            if len(records) >= wanted or drawn >= 10_000:
                break
            drawn *= 2
        parts.append(jsonl.with_name("class.jsonl"))
        parts[-1].write_text("".join(r + "\n" for r in records[:wanted]))
    output = folder / "reproduce.jsonl"
    return output, merge_jsonl(parts, output)
