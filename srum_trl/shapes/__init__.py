"""ShapesWorld: a synthetic text-to-image world with an exact grammar and a rule-based scorer.

``world`` defines the prompt grammar, the ground-truth semantics, the renderer
of correct images and of hard negatives; ``scorer`` detects objects in
(possibly noisy, VQ-decoded) images and checks them against prompts.
"""

from .scorer import (
    DetectedObject,
    ScoreResult,
    accuracy_by_category,
    classify_shape,
    detect_objects,
    score,
    score_batch,
)
from .world import (
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    NEGATIVE_KINDS,
    NUMBERS,
    RELATIONS,
    SHAPES,
    PromptSpec,
    ShapeObject,
    add_noise,
    all_prompts,
    draw_objects,
    evaluate_objects,
    heldout_prompts,
    is_correct,
    negative_kinds_for,
    parse_prompt,
    render,
    render_negative,
    sample_prompts,
    split_prompts,
    train_prompts,
)

__all__ = [
    "CATEGORIES",
    "COLORS",
    "IMAGE_SIZE",
    "NEGATIVE_KINDS",
    "NUMBERS",
    "RELATIONS",
    "SHAPES",
    "DetectedObject",
    "PromptSpec",
    "ScoreResult",
    "ShapeObject",
    "accuracy_by_category",
    "add_noise",
    "all_prompts",
    "classify_shape",
    "detect_objects",
    "draw_objects",
    "evaluate_objects",
    "heldout_prompts",
    "is_correct",
    "negative_kinds_for",
    "parse_prompt",
    "render",
    "render_negative",
    "sample_prompts",
    "score",
    "score_batch",
    "split_prompts",
    "train_prompts",
]
