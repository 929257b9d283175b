"""Benchmark protocols for generated images (`srum-trl eval`): shapes, geneval, compbench, ocr, clip and the model's own
judge, with per-category scores, standard errors and paired comparisons of a base model and its adapters."""

from .protocols import COMPBENCH_QUESTION, DEFAULT_MODELS, PROTOCOLS, load_records, parse_compbench_score
from .run import EvalSettings, category_scores, evaluate_models, markdown_table, metric_path, paired_difference

__all__ = [
    "COMPBENCH_QUESTION",
    "DEFAULT_MODELS",
    "EvalSettings",
    "PROTOCOLS",
    "category_scores",
    "evaluate_models",
    "load_records",
    "markdown_table",
    "metric_path",
    "paired_difference",
    "parse_compbench_score",
]
