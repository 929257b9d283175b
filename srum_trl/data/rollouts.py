"""The rollout store: generate + judge a prompt dataset into a `datasets` dataset on disk, shard by shard.

Layout of a store folder:

    rollout_config.json      settings that made it (a resumed run must use the same ones)
    shard-00000/ ...         `Dataset.save_to_disk` folders, each covering `shard_size` consecutive prompts

A shard is written to a temporary folder and renamed into place once complete, so a run killed at any moment
leaves only whole shards; the next run skips them and continues, with no row lost or duplicated. Shard k is
sampled with seed `seed + k`, so a resumed store holds the same images as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import torch
from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from ..models.base import GenerationConfig, Rollout
from ..rewards.reward_map import Region, RewardMap

ROLLOUT_COLUMNS = ("prompt", "image", "tokens", "grid", "guidance", "temperature", "global_score", "regions",
                   "token_map", "reward", "guidance_margin", "rule")

FEATURES = Features(
    {
        "prompt": Value("string"),
        "image": ImageFeature(),
        "tokens": Sequence(Value("int64")),
        "grid": Sequence(Value("int32")),
        "guidance": Value("float32"),
        "temperature": Value("float32"),
        "global_score": Value("float32"),
        "regions": [{"box": Sequence(Value("int32")), "score": Value("float32"), "label": Value("string")}],
        "token_map": Sequence(Sequence(Value("float32"))),
        "reward": Value("float32"),
        "guidance_margin": Value("float32"),
        "rule": Value("string"),
    }
)


def is_rollout_dataset(dataset) -> bool:
    """Whether `dataset` holds judged rollouts (rather than bare prompts)."""
    names = set(getattr(dataset, "column_names", None) or [])
    return {"prompt", "tokens", "token_map"} <= names


def rollout_rows(rollout: Rollout, maps: list[RewardMap], rewards: list[float]) -> dict[str, list]:
    """Column-wise rows of a judged rollout, in the store's schema."""
    n = len(rollout)
    margin = rollout.guidance_margin.tolist() if rollout.guidance_margin is not None else [float("nan")] * n
    h, w = rollout.grid
    return {
        "prompt": list(rollout.prompts),
        "image": list(rollout.images),
        "tokens": rollout.tokens.reshape(len(rollout), -1).tolist(),
        "grid": [[h, w]] * len(rollout),
        "guidance": [float(rollout.guidance)] * len(rollout),
        "temperature": [float(rollout.temperature)] * len(rollout),
        "global_score": [m.global_score for m in maps],
        "regions": [[{"box": list(r.box), "score": r.score, "label": r.label} for r in m.regions] for m in maps],
        "token_map": [m.token_map.tolist() for m in maps],
        "reward": [float(r) for r in rewards],
        "guidance_margin": [float(v) for v in margin],
        "rule": [m.rule for m in maps],
    }


def rows_to_rollout(rows: dict[str, list]) -> tuple[Rollout, torch.Tensor]:
    """A stored batch (column dict) back into a [`Rollout`] and its `[B, h*w]` token weights."""
    grids = {tuple(g) for g in rows["grid"]}
    guidances = {round(float(g), 6) for g in rows["guidance"]}
    if len(grids) != 1 or len(guidances) != 1:
        raise ValueError("A rollout batch mixes token grids or guidance scales; store them in separate datasets.")
    tokens = torch.as_tensor(rows["tokens"], dtype=torch.long)
    weights = torch.as_tensor(np.asarray(rows["token_map"], dtype=np.float32)).reshape(len(tokens), -1)
    rollout = Rollout(
        prompts=list(rows["prompt"]),
        images=list(rows.get("image") or [None] * len(tokens)),
        tokens=tokens,
        grid=grids.pop(),
        guidance=guidances.pop(),
        temperature=float(rows["temperature"][0]) if "temperature" in rows else 1.0,
    )
    return rollout, weights


def _fingerprint(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def build_rollouts(
    backend,
    prompts: list[str],
    judge,
    out_dir: str,
    generation: GenerationConfig | None = None,
    seed: int = 0,
    shard_size: int = 64,
    progress: bool = True,
) -> Dataset:
    """Generate and judge `prompts` into the store at `out_dir`, resuming whatever is already there."""
    generation = generation or GenerationConfig()
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    backend.check_prompts(prompts)
    judge.bind(backend)
    os.makedirs(out_dir, exist_ok=True)
    settings = {
        "num_prompts": len(prompts),
        "prompts_sha256": _fingerprint(prompts),
        "seed": seed,
        "shard_size": shard_size,
        "guidance": generation.guidance,
        "temperature": generation.temperature,
        "top_k": generation.top_k,
        "map_rule": judge.map_rule if isinstance(judge.map_rule, str) else "custom",
        "judge_mode": judge.mode,
        "judge": {"use_global": judge.use_global, "use_local": judge.use_local, "region_view": judge.region_view,
                  "region_proposer": repr(judge.region_proposer), "downsample_mode": judge.downsample_mode},
        "grid": list(backend.token_grid),
    }
    config_path = os.path.join(out_dir, "rollout_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            previous = json.load(f)
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            raise ValueError(
                f"{out_dir} holds rollouts made with other settings {changed} (old, new); use a new folder or the "
                "same settings to resume."
            )
    else:
        with open(config_path, "w") as f:
            json.dump(settings, f, indent=2)
    num_shards = (len(prompts) + shard_size - 1) // shard_size
    todo = [k for k in range(num_shards) if not os.path.isdir(os.path.join(out_dir, _shard_name(k)))]
    for k in tqdm(todo, desc="rollout shards", disable=not progress):
        batch = prompts[k * shard_size : (k + 1) * shard_size]
        rollout = backend.generate(batch, generation, seed=seed + k)
        maps = judge.judge(rollout.images, rollout.prompts, rollout.grid, pixels=rollout.pixels)
        rewards = [judge.scalar(m) for m in maps]
        shard = Dataset.from_dict(rollout_rows(rollout, maps, rewards), features=FEATURES)
        final = os.path.join(out_dir, _shard_name(k))
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shard.save_to_disk(tmp)
        os.replace(tmp, final)
    return load_rollouts(out_dir)


def load_rollouts(path: str) -> Dataset:
    """All complete shards of a store, in prompt order, as one dataset."""
    names = sorted(n for n in os.listdir(path) if n.startswith("shard-") and not n.endswith(".tmp"))
    if not names:
        raise ValueError(f"{path} holds no complete rollout shard.")
    return concatenate_datasets([load_from_disk(os.path.join(path, n)) for n in names])


def reward_map_from_row(row: dict) -> RewardMap:
    """Rebuild a [`RewardMap`] (without its pixel map) from a stored row, e.g. to draw it."""
    regions = [Region(tuple(r["box"]), r["score"], r.get("label", "")) for r in row["regions"]]
    token_map = np.asarray(row["token_map"], dtype=np.float32)
    g = row["global_score"]
    g = None if g is None or (isinstance(g, float) and np.isnan(g)) else float(g)
    return RewardMap(g, regions, token_map, token_map, row.get("rule") or "srum")
