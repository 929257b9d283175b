"""`category_score`: the mean of per-image scores per category and overall, with standard errors; the score table of
every `srum-trl eval` protocol, as an `evaluate` module that loads from its folder (offline):

    import evaluate
    from srum_trl.eval import metric_path

    metric = evaluate.load(metric_path("category_score"))
    metric.compute(predictions=[1, 0, 1, 1], references=["pair", "pair", "single", "single"])
"""

import math

import datasets
import evaluate

_DESCRIPTION = """Mean score per category and overall, each with its standard error over prompts (images of one prompt
are averaged first when `groups` names their prompt, so that several samples per prompt do not shrink the error).
`overall="images"` averages every image; `overall="categories"` averages the category means (GenEval's and
T2I-CompBench's convention). NaN scores (a reward that does not apply) are left out and counted."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per-image scores (floats; NaN for "does not apply").
    references: per-image category names.
    groups: optional per-image prompt ids; images of one prompt count as one unit for the standard error.
    overall: "images" (default) or "categories".
Returns:
    overall, overall_se, num_images, num_nan, and categories: {name: {mean, se, n}} in first-seen order.
"""


def _mean_se(units):
    n = len(units)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(units) / n
    if n < 2:
        return mean, float("nan")
    var = sum((u - mean) ** 2 for u in units) / (n - 1)
    return mean, math.sqrt(var / n)


class CategoryScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, groups=None, overall="images"):
        if overall not in ("images", "categories"):
            raise ValueError(f"overall must be 'images' or 'categories', got {overall!r}.")
        groups = list(range(len(predictions))) if groups is None else list(groups)
        if len(groups) != len(predictions):
            raise ValueError(f"groups has {len(groups)} entries for {len(predictions)} predictions.")
        units = {}  # (category, group) -> finite scores
        for score, category, group in zip(predictions, references, groups):
            if score is None or math.isnan(score):
                continue
            units.setdefault((category, group), []).append(float(score))
        categories = {}
        for category in dict.fromkeys(references):
            per_prompt = [sum(v) / len(v) for (c, _), v in units.items() if c == category]
            mean, se = _mean_se(per_prompt)
            categories[category] = {"mean": mean, "se": se, "n": sum(len(v) for (c, _), v in units.items()
                                                                   if c == category)}
        if overall == "images":
            total, se = _mean_se([sum(v) / len(v) for v in units.values()])
        else:
            means = [c["mean"] for c in categories.values() if not math.isnan(c["mean"])]
            total = sum(means) / len(means) if means else float("nan")
            ses = [c["se"] for c in categories.values() if not math.isnan(c["mean"])]
            se = math.sqrt(sum(s * s for s in ses)) / len(ses) if ses and not any(math.isnan(s) for s in ses) \
                else float("nan")
        nan = sum(1 for s in predictions if s is None or math.isnan(s))
        return {"overall": total, "overall_se": se, "num_images": len(predictions), "num_nan": nan,
                "categories": categories}
