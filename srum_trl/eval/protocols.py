"""Benchmark protocols: how the images of a prompt file are scored, and in which categories.

Every protocol reads prompt records (`{"prompt", ...}`: a .txt line, or a .json / .jsonl record with more fields) and
scores each image with one number (NaN where the protocol does not apply), grouped by category:

- `shapes`: ShapesWorld's exact scorer, 1 if correct, per grammar category (single, pair, spatial, counting);
- `geneval`: GenEval's rules on a zero-shot detector (records carry GenEval's metadata), 1 if correct, per tag;
  overall is the mean over tags, as in GenEval;
- `compbench`: a multimodal model scores each image 0-100 for its prompt (the SRUM paper's T2I-CompBench protocol:
  a 0-100 alignment rubric answered as JSON, greedy, unparsed answers left out and counted), per record `category`;
  overall is the mean over categories;
- `ocr`: the OCR reward's similarity (1 - normalised edit distance) for prompts with quoted text;
- `clip`: CLIP cosine similarity (or PickScore with a PickScore checkpoint and `--clip_scale pickscore`);
- `judge`: the evaluated model's own judge (the mean reward of its self-judgement).
"""

from __future__ import annotations

import json
import math
import os
import re

PROTOCOLS = ("shapes", "geneval", "compbench", "ocr", "clip", "judge")

#: Overall score: the mean over images, or over category means (GenEval's and T2I-CompBench's convention).
OVERALL = {"shapes": "images", "geneval": "categories", "compbench": "categories", "ocr": "images",
           "clip": "images", "judge": "images"}

#: Default checkpoints of the protocols that use another model (users can name any of the same kind).
DEFAULT_MODELS = {"geneval": "google/owlv2-base-patch16-ensemble", "compbench": "Qwen/Qwen2.5-VL-7B-Instruct",
                  "clip": "openai/clip-vit-large-patch14"}

COMPBENCH_QUESTION = (
    'Rate how well this image matches the text prompt "{prompt}". Look at the objects and their attributes (colour, '
    "shape, texture), their spatial layout and their actions and relations. Score from 0 to 100: 81-100 the image "
    "matches the prompt completely; 61-80 most objects, attributes and relations are right, with small mistakes; "
    "41-60 some elements of the prompt are there but key parts or details are missing; 21-40 the image shows little "
    "of what the prompt describes; 0-20 the image does not convey the prompt. Answer in JSON with the keys "
    '"score" (an integer) and "explanation" (at most 20 words).'
)

_SCORE = re.compile(r'"?score"?\s*[:=]\s*"?(\d+(?:\.\d+)?)')


def parse_compbench_score(text: str) -> float | None:
    """The 0-100 score of a CompBench answer (`"score": 85` in JSON or close to it), None if absent or out of range."""
    match = _SCORE.search(text)
    if not match:
        return None
    value = float(match.group(1))
    return value if 0.0 <= value <= 100.0 else None


def load_records(path: str) -> list[dict]:
    """Prompt records of a file: .txt (one prompt per line), .json (a list of strings or records) or .jsonl."""
    from ..data.prompts import load_prompts

    prompts = load_prompts(path)  # checks the file and every prompt's text
    if path.endswith((".json", ".jsonl")):
        with open(path, encoding="utf-8") as f:
            raw = json.load(f) if path.endswith(".json") else [json.loads(line) for line in f if line.strip()]
        records = [dict(r) if isinstance(r, dict) else {} for r in raw]
    else:
        records = [{} for _ in prompts]
    for record, prompt in zip(records, prompts):
        record["prompt"] = prompt
    return records


class Protocol:
    """Scores images of prompt records. Subclasses set `name` and implement `score`; `category` defaults to the
    record's "category" field, else the prompt file's stem."""

    name = ""

    def __init__(self, options: dict, default_category: str = "all"):
        self.options = options
        self.default_category = default_category

    def category(self, record: dict) -> str:
        return str(record.get("category") or self.default_category)

    def prepare(self, records: list[dict]) -> None:
        """Check the records before anything is generated (raise a ValueError naming the bad one)."""

    def score(self, images, records: list[dict], backend=None) -> list[dict]:
        """One `{"score": float, ...}` per image (NaN: does not apply)."""
        raise NotImplementedError


class ShapesProtocol(Protocol):
    name = "shapes"

    def prepare(self, records):
        from ..shapes.world import parse_prompt

        for i, record in enumerate(records):
            try:
                parse_prompt(record["prompt"])
            except ValueError as err:
                raise ValueError(f"prompt {i} ({record['prompt']!r}) is not a ShapesWorld prompt: {err}") from None

    def category(self, record):
        from ..shapes.world import parse_prompt

        return parse_prompt(record["prompt"]).category

    def score(self, images, records, backend=None):
        from ..shapes.scorer import score

        results = [score(image, r["prompt"]) for image, r in zip(images, records)]
        return [{"score": float(r.correct), "checks": r.checks} for r in results]


class GenEvalProtocol(Protocol):
    name = "geneval"

    def prepare(self, records):
        from ..rewards.geneval import parse_metadata

        for i, record in enumerate(records):
            if "include" not in record and "metadata" not in record:
                raise ValueError(f"record {i} ({record['prompt']!r}) has no GenEval metadata ('include', 'tag', ...): "
                                 "use GenEval's evaluation_metadata.jsonl as the prompt file.")
            parse_metadata(record.get("metadata", record), f"record {i}")
        from ..rewards import GenEvalReward

        o = self.options
        self.reward = GenEvalReward(o.get("reward_model") or DEFAULT_MODELS["geneval"], color_model=o.get("color_model"),
                                    threshold=o.get("threshold"), counting_threshold=o.get("counting_threshold"),
                                    device=o.get("device"))

    def category(self, record):
        return str(record.get("tag") or "unknown")

    def score(self, images, records, backend=None):
        from ..rewards.geneval import parse_metadata

        out = []
        for image, record in zip(images, records):
            result, found = self.reward.evaluate(image, parse_metadata(record.get("metadata", record)))
            out.append({"score": float(result.correct), "reasons": result.reasons,
                        "detections": {k: [[round(v, 1) for v in d.box] for d in ds] for k, ds in found.items()}})
        return out


class CompBenchProtocol(Protocol):
    name = "compbench"

    def prepare(self, records):
        from ..rewards import TransformersJudge

        o = self.options
        self.judge = TransformersJudge(o.get("reward_model") or DEFAULT_MODELS["compbench"], device=o.get("device"),
                                       dtype=o.get("reward_dtype"), batch_size=o.get("reward_batch_size", 4))

    def score(self, images, records, backend=None):
        questions = [COMPBENCH_QUESTION.format(prompt=r["prompt"]) for r in records]
        answers = self.judge.answer(images, questions, max_new_tokens=self.options.get("max_new_tokens", 128))
        out = []
        for answer in answers:
            value = parse_compbench_score(answer)
            out.append({"score": math.nan if value is None else value, "answer": answer.strip()})
        return out


class OCRProtocol(Protocol):
    name = "ocr"

    def prepare(self, records):
        from ..rewards import OCRReward
        from ..rewards.ocr import quoted_text

        if not any(quoted_text(r["prompt"]) for r in records):
            raise ValueError("no prompt of the file quotes a text to render (\"...\"): the ocr protocol has nothing "
                             "to score.")
        self.reward = OCRReward()

    def score(self, images, records, backend=None):
        return [{"score": v} for v in self.reward([r["prompt"] for r in records], images)]


class CLIPProtocol(Protocol):
    name = "clip"

    def prepare(self, records):
        from ..rewards import CLIPScoreReward

        o = self.options
        self.reward = CLIPScoreReward(o.get("reward_model") or DEFAULT_MODELS["clip"],
                                      processor=o.get("reward_processor"), scale=o.get("clip_scale", "cosine"),
                                      device=o.get("device"))

    def score(self, images, records, backend=None):
        return [{"score": v} for v in self.reward([r["prompt"] for r in records], images)]


class JudgeProtocol(Protocol):
    name = "judge"

    def score(self, images, records, backend=None):
        from ..rewards import UMMJudgeRewardFunction

        o = self.options
        judge = UMMJudgeRewardFunction(backend, mode=o.get("judge_mode", "logits"),
                                       region_proposer=o.get("region_proposer", "grid"),
                                       region_grid=o.get("region_grid", 2), map_rule=o.get("map_rule", "srum"))
        maps = judge.judge(images, [r["prompt"] for r in records])
        return [{"score": judge.scalar(m), "token_weight": float(m.token_map.mean())} for m in maps]


def build_protocol(name: str, options: dict, prompt_file: str) -> Protocol:
    classes = {c.name: c for c in (ShapesProtocol, GenEvalProtocol, CompBenchProtocol, OCRProtocol, CLIPProtocol,
                                   JudgeProtocol)}
    if name not in classes:
        raise ValueError(f"--protocol must be one of {PROTOCOLS}, got {name!r}.")
    stem = os.path.splitext(os.path.basename(prompt_file))[0]
    return classes[name](options, default_category=stem)
