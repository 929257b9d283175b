"""GenEval-style rules (object present, count, colour, relative position) on the detections of any transformers
zero-shot object detector (OWLv2, OWL-ViT, Grounding DINO, ...), for prompts that carry GenEval's metadata.

GenEval's metadata (one JSON record per prompt, `evaluation_metadata.jsonl` of the benchmark):

    {"tag": "position", "prompt": "a photo of a dog right of a cup",
     "include": [{"class": "cup", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}

`include` clauses must all hold: at least `count` objects of `class` (the `count` most confident ones are the
clause's objects), all of colour `color` when given, and each in relation `position[0]` ("left of", "right of",
"above", "below") to every object of include clause `position[1]`. `exclude` clauses must all fail: fewer than
`count` objects of `class` (counting prompts exclude `count + 1`). Tags: single_object, two_object, counting, colors,
position, color_attr; GenEval's score is the accuracy per tag, and overall the mean over tags.

Relations follow GenEval: centres are compared after shrinking their offset by `position_threshold` times the sum of
the two boxes' sizes (per axis); a relation holds when the remaining offset, as a share of the full offset's length,
exceeds 0.5 in its direction (so a diagonal placement can hold two relations). Colours are classified like GenEval,
by CLIP zero-shot on the object's crop among 10 colours (GenEval also masks the background with the detector's
segmentation; box detectors have none, so the crop is used as it is).

Differences from GenEval's own detector (Mask2Former on COCO classes): any class name can be queried, and the score
thresholds must suit the detector: by default each family's own post-processing threshold (0.1 for OWL models, 0.25
for Grounding DINO), for counting prompts too, with greedy non-maximum suppression at IoU 0.5 (zero-shot detectors
return near-duplicate boxes; GenEval's Mask2Former ran without it). Calibrate them on labelled images of your domain.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ._loading import as_rgb_images, check_prompts, load_checkpoint, model_device

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
#: GenEval's colour prompts for CLIP zero-shot classification of an object's colour (`{}` is the colour).
COLOR_TEMPLATES = ("a photo of a {{}} {cls}", "a photo of a {{}}-colored {cls}", "a photo of a {{}} object")
#: Each detector family's own post-processing threshold, the default of [`GenEvalReward`].
DEFAULT_THRESHOLDS = {"owlv2": 0.1, "owlvit": 0.1, "grounding-dino": 0.25, "mm-grounding-dino": 0.25,
                      "omdet-turbo": 0.3}


@dataclass
class Detection:
    """One detected object: `box` is (x0, y0, x1, y1) in pixels; `color` is filled by colour classification."""

    label: str
    score: float
    box: tuple[float, float, float, float]
    color: str | None = None


@dataclass
class GenEvalResult:
    """The verdict on one image: `correct` iff every clause holds; `clauses` lists (clause, held) in order;
    `reasons` says why each failed clause failed."""

    correct: bool
    clauses: list[tuple[str, bool]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Share of clauses that hold (1.0 for a metadata record without clauses)."""
        return sum(ok for _, ok in self.clauses) / len(self.clauses) if self.clauses else 1.0


def parse_metadata(record, where: str = "metadata") -> dict:
    """A GenEval metadata record (dict or JSON string) checked and normalised: `tag`, `include`, `exclude`, `prompt`.
    Raises a `ValueError` naming `where` and the field when the record does not have GenEval's structure."""
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err}).") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be a dict with GenEval's fields (tag, include, ...), got {type(record).__name__}.")
    include, exclude = record.get("include", []), record.get("exclude", []) or []
    if not isinstance(include, list) or not include:
        raise ValueError(f"{where}['include'] must be a non-empty list of {{'class', 'count'}} clauses.")
    if not isinstance(exclude, list):
        raise ValueError(f"{where}['exclude'] must be a list of {{'class', 'count'}} clauses.")
    clean_include = []
    for k, clause in enumerate(include):
        at = f"{where}['include'][{k}]"
        clean = _clause(clause, at)
        if "color" in clause:
            if clause["color"] not in COLORS:
                raise ValueError(f"{at}['color'] is {clause['color']!r}; GenEval's colours are {COLORS}.")
            clean["color"] = clause["color"]
        if "position" in clause:
            position = clause["position"]
            if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                    or not isinstance(position[1], int) or not 0 <= position[1] < k):
                raise ValueError(f"{at}['position'] must be [relation, index of an earlier include clause] with "
                                 f"relation in {RELATIONS}, got {position!r}.")
            clean["position"] = (position[0], position[1])
        clean_include.append(clean)
    clean_exclude = [_clause(c, f"{where}['exclude'][{k}]") for k, c in enumerate(exclude)]
    return {"tag": str(record.get("tag", "unknown")), "prompt": record.get("prompt"), "include": clean_include,
            "exclude": clean_exclude}


def _clause(clause, at: str) -> dict:
    if not isinstance(clause, dict) or not isinstance(clause.get("class"), str) or not clause["class"].strip():
        raise ValueError(f"{at} must be a dict with a 'class' name and a 'count', got {clause!r}.")
    count = clause.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{at}['count'] must be a positive integer, got {count!r}.")
    return {"class": clause["class"].strip(), "count": count}


def relative_position(box_a, box_b, threshold: float = 0.1) -> set[str]:
    """Relations of box A to box B ("left of", "right of", "above", "below"; image y grows downwards), GenEval's
    rule: the centre offset shrunk per axis by `threshold * (size_a + size_b)`, divided by the offset's length; a
    component beyond 0.5 in a direction makes that relation hold. Empty when the boxes are (nearly) concentric."""
    a, b = np.asarray(box_a, dtype=np.float64)[:4], np.asarray(box_b, dtype=np.float64)[:4]
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    sizes = np.abs(a[2:] - a[:2]) + np.abs(b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - threshold * sizes, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                     ("below", dy > 0.5)) if holds}


def check_geneval(metadata: dict, detections: dict[str, list[Detection]], position_threshold: float = 0.1
                  ) -> GenEvalResult:
    """Apply GenEval's rules to one image.

    Args:
        metadata: a record as returned by [`parse_metadata`].
        detections: per class name, its detections sorted by decreasing score, already thresholded; a clause with a
            colour reads `Detection.color` (None counts as a wrong colour).
        position_threshold: see [`relative_position`].
    """
    clauses, reasons, groups = [], [], []
    for clause in metadata["include"]:
        name, count = clause["class"], clause["count"]
        found = detections.get(name, [])[:count]
        ok = len(found) >= count
        text = f"{count} {clause.get('color', '')} {name}".replace("  ", " ")
        if not ok:
            reasons.append(f"expected at least {count} {name}, found {len(found)}")
        elif "color" in clause:
            right = sum(d.color == clause["color"] for d in found)
            if right < count:
                ok = False
                reasons.append(f"expected {count} {clause['color']} {name}, found colours "
                               f"{[d.color for d in found]}")
        if ok and "position" in clause:
            relation, target = clause["position"]
            text += f" {relation} #{target}"
            if groups[target] is None:
                ok = False
                reasons.append(f"no {metadata['include'][target]['class']} for {name} to be {relation}")
            else:
                for obj in found:
                    for other in groups[target]:
                        held = relative_position(obj.box, other.box, position_threshold)
                        if relation not in held:
                            ok = False
                            reasons.append(f"expected {name} {relation} {other.label}, found {sorted(held) or 'none'}")
                            break
                    if not ok:
                        break
        groups.append(found if ok else None)
        clauses.append((f"include {text}", ok))
    for clause in metadata["exclude"]:
        name, count = clause["class"], clause["count"]
        ok = len(detections.get(name, [])) < count
        if not ok:
            reasons.append(f"expected fewer than {count} {name}, found {len(detections[name])}")
        clauses.append((f"exclude {count} {name}", ok))
    return GenEvalResult(all(ok for _, ok in clauses), clauses, reasons)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def select_detections(detections: list[Detection], threshold: float, max_objects: int = 16,
                      nms_threshold: float = 0.5) -> list[Detection]:
    """Detections of one class with score >= `threshold`, most confident first, greedy non-maximum suppression at
    IoU `nms_threshold` (1.0: none), at most `max_objects`."""
    kept = []
    for det in sorted((d for d in detections if d.score >= threshold), key=lambda d: -d.score):
        if nms_threshold < 1.0 and any(_iou(det.box, k.box) >= nms_threshold for k in kept):
            continue
        kept.append(det)
        if len(kept) == max_objects:
            break
    return kept


class ZeroShotDetector:
    """Any transformers zero-shot object detector (`AutoModelForZeroShotObjectDetection`): boxes for text queries.

    Args:
        model: a checkpoint (e.g. `google/owlv2-base-patch16-ensemble`, `IDEA-Research/grounding-dino-base`) or the
            model object (then pass `processor`).
        processor, device, dtype: as for the other rewards.
    """

    def __init__(self, model="google/owlv2-base-patch16-ensemble", processor=None, device=None, dtype=None):
        from transformers import AutoModelForZeroShotObjectDetection
        from transformers.models.auto.modeling_auto import MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES

        self.model, self.processor = load_checkpoint(
            model, processor, AutoModelForZeroShotObjectDetection, set(MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES),
            "a zero-shot object detector", "google/owlv2-base-patch16-ensemble", device, dtype, arg="detector")
        self.model_type = self.model.config.model_type

    @property
    def default_threshold(self) -> float:
        return DEFAULT_THRESHOLDS.get(self.model_type, 0.1)

    @torch.no_grad()
    def detect(self, image, labels: list[str], threshold: float = 0.0) -> list[Detection]:
        """Every box with score > `threshold` for each of `labels` in one image, labelled by the query it answers.
        OWL models score every query in one pass; other families get one pass per query, so that each box belongs
        to exactly one query."""
        image = as_rgb_images([image], "image")[0]
        size = [(image.height, image.width)]
        out = []
        batches = [list(labels)] if self.model_type in ("owlv2", "owlvit") else [[label] for label in labels]
        for queries in batches:
            enc = self.processor(text=[queries], images=[image], return_tensors="pt")
            enc = {k: (v.to(model_device(self.model), self.model.dtype) if torch.is_floating_point(v)
                       else v.to(model_device(self.model))) for k, v in enc.items()}
            outputs = self.model(**enc)
            result = self.processor.post_process_grounded_object_detection(
                outputs, threshold=threshold, target_sizes=size, text_labels=[queries])[0]
            names = result.get("labels")
            for k, (score, box) in enumerate(zip(result["scores"].tolist(), result["boxes"].tolist())):
                if len(queries) == 1:
                    label = queries[0]
                else:
                    label = queries[int(names[k])]
                x0, y0, x1, y1 = box
                out.append(Detection(label, float(score), (max(x0, 0.0), max(y0, 0.0), min(x1, image.width),
                                                           min(y1, image.height))))
        return out


def _pixel_box(box, size) -> tuple[int, int, int, int]:
    """A box rounded to pixels, at least one pixel wide and high, inside an image of `size` (width, height)."""
    width, height = size
    x0 = min(max(int(np.floor(box[0])), 0), width - 1)
    y0 = min(max(int(np.floor(box[1])), 0), height - 1)
    return x0, y0, max(min(int(np.ceil(box[2])), width), x0 + 1), max(min(int(np.ceil(box[3])), height), y0 + 1)


def load_metadata(path: str) -> dict[str, dict]:
    """GenEval's `evaluation_metadata.jsonl` (or any JSONL of such records) as {prompt: record}."""
    if not os.path.isfile(path):
        raise ValueError(f"metadata file {path!r} does not exist.")
    table = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                record = parse_metadata(line, f"{path}:{n}")
                if not record["prompt"]:
                    raise ValueError(f"{path}:{n} has no 'prompt': it cannot be matched to the training prompts.")
                table[record["prompt"].strip()] = record
    return table


class GenEvalReward:
    """GenEval's rules as a reward (TRL's signature): 1.0 if an image satisfies its prompt's metadata, else 0.0
    (`score="partial"`: the share of clauses that hold); NaN for a prompt with no metadata.

    The metadata of each image comes from, in order: a `metadata` keyword (one record or JSON string per image: a
    dataset column that `GRPOUMMTrainer` passes along), `include` / `exclude` / `tag` keywords (GenEval's fields as
    columns), or the `metadata` table given here (a JSONL path or {prompt: record}) looked up by prompt text.

    Args:
        detector: a [`ZeroShotDetector`], or a checkpoint for one (default `google/owlv2-base-patch16-ensemble`).
        color_model: a CLIP checkpoint or [`CLIPScoreReward`] to classify colours (GenEval's: the ViT-L/14 CLIP,
            `openai/clip-vit-large-patch14`); needed only for prompts with colours (an error says so otherwise).
        metadata: a JSONL file of GenEval records or a dict {prompt: record}.
        threshold / counting_threshold: detection score thresholds (default: the detector family's own, see module
            docs; counting prompts use `counting_threshold`, default the same).
        max_objects, nms_threshold, position_threshold: see [`select_detections`] and [`relative_position`].
        score: "strict" (GenEval's 0/1) or "partial".
    """

    def __init__(self, detector="google/owlv2-base-patch16-ensemble", color_model=None, metadata=None,
                 threshold: float | None = None, counting_threshold: float | None = None, max_objects: int = 16,
                 nms_threshold: float = 0.5, position_threshold: float = 0.1, score: str = "strict", device=None,
                 dtype=None, name: str = "geneval"):
        if score not in ("strict", "partial"):
            raise ValueError(f"score must be 'strict' or 'partial', got {score!r}.")
        self.detector = detector if isinstance(detector, ZeroShotDetector) else ZeroShotDetector(
            detector, device=device, dtype=dtype)
        if color_model is not None and not hasattr(color_model, "classify"):
            from .clip import CLIPScoreReward

            color_model = CLIPScoreReward(color_model, device=device, dtype=dtype)
        self.color_model = color_model
        if isinstance(metadata, (str, os.PathLike)):
            metadata = load_metadata(str(metadata))
        self.table = {k.strip(): parse_metadata(v, f"metadata[{k!r}]") for k, v in (metadata or {}).items()}
        self.threshold = self.detector.default_threshold if threshold is None else threshold
        self.counting_threshold = self.threshold if counting_threshold is None else counting_threshold
        self.max_objects, self.nms_threshold, self.position_threshold = max_objects, nms_threshold, position_threshold
        self.score = score
        self.__name__ = name

    def metadata_for(self, prompts: list[str], kwargs: dict) -> list[dict | None]:
        """Each image's metadata record (None where there is none)."""
        n = len(prompts)
        if kwargs.get("metadata") is not None:
            column = list(kwargs["metadata"])
            if len(column) != n:
                raise ValueError(f"metadata has {len(column)} entries for {n} images.")
            return [None if r is None else parse_metadata(r, f"metadata[{i}]") for i, r in enumerate(column)]
        if kwargs.get("include") is not None:
            rows = []
            for i in range(n):
                include = kwargs["include"][i]
                if include is None:
                    rows.append(None)
                    continue
                record = {"include": include, "exclude": (kwargs.get("exclude") or [None] * n)[i] or [],
                          "tag": (kwargs.get("tag") or [None] * n)[i] or "unknown", "prompt": prompts[i]}
                rows.append(parse_metadata(record, f"row {i} (include/exclude/tag columns)"))
            return rows
        return [self.table.get(p.strip()) for p in prompts]

    def evaluate(self, image, metadata: dict) -> tuple[GenEvalResult, dict[str, list[Detection]]]:
        """Detect the metadata's classes in `image`, classify colours where asked, apply the rules."""
        classes = list(dict.fromkeys(c["class"] for c in metadata["include"] + metadata["exclude"]))
        threshold = self.counting_threshold if metadata["tag"] == "counting" else self.threshold
        found = self.detector.detect(image, classes, threshold=min(threshold, self.threshold))
        detections = {}
        for name in classes:
            mine = select_detections([d for d in found if d.label == name], threshold, self.max_objects,
                                     self.nms_threshold)
            if mine:
                detections[name] = mine
        for clause in metadata["include"]:
            objects = detections.get(clause["class"], [])[: clause["count"]]
            if "color" in clause and objects:
                if self.color_model is None:
                    raise ValueError(f"prompt {metadata['prompt']!r} asks for a colour: pass color_model (a CLIP "
                                     "checkpoint, GenEval's is openai/clip-vit-large-patch14) to GenEvalReward.")
                crops = [image.crop(_pixel_box(d.box, image.size)) for d in objects]
                templates = [t.format(cls=clause["class"]) for t in COLOR_TEMPLATES]
                for d, k in zip(objects, self.color_model.classify(crops, list(COLORS), templates)):
                    d.color = COLORS[k]
        return check_geneval(metadata, detections, self.position_threshold), detections

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        images = as_rgb_images(completions)
        prompts = check_prompts(prompts, len(images))
        rewards = []
        for image, metadata in zip(images, self.metadata_for(prompts, kwargs)):
            if metadata is None:
                rewards.append(float("nan"))
                continue
            result, _ = self.evaluate(image, metadata)
            rewards.append(float(result.correct) if self.score == "strict" else result.fraction)
        return rewards
