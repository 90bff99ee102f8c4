"""Language preservation: the keyed general questions, the training conversations, the metrics, the gate.

Tiny random models stand in for a real LLM (they answer nothing right, so `text_retained` is undefined for
them); the answer-likelihood and agreement metrics need no keys and are exercised on them.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml

import jobs.evaluate as ev
from jobs.export import write_export
from jobs.language import BaseReference, answers_key, ask, language_preservation
from jobs.models import PRESET_SCHEME, resolve_model
from jobs.run_config import EvalSettings
from model.config_files import find_preset
from pipelines.corpora.synthetic import generate
from pipelines.general_text import (
    KeyedQuestion,
    general_chat_records,
    general_prompts,
    language_eval_questions,
    write_general_chat,
)
from tests.helpers import tiny_model


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def test_an_answer_is_right_when_a_key_appears_as_whole_words():
    assert answers_key("The capital of France is Paris.", ("paris",))
    assert answers_key("It was written by William Shakespeare", ("shakespeare",))
    assert answers_key("There are seven days in a week.", ("7",))  # number words count as digits
    assert answers_key("The blue whale.", ("blue whale", "whale"))
    assert not answers_key("There are 12 months.", ("2",))  # "2" is not a word of "12"
    assert not answers_key("Parisian food is good", ("paris",))
    assert not answers_key("", ("paris",))


def test_the_evaluation_set_has_at_least_50_keyed_questions_none_of_them_in_the_training_mix():
    questions = language_eval_questions()
    assert len(questions) >= 50
    assert len({q.id for q in questions}) == len({q.question for q in questions}) == len(questions)
    assert all(q.keys and all(_norm(k) for k in q.keys) for q in questions)

    records = general_chat_records()
    training_text = [_norm(turn["value"]) for r in records for turn in r["conversations"]]
    training_text += [_norm(p) for p in general_prompts()]
    for q in questions:
        asked = _norm(q.question)
        assert all(asked not in text for text in training_text), q.question


def test_the_training_conversations_are_text_only_base_answers_to_the_package_prompts():
    records = general_chat_records()
    prompts = set(general_prompts())
    assert len(records) >= 50
    for record in records:
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        assert human["value"] in prompts and "<image>" not in human["value"]
        assert gpt["value"].strip() and gpt["value"] == record["answer"]
        assert "image" not in record and record["skill"] == "general_text"


def test_write_general_chat_writes_a_prefix_for_prepare(tmp_path):
    path = write_general_chat(tmp_path / "general", 5)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == general_chat_records()[:5]


def _echo_questions(model, processor) -> list[KeyedQuestion]:
    """Keyed questions a random tiny base answers right by construction: each key is a word of the base's own
    answer (questions whose answer has no word are left out)."""
    from jobs.language import answer_words, ask

    prompts = [q.question for q in language_eval_questions()]
    questions = []
    for n, (prompt, answer) in enumerate(zip(prompts, ask(model, processor, prompts, 12))):
        words = answer_words(answer)
        if words:
            questions.append(KeyedQuestion(f"echo-{n}", prompt, (words[0],)))
    return questions


def test_the_metrics_are_exact_against_the_base_and_drop_for_a_model_whose_llm_was_overwritten():
    base, processor = tiny_model(seed=0, init_std=0.5)
    base.eval()
    questions = _echo_questions(base, processor)
    assert len(questions) >= 10  # enough answers with a word to judge by
    same, records = language_preservation(
        base, processor, BaseReference.of(base, processor), questions, max_new_tokens=12
    )
    assert same["text_retained"] == 1.0 and same["base_text_accuracy"] == 1.0
    assert same["text_agreement"] == 1.0 and same["answer_ppl_ratio"] == pytest.approx(1.0)
    assert all(r["correct"] and r["base_correct"] for r in records)

    wrecked, _ = tiny_model(seed=0, init_std=0.5)
    _overwrite_llm(wrecked, processor, ["red square blue circle green star"] * 4)
    lost, _ = language_preservation(
        wrecked.eval(), processor, BaseReference.of(base, processor), questions, max_new_tokens=12
    )
    assert lost["text_retained"] < 0.9 and lost["text_agreement"] < 0.9


def test_text_retained_is_undefined_when_the_base_answers_nothing_right():
    base, processor = tiny_model(seed=0, init_std=0.5)
    unanswerable = [KeyedQuestion("q", "What is the capital of France?", ("zzzzzz",))]
    metrics, _ = language_preservation(
        base.eval(), processor, BaseReference.of(base, processor), unanswerable, max_new_tokens=4
    )
    assert math.isnan(metrics["text_retained"]) and metrics["base_text_accuracy"] == 0.0


def _overwrite_llm(model, processor, texts: list[str], steps: int = 40) -> None:
    """Fit the LLM to `texts` (the training domain's own words) until it forgets the rest: what the broken
    December demo did to SmolLM2. Lowers the domain perplexity; loses the base's answers."""
    ids = processor.tokenizer(texts, return_tensors="pt", padding=True)["input_ids"]
    optimizer = torch.optim.Adam(model.language_model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.slow
def test_a_wrecked_model_that_beats_the_champion_on_skills_and_domain_perplexity_is_not_crowned(tmp_path):
    """Real evaluations (jobs.evaluate), a real MLflow registry and the gate with its default language
    bounds. The wrecked model's LLM was fitted to the domain's text: its domain perplexity is far better
    than the champion's and its VQA score is no worse, so only the language check can refuse it. A tiny
    random base knows no general facts, so the keyed questions are keyed by its own answers
    (`--language-questions`), and the VQA floor is lowered (it has no skills either)."""
    from mlflow import MlflowClient

    from jobs.registry import CHAMPION, GateSettings, log_hovle_model, promote, register

    heldout = generate("instruct", 4, seed=3, output_dir=tmp_path / "heldout", image_size=56)
    domain = generate("distill", 6, seed=3, output_dir=tmp_path / "domain", image_size=56)
    domain_text = domain.with_name("text.jsonl")
    texts = ev.read_texts(str(domain_text))

    base, processor = tiny_model(seed=0, init_std=0.5)
    keyed = tmp_path / "language.jsonl"
    keyed.write_text(
        "".join(
            json.dumps({"id": q.id, "question": q.question, "keys": list(q.keys)}) + "\n"
            for q in _echo_questions(base.eval(), processor)
        )
    )
    exports = {}
    for name in ("base", "champion", "wrecked"):
        model, _ = tiny_model(seed=0, init_std=0.5)
        if name == "wrecked":
            _overwrite_llm(model, processor, texts)
        exports[name] = tmp_path / name
        write_export(model.eval(), processor, model.state_dict(), str(exports[name]), {"stage": "instruct"})

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("wrecked", artifact_location=str(tmp_path / "artifacts"))
    gate = GateSettings(name="hovle-wrecked", floor=0.0)
    scores = {}
    for name in ("champion", "wrecked"):
        run_id = client.create_run(experiment).info.run_id
        settings = EvalSettings(
            data=str(heldout), text=str(domain_text), base=str(exports["base"]), max_new_tokens=4,
            language_questions=str(keyed),
        )  # fmt: skip
        summary = ev.run_evaluation(str(exports[name]), settings, uri, run_id, tmp_path / f"eval-{name}")
        scores[name] = {k: v for k, v in summary.items() if isinstance(v, float)}
        version = register(log_hovle_model(str(exports[name]), run_id, uri), gate.name, {}, scores[name], uri)
        decision = promote(client, gate.name, version, gate)
        if name == "champion":
            assert decision.champion, decision.reason

    champion, wrecked = scores["champion"], scores["wrecked"]
    assert wrecked["ppl_ratio"] < 0.5 * champion["ppl_ratio"]  # far "better" on the domain's own text
    assert wrecked["vqa_accuracy"] >= champion["vqa_accuracy"]  # and no worse on the skills
    assert champion["text_retained"] == 1.0 and wrecked["text_retained"] < 0.9
    assert not decision.champion and decision.reason.startswith("language preservation: text_retained")
    assert str(client.get_model_version_by_alias(gate.name, CHAMPION).version) == "1"


def test_a_preset_base_is_answered_once_then_read_from_the_cache_until_its_weights_change(
    tmp_path, monkeypatch
):
    """The base's answers and likelihoods are computed by loading it once; a second reference reads them from
    `$HOVLE_CACHE_DIR/language` without loading anything, and new weight files make a new entry."""
    monkeypatch.setenv("HOVLE_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "llm"
    tiny_model(seed=0, init_std=0.5)[0].language_model.save_pretrained(weights)
    document = yaml.safe_load(find_preset("tiny").read_text())
    document["model"]["llm"] = {"path": str(weights), "tokenizer": "byte"}
    preset = tmp_path / "saved.yaml"
    preset.write_text(yaml.safe_dump(document))
    uri = f"{PRESET_SCHEME}{preset}"
    prompts = ["What is the capital of France?", "Name a colour."]

    first = BaseReference.from_uri(uri)
    answers = first.answers(prompts, 6)
    nll = first.answer_nll(list(zip(prompts, answers, strict=True)))
    assert first.key is not None and first.is_loaded
    assert answers == ask(*resolve_model(uri), prompts, 6)  # what the base itself answers

    second = BaseReference.from_uri(uri)
    assert second.answers(prompts, 6) == answers
    assert second.answer_nll(list(zip(prompts, answers, strict=True))) == nll
    assert not second.is_loaded  # both came from the cache
    assert second.answers(prompts[:1], 6) == answers[:1] and second.is_loaded  # other inputs: computed

    tiny_model(seed=1, init_std=0.5)[0].language_model.save_pretrained(weights)  # other weights, same path
    changed = BaseReference.from_uri(uri)
    assert changed.key != first.key
    assert changed.answers(prompts, 6) == ask(*resolve_model(uri), prompts, 6) and changed.is_loaded


def test_a_base_without_weight_files_is_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HOVLE_CACHE_DIR", str(tmp_path / "cache"))
    assert BaseReference.from_uri(f"{PRESET_SCHEME}tiny").key is None  # a randomly initialised LLM
    monkeypatch.setenv("HOVLE_CACHE_DIR", "off")
    assert BaseReference.from_uri(f"{PRESET_SCHEME}smollm2-135m").key is None
