"""The rollout store: generate + judge a prompt dataset into a `datasets` dataset on disk, shard by shard.

Layout of a store folder:

    rollout_config.json      what made it: prompts, model (weights fingerprint, dtype, sampler), sampling and judge
                             settings; a resumed or extended run must match it
    shard-00000/ ...         `Dataset.save_to_disk` folders, each covering `shard_size` consecutive prompts
                             (`num_generations` rows per prompt, sharing the prompt's index in the `group` column)

A shard is written to a temporary folder and renamed into place once complete, so a run killed at any moment
leaves only whole shards; the next run checks them (a shard cut short or unreadable is named and made again), skips
the whole ones and continues, with no row lost or duplicated. Shard k is sampled with seed `seed + k`, so a resumed
store holds the same images as an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import torch
from datasets import Dataset, Features, Image as ImageFeature, Sequence, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from ..models.base import GenerationConfig, Rollout
from ..rewards.reward_map import Region, RewardMap
from ..warn import warn
from .manifest import comparable, model_signature, prompts_fingerprint, read_manifest, settings_diff, write_manifest

ROLLOUT_COLUMNS = ("prompt", "image", "tokens", "grid", "guidance", "temperature", "global_score", "regions",
                   "token_map", "reward", "guidance_margin", "rule", "group")

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
        "group": Value("int64"),
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


def check_rollout_rows(dataset, grid: tuple[int, int], name: str = "train_dataset") -> list[list[int]]:
    """Check every row of a rollout dataset against the training model and return its groups (row indices of each
    prompt's images, in order).

    Every row must hold `h * w` tokens on the model's token grid `(h, w)` (not only the first: a dataset mixing
    stores would otherwise train on foreign tokens), and the rows must share one guidance scale. Rows sharing a
    `group` value are the images of one prompt; all groups must be equally large. Without a `group` column each row
    is its own group.
    """
    import pyarrow.compute as pc

    columns = [c for c in ("grid", "tokens", "guidance", "group") if c in dataset.column_names]
    table = dataset.select_columns(columns).with_format("arrow")[:]
    grids = np.asarray(table["grid"].combine_chunks().flatten()).reshape(-1, 2)
    bad = np.flatnonzero((grids != np.asarray(grid)).any(axis=1))
    if len(bad):
        raise ValueError(f"{name} row {bad[0]} holds a rollout on a {tuple(grids[bad[0]].tolist())} token grid but "
                         f"the model generates on {tuple(grid)}: it was made with another model (or the dataset "
                         f"mixes stores; {len(bad)} such rows).")
    lengths = np.asarray(pc.list_value_length(table["tokens"]))
    bad = np.flatnonzero(lengths != grid[0] * grid[1])
    if len(bad):
        raise ValueError(f"{name} row {bad[0]} holds {int(lengths[bad[0]])} tokens, not the {grid[0] * grid[1]} of a "
                         f"{tuple(grid)} grid.")
    guidances = np.unique(np.round(np.asarray(table["guidance"]), 6))
    if len(guidances) > 1:
        raise ValueError(f"{name} mixes rollouts sampled at guidance scales {guidances.tolist()}; train on one store "
                         "(one guidance) at a time.")
    if "group" not in columns:
        return [[i] for i in range(len(dataset))]
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(table["group"].to_pylist()):
        groups.setdefault(g, []).append(i)
    sizes = {len(rows) for rows in groups.values()}
    if len(sizes) > 1:
        raise ValueError(f"{name} holds prompt groups of unequal sizes {sorted(sizes)}; use whole stores (a selection "
                         "of rows can cut a group).")
    return list(groups.values())


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


MANIFEST = "rollout_config.json"
_SHARD_RE = re.compile(r"^shard-(\d{5})$")


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _shard_indices(path: str) -> list[int]:
    """Indices of the shard folders in `path` (temporary `.tmp` folders of an interrupted write are not shards)."""
    return sorted(int(m.group(1)) for m in map(_SHARD_RE.match, os.listdir(path)) if m)


def _for_comparison(manifest: dict) -> dict:
    """A manifest without what is kept for people only (the paths the model was loaded from)."""
    out = {k: v for k, v in manifest.items() if k != "source"}
    if isinstance(out.get("model"), dict):
        out["model"] = comparable(out["model"])
    if isinstance(out.get("judge"), dict) and isinstance(out["judge"].get("model"), dict):
        out["judge"] = dict(out["judge"], model=comparable(out["judge"]["model"]))
    return out


def _judge_settings(judge, backend) -> dict:
    judge_model = judge.backend
    return {
        "mode": judge.mode,
        "map_rule": judge.map_rule if isinstance(judge.map_rule, str) else "custom",
        "use_global": judge.use_global,
        "use_local": judge.use_local,
        "region_view": judge.region_view,
        "region_proposer": repr(judge.region_proposer),
        "downsample_mode": judge.downsample_mode,
        "frozen": judge.frozen,
        "model": "the generating model" if judge_model is backend else model_signature(judge_model),
    }


def store_manifest(backend, prompts: list[str], judge, generation: GenerationConfig, seed: int, shard_size: int,
                   num_generations: int, source: dict | None = None) -> dict:
    """What a rollout store records about the run that makes it: the prompts, the model (weights fingerprint,
    dtype, sampler settings), the sampling settings, the judge, and (for people) where the model came from."""
    return {
        "format": 2,
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_fingerprint(prompts),
        "shard_size": shard_size,
        "num_generations": num_generations,
        "seed": seed,
        "guidance": generation.guidance,
        "temperature": generation.temperature,
        "top_k": generation.top_k,
        "batch_size": generation.batch_size,
        "model": model_signature(backend),
        "judge": _judge_settings(judge, backend),
        "source": dict(source or {}),
    }


def _check_or_write_manifest(out_dir: str, manifest: dict) -> None:
    path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(path):
        diff = settings_diff(_for_comparison(read_manifest(path)), _for_comparison(manifest))
        if diff:
            raise ValueError(
                f"{out_dir} holds rollouts made with other settings, so they cannot be resumed or extended with these:"
                "\n  " + "\n  ".join(diff) + "\nResume with the model, adapter, dtype and flags that made it, or write "
                "to a new folder."
            )
        return
    if _shard_indices(out_dir):
        raise ValueError(
            f"{out_dir} holds rollout shards but no {MANIFEST}: what made them is unknown, so they cannot be resumed "
            f"or extended. Restore {MANIFEST}, or write to a new folder."
        )
    write_manifest(path, manifest)


def _shard_problem(path: str, expected_rows: int, expected_prompts: list[str] | None = None) -> str | None:
    """Why the shard folder at `path` cannot be used (None when it is whole): unreadable, or not the rows it
    should hold. Its Arrow files are read through as streams (not memory-mapped, where a file cut short would crash
    the process instead of raising)."""
    import pyarrow as pa

    try:
        state = read_manifest(os.path.join(path, "state.json"))
        prompts = []
        for entry in state["_data_files"]:
            with pa.OSFile(os.path.join(path, entry["filename"])) as source:
                prompts += pa.ipc.open_stream(source).read_all().column("prompt").to_pylist()
    except Exception as error:  # noqa: BLE001 - any failure to read it is reported with its cause
        first = str(error).splitlines()[0] if str(error) else ""
        return f"cannot be read ({type(error).__name__}: {first})"
    if len(prompts) != expected_rows:
        return f"holds {len(prompts)} rows instead of {expected_rows}"
    if expected_prompts is not None and prompts != expected_prompts:
        return "holds other prompts than the prompt list gives for it"
    return None


def _shard_prompts(prompts: list[str], k: int, shard_size: int, num_generations: int) -> list[str]:
    return [p for p in prompts[k * shard_size : (k + 1) * shard_size] for _ in range(num_generations)]


def build_rollouts(
    backend,
    prompts: list[str],
    judge,
    out_dir: str,
    generation: GenerationConfig | None = None,
    seed: int = 0,
    shard_size: int = 64,
    progress: bool = True,
    num_generations: int = 1,
    source: dict | None = None,
) -> Dataset:
    """Generate and judge `prompts` into the store at `out_dir`, resuming whatever is already there.

    Args:
        backend: the generating [`UMMBackend`]; `judge` is bound to it when it has no model of its own.
        prompts: the prompt list; shard k covers prompts `k * shard_size` to `(k + 1) * shard_size - 1`.
        judge: a [`UMMJudgeRewardFunction`].
        out_dir: the store folder (created if needed).
        generation: sampling settings; shard k is sampled with seed `seed + k`.
        num_generations: images per prompt, stored next to each other with the prompt's index in the `group`
            column (for `reward_baseline="prompt"`, which compares the images of one prompt).
        source: where the model came from (e.g. `{"model": path, "adapter": path}`), recorded for people.

    The store's `rollout_config.json` records the prompts, the model (a fingerprint of its weights and adapters,
    its dtype and sampler settings), the sampling and judge settings; a run with other ones is refused, and so is
    a folder holding shards without that file. A shard that is cut short or unreadable is named and made again.
    """
    generation = generation or GenerationConfig()
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}.")
    if getattr(backend, "token_kind", "discrete") != "discrete":
        raise ValueError(f"The rollout store holds discrete image tokens; {type(backend).__name__} makes "
                         f"{backend.token_kind} latents. Train it on rollouts made on the fly (a prompt dataset).")
    backend.check_prompts(prompts)
    judge.bind(backend)
    judge.check_prompts(prompts)
    os.makedirs(out_dir, exist_ok=True)
    _check_or_write_manifest(out_dir, store_manifest(backend, prompts, judge, generation, seed, shard_size,
                                                     num_generations, source))
    num_shards = (len(prompts) + shard_size - 1) // shard_size
    todo = []
    for k in range(num_shards):
        final = os.path.join(out_dir, _shard_name(k))
        if not os.path.isdir(final):
            todo.append(k)
            continue
        expected = _shard_prompts(prompts, k, shard_size, num_generations)
        problem = _shard_problem(final, len(expected), expected)
        if problem is not None:
            warn(f"{final} {problem}: it is made again.")
            shutil.rmtree(final)
            todo.append(k)
    for k in tqdm(todo, desc="rollout shards", disable=not progress):
        batch = _shard_prompts(prompts, k, shard_size, num_generations)
        rollout = backend.generate(batch, generation, seed=seed + k)
        maps = judge.judge(rollout.images, rollout.prompts, rollout.grid, pixels=rollout.pixels)
        rewards = [judge.scalar(m) for m in maps]
        rows = rollout_rows(rollout, maps, rewards)
        first = k * shard_size
        rows["group"] = [first + j // num_generations for j in range(len(batch))]
        shard = Dataset.from_dict(rows, features=FEATURES)
        final = os.path.join(out_dir, _shard_name(k))
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shard.save_to_disk(tmp)
        os.replace(tmp, final)
    return load_rollouts(out_dir)


def load_rollouts(path: str, allow_partial: bool = False) -> Dataset:
    """The rows of a rollout store, in prompt order, as one dataset, after checking it against its manifest.

    Raises a ValueError naming the file when `rollout_config.json` is missing or unreadable, when a shard is cut
    short, unreadable or holds the wrong number of rows, or when a shard lies outside the store's prompt range. A
    store whose run was stopped before its last shard is partial: an error unless `allow_partial` (then a warning
    says how much is missing).
    """
    if not os.path.isdir(path):
        raise ValueError(f"Rollout store {path!r} is not a folder.")
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise ValueError(f"{path} has no {MANIFEST}: it is not a rollout store (`srum-trl rollout` writes one), or "
                         "the file was deleted.")
    manifest = read_manifest(manifest_path)
    try:
        num_prompts, shard_size = int(manifest["num_prompts"]), int(manifest["shard_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{manifest_path} lacks num_prompts / shard_size: it was not written by srum_trl.") from None
    num_generations = int(manifest.get("num_generations", 1))
    num_shards = (num_prompts + shard_size - 1) // shard_size
    present = _shard_indices(path)
    stray = [k for k in present if k >= num_shards]
    if stray:
        raise ValueError(f"{path} holds {_shard_name(stray[0])}, beyond the {num_shards} shards its {MANIFEST} "
                         f"describes ({num_prompts} prompts, {shard_size} per shard): it mixes stores.")
    shards = []
    for k in present:
        expected = (min(num_prompts, (k + 1) * shard_size) - k * shard_size) * num_generations
        shard_path = os.path.join(path, _shard_name(k))
        problem = _shard_problem(shard_path, expected)
        if problem is not None:
            raise ValueError(f"{shard_path} {problem}. Run `srum-trl rollout` (build_rollouts) again with the same "
                             "settings: it makes that shard again.")
        shards.append(load_from_disk(shard_path))
    missing = [k for k in range(num_shards) if k not in present]
    if missing:
        message = (f"{path} is partial: {num_shards - len(missing)} of its {num_shards} shards are complete (missing "
                   f"{', '.join(_shard_name(k) for k in missing[:3])}{', ...' if len(missing) > 3 else ''}). Run "
                   "`srum-trl rollout` again with the same settings to complete it")
        if not allow_partial:
            raise ValueError(message + ", or allow a partial store (allow_partial=True; `--allow_partial_rollouts` "
                             "for `srum-trl train`).")
        warn(message + "; using the complete shards only.")
    if not shards:
        raise ValueError(f"{path} holds no complete rollout shard.")
    dataset = concatenate_datasets(shards)
    if not missing:
        prompts = dataset["prompt"][::num_generations]
        if prompts_fingerprint(prompts) != manifest.get("prompts_sha256"):
            raise ValueError(f"{path}: the stored prompts are not the ones its {MANIFEST} records; the shards come "
                             "from another run.")
    return dataset


def reward_map_from_row(row: dict) -> RewardMap:
    """Rebuild a [`RewardMap`] (without its pixel map) from a stored row, e.g. to draw it."""
    regions = [Region(tuple(r["box"]), r["score"], r.get("label", "")) for r in row["regions"]]
    token_map = np.asarray(row["token_map"], dtype=np.float32)
    g = row["global_score"]
    g = None if g is None or (isinstance(g, float) and np.isnan(g)) else float(g)
    return RewardMap(g, regions, token_map, token_map, row.get("rule") or "srum")
