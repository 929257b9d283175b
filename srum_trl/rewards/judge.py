"""The model judges its own images: a global score and region scores, turned into dense [`RewardMap`]s.

Two modes:

- `"logits"` (fast): one forward pass per (image, question); score = 2 * P(yes) - 1, with P(yes) the next-token
  probability of "yes" renormalised against "no".
- `"text"` (the SRUM paper's): the model writes an answer containing `Score: x`; x is read by [`parse_score`]
  (the documented format only: a number in [-1, 1]). Unparseable answers are retried with sampling; an answer that
  still cannot be read is a missing score, NaN, counted in `stats["unparsed"]`: a missing global score makes the
  image's reward NaN (left out of GRPO's group statistics and of the SRUM loss, as TRL does with NaN rewards), a
  missing region score drops that region from the map.

Regions come from a [`RegionProposer`]; each region is shown to the judge as a crop (`region_view="crop"`,
default) or as the whole image with the box written in the question (`region_view="box"`, the paper's way).

Device pixels: `judge(..., pixels=rollout.pixels)` gives the judge the same images as a uint8 tensor on the device
(`Rollout.pixels`, filled by the Janus backend). With a backend that accepts pixel views (`JanusBackend`) every
question is then asked on a view of that tensor (the whole image, or a crop box), cropped, resized and normalised on
the device: no host work per image or crop, and the same scores as from the PIL images.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from typing import Callable

import torch
from PIL import Image

from ..data.images import check_image_size
from ..models.base import PixelViews
from ..warn import warn
from .reward_map import RewardMap, Region, check_boxes
from .regions import GridProposer, RegionProposer, build_proposer

SCORE_SCALE = (
    "Scale: 1.0 perfect; 0.5 to 0.9 very good with minor flaws; -0.4 to 0.4 neutral or mixed (an irrelevant but "
    "harmless background is 0); -0.9 to -0.5 bad or badly rendered; -1.0 contradicts the prompt."
)

_SCORE_ASK = " Reply with one line `Score: x`, x between -1.0 and 1.0."
_REGION_SCORE = "does it show something the description asks for, and is it rendered well? " + SCORE_SCALE + _SCORE_ASK

#: Default questions by (mode, "global") and (mode, "local", region_view).
DEFAULT_QUESTIONS = {
    ("logits", "global"): 'Does this image match the description "{prompt}"? Answer yes or no.',
    ("logits", "local", "crop"): 'Does this part of an image for "{prompt}" show what the description asks for, '
    "well rendered? Answer yes or no.",
    ("logits", "local", "box"): 'Does the region {box} (x0, y0, x1, y1 in pixels) of this image for "{prompt}" show '
    "what the description asks for, well rendered? Answer yes or no.",
    ("text", "global"): 'Judge how well this image matches the description "{prompt}": its objects, attributes, '
    "counts and layout. " + SCORE_SCALE + _SCORE_ASK,
    ("text", "local", "crop"): 'This is a part of an image generated for "{prompt}". Judge it: ' + _REGION_SCORE,
    ("text", "local", "box"): 'The image was generated for "{prompt}". Judge the region {box} (x0, y0, x1, y1 in '
    "pixels): " + _REGION_SCORE,
}

_SCORE_LABEL_RE = re.compile(r"score\s*[:=]\s*\**\s*", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_OTHER_SCALE_RE = re.compile(r"\s*(?:/|out\s+of\b|%|percent\b)", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    """The score of a text-mode answer, or None when it is not written in the documented format.

    The documented format is `Score: x` with x a number between -1.0 and 1.0 (`=` for `:`, markdown bold and any
    case are fine; scientific notation is read as the number it is: "Score: 1e-1" is 0.1). Only the last `Score:` of
    the answer counts, after any `</think>`. An answer on another scale is not guessed at: "Score: 8/10",
    "Score: 7 out of 10", "Score: 80%" and numbers outside [-1, 1] ("Score: 8") are None, so the judge re-asks and
    finally counts them as unparsed.
    """
    text = text.split("</think>")[-1]
    labels = list(_SCORE_LABEL_RE.finditer(text))
    if not labels:
        return None
    rest = text[labels[-1].end() :]
    number = _NUMBER_RE.match(rest)
    if number is None or _OTHER_SCALE_RE.match(rest[number.end() :]):
        return None
    value = float(number.group())
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        return None
    return value



@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class UMMJudgeRewardFunction:
    """Reward function in which a UMM judges images: scalar rewards (TRL's signature) and dense reward maps.

    Args:
        backend: the judging [`UMMBackend`]. `None`: the trainer binds its own policy model (see `frozen`).
        mode: "logits" or "text" (see the module docs).
        region_proposer: a proposer, or "grid" / "sam" / "none".
        region_grid: cells per side of the default grid proposer.
        map_rule: "srum" (default), "signed", or a function (see `reward_map`).
        use_global / use_local: turn the global or the local judge off (the paper's ablations). Without the global
            judge the map uses g = 1; without the local judge there are no regions.
        global_question: template with `{prompt}`, or `fn(prompt) -> str`. Default depends on `mode`.
        local_question: template with `{prompt}` (and `{box}` for `region_view="box"`), or
            `fn(prompt) -> list[str]`: several questions per region, the region's score is their maximum.
        region_view: "crop" or "box".
        frozen: judge with the model's frozen starting point (LoRA adapters disabled) when it is a PEFT model.
        max_retries: text mode, re-asks (with sampling) when no score can be parsed.
        max_new_tokens: text mode, answer length.
        downsample_mode: "bilinear" (the reference's) or "area" (exact cell means) map-to-token-grid downsampling.
        max_image_pixels: images with more pixels are refused before anything is asked (default 4096 x 4096, or
            `$SRUM_TRL_MAX_IMAGE_PIXELS`; see `srum_trl.data.images`).
    """

    def __init__(
        self,
        backend=None,
        mode: str = "logits",
        region_proposer: RegionProposer | str = "grid",
        region_grid: int = 2,
        map_rule: str | Callable = "srum",
        use_global: bool = True,
        use_local: bool = True,
        global_question: str | Callable[[str], str] | None = None,
        local_question: str | Callable[[str], list[str]] | None = None,
        region_view: str = "crop",
        frozen: bool = True,
        max_retries: int = 2,
        max_new_tokens: int = 64,
        downsample_mode: str = "bilinear",
        name: str = "umm_judge",
        max_image_pixels: int | None = None,
    ):
        if mode not in ("logits", "text"):
            raise ValueError(f"mode must be 'logits' or 'text', got {mode!r}.")
        if region_view not in ("crop", "box"):
            raise ValueError(f"region_view must be 'crop' or 'box', got {region_view!r}.")
        if not (use_global or use_local):
            raise ValueError("use_global and use_local are both False: the judge would score nothing.")
        self.backend = backend
        self.mode = mode
        if isinstance(region_proposer, str):
            region_proposer = build_proposer(region_proposer, grid=region_grid)
        self.region_proposer = region_proposer or GridProposer(region_grid)
        self.map_rule = map_rule
        self.use_global, self.use_local = use_global, use_local
        self.global_question = global_question or DEFAULT_QUESTIONS[(mode, "global")]
        self.local_question = local_question or DEFAULT_QUESTIONS[(mode, "local", region_view)]
        if region_view == "box" and isinstance(self.local_question, str) and "{box}" not in self.local_question:
            raise ValueError("region_view='box' shows the whole image, so local_question must name the region: "
                             "put '{box}' in the template.")
        self.region_view = region_view
        self.frozen = frozen
        self.max_retries = max_retries
        self.max_new_tokens = max_new_tokens
        self.downsample_mode = downsample_mode
        self.__name__ = name
        self.max_image_pixels = max_image_pixels
        self.stats: Counter = Counter()

    def bind(self, backend) -> "UMMJudgeRewardFunction":
        """Use `backend` as the judge if none was given at construction."""
        if self.backend is None:
            self.backend = backend
        return self

    # --------------------------------------------------------------------------------------------- questions
    def _global_question(self, prompt: str) -> str:
        q = self.global_question
        return q(prompt) if callable(q) else q.format(prompt=prompt)

    def _local_questions(self, prompt: str, box) -> list[str]:
        q = self.local_question
        if callable(q):
            out = q(prompt)
            return [out] if isinstance(out, str) else list(out)
        return [q.format(prompt=prompt, box=list(box))]

    def check_prompts(self, prompts: list[str], field_name: str = "prompt") -> None:
        """Before anything is judged: every question this judge would ask about `prompts` (the global one and the
        local ones, with the largest box) fits, with its image and the answer, in the judging model's context. A
        longer one would be cut or read past the model's positions and still be scored. Families that cannot
        measure their understanding rows (`question_lengths` None) are not checked."""
        backend = self.backend
        limit = getattr(backend, "max_context_tokens", None)
        if backend is None or limit is None:
            return
        side = getattr(backend, "image_size", 0)
        owners: dict[str, int] = {}
        for i, prompt in enumerate(prompts):
            asked = [self._global_question(prompt)] if self.use_global else []
            if self.use_local:
                asked += self._local_questions(prompt, (0, 0, side, side))
            for question in asked:
                owners.setdefault(question, i)
        questions = list(owners)
        lengths = backend.question_lengths(questions) if questions else []
        if lengths is None:
            return
        answer = self.max_new_tokens if self.mode == "text" else 1
        for question, n in zip(questions, lengths):
            if n + answer > limit:
                i = owners[question]
                raise ValueError(
                    f"{field_name}[{i}] ({prompts[i]!r}) makes a judge question of {n} tokens with its image; with "
                    f"{answer} answer token(s) that exceeds the judging model's context of {limit}, so the answer "
                    "would not be a judgement of the whole prompt. Shorten the prompt (or the question template)."
                )

    # ---------------------------------------------------------------------------------------------- scoring
    def _scores(self, images: list[Image.Image] | PixelViews, questions: list[str]) -> list[float]:
        if not questions:
            return []
        if self.mode == "logits":
            return (2.0 * self.backend.yes_probability(images, questions) - 1.0).tolist()
        answers = self.backend.answer(images, questions, max_new_tokens=self.max_new_tokens)
        scores = [parse_score(a) for a in answers]
        for attempt in range(self.max_retries):
            todo = [i for i, s in enumerate(scores) if s is None]
            if not todo:
                break
            self.stats["retries"] += len(todo)
            views = images[todo] if isinstance(images, PixelViews) else [images[i] for i in todo]
            again = self.backend.answer(views, [questions[i] for i in todo],
                                        max_new_tokens=self.max_new_tokens, temperature=0.7)
            for i, a in zip(todo, again):
                scores[i] = parse_score(a)
        unparsed = sum(s is None for s in scores)
        self.stats["unparsed"] += unparsed
        return [math.nan if s is None else s for s in scores]

    def _proposed_boxes(self, image: Image.Image, prompt: str, i: int) -> tuple[list, int, int]:
        """The proposer's boxes for image `i`, checked before any question is asked: malformed ones raise, naming
        the proposer and the image; ones reaching outside the image are clamped, ones entirely outside dropped.
        Returns the boxes and how many were clamped and dropped."""
        proposed = self.region_proposer(image, prompt)
        try:
            proposed = list(proposed)
        except TypeError:
            raise ValueError(f"{self.region_proposer!r} returned {proposed!r} for image {i}; a region proposer returns "
                             "a list of (x0, y0, x1, y1) boxes.") from None
        width, height = image.size
        boxes, clamped, dropped = check_boxes(proposed, width, height,
                                              where=f"{self.region_proposer!r}, image {i} ({prompt!r}): box")
        return boxes, clamped, dropped

    def judge(
        self,
        images: list[Image.Image],
        prompts: list[str],
        grid: tuple[int, int] | None = None,
        global_scores: list[float] | None = None,
        pixels: torch.Tensor | None = None,
    ) -> list[RewardMap]:
        """Score each image against its prompt and build its reward map on `grid` (default: the backend's).

        Args:
            images: the images (PIL); the region proposer and the reward maps always read them.
            prompts: one prompt per image.
            grid: `(h, w)` of the token-level maps (default: the backend's token grid).
            global_scores: used as the global scores instead of asking the global question.
            pixels: optionally the same images as a uint8 tensor `[B, H, W, 3]` (RGB, channels last, row `i` equal to
                `np.asarray(images[i])`), on the judging model's device: `Rollout.pixels`. When the backend accepts
                pixel views (`backend.accepts_pixel_views`, e.g. `JanusBackend`), the questions are asked on views
                of it (whole image or crop box) prepared on the device instead of on PIL images and crops; the
                scores are the same. Ignored by other backends.
        """
        if self.backend is None:
            raise ValueError("This UMMJudgeRewardFunction has no backend: pass one, or use it inside a trainer.")
        if len(images) != len(prompts):
            raise ValueError(f"judge got {len(images)} images but {len(prompts)} prompts.")
        grid = grid or self.backend.token_grid
        if global_scores is not None and len(global_scores) != len(images):
            raise ValueError(f"judge got {len(global_scores)} global scores for {len(images)} images.")
        on_device = pixels is not None and getattr(self.backend, "accepts_pixel_views", False)
        if on_device and (pixels.dim() != 4 or pixels.shape[0] != len(images)):
            raise ValueError(f"judge got pixels of shape {tuple(pixels.shape)} for {len(images)} images "
                             "(expected [B, H, W, 3]).")
        # each question's view: (image index, crop box or None for the whole image)
        rows, questions, owners = [], [], []  # owner: (image index, region index or -1)
        boxes_per_image, clamped, dropped = [], 0, 0
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            check_image_size(image, f"judge: image {i}", self.max_image_pixels)
            if on_device and image.size != (pixels.shape[2], pixels.shape[1]):
                raise ValueError(f"judge: image {i} is {image.size[0]} x {image.size[1]} px but its pixels are "
                                 f"{pixels.shape[2]} x {pixels.shape[1]}; pass the rollout's own pixels.")
            if self.use_global and global_scores is None:
                rows.append((i, None))
                questions.append(self._global_question(prompt))
                owners.append((i, -1))
            boxes, c, d = self._proposed_boxes(image, prompt, i) if self.use_local else ([], 0, 0)
            clamped, dropped = clamped + c, dropped + d
            boxes_per_image.append(boxes)
            for k, box in enumerate(boxes):
                view = (i, tuple(box) if self.region_view == "crop" else None)
                for question in self._local_questions(prompt, box):
                    rows.append(view)
                    questions.append(question)
                    owners.append((i, k))
        if clamped or dropped:
            self.stats["boxes_clamped"] += clamped
            self.stats["boxes_dropped"] += dropped
            warn(f"{self.region_proposer!r} proposed {clamped + dropped} box(es) reaching outside their image: "
                 f"{clamped} clamped to the image, {dropped} dropped (entirely outside); counted in "
                 "stats['boxes_clamped'] and stats['boxes_dropped'].")
        if on_device:
            q_images = PixelViews(pixels, [i for i, _ in rows], [box for _, box in rows])
        else:
            crops = {}  # one PIL crop per (image, box), shared by that region's questions
            for i, box in rows:
                if box is not None and (i, box) not in crops:
                    crops[(i, box)] = images[i].crop(box)
            q_images = [images[i] if box is None else crops[(i, box)] for i, box in rows]
        model = self.backend.model
        frozen = self.backend.frozen() if (self.frozen and hasattr(self.backend, "frozen")) else contextlib.nullcontext()
        with torch.no_grad(), _eval_mode(model), frozen:
            scores = self._scores(q_images, questions)
        self.stats["questions"] += len(questions)
        asked: dict[int, float] = dict(enumerate(global_scores)) if global_scores is not None else {}
        local: dict[tuple[int, int], tuple[float, str]] = {}  # (best score, its question's label)
        labelled = callable(self.local_question)  # several questions per region: the best one names the region
        for (i, k), s, question in zip(owners, scores, questions):
            if k < 0:
                asked[i] = s
            elif (i, k) not in local or s > local[(i, k)][0] or math.isnan(local[(i, k)][0]):
                local[(i, k)] = (s, question if labelled else "")  # NaN (unparsed) only until a score is read
        maps = []
        for i, image in enumerate(images):
            regions = [Region(tuple(b), *local[(i, k)]) for k, b in enumerate(boxes_per_image[i])]
            maps.append(
                RewardMap.from_scores(image.size, grid, asked.get(i), regions, self.map_rule, self.downsample_mode)
            )
        return maps

    @staticmethod
    def scalar(reward_map: RewardMap) -> float:
        """The scalar reward of a map: the global score, or the mean local score without a global judge (missing,
        NaN, scores left out). NaN when the judge gave no usable score."""
        if reward_map.global_score is not None:
            return float(reward_map.global_score)
        scores = [s for s in reward_map.local_scores if not math.isnan(s)]
        if not scores:
            return math.nan if reward_map.local_scores else 0.0
        return float(sum(scores) / len(scores))

    def __call__(self, prompts: list[str], completions: list[Image.Image], **kwargs) -> list[float]:
        """TRL's reward-function signature: `completions` are the generated images; returns one float each."""
        maps = self.judge(list(completions), list(prompts))
        return [self.scalar(m) for m in maps]
