"""SRUMTrainer: self-rewarding fine-tuning of a unified multimodal model (SRUM, arXiv 2510.12784).

One step, linear:
  1. rollouts: the current policy generates an image for each prompt (or a stored rollout dataset is read);
  2. judging: the judge (by default the model's own understanding side) scores each image globally and per region
     and turns the scores into a reward map R on the token grid;
  3. loss: `mean over image tokens of (R - b + lambda) * per-token generation loss`, the per-token loss coming from
     the backend (cross-entropy of image tokens on the logits that sampled them, by default); b is 0 (the paper's),
     the round's mean weight (`reward_baseline="batch"`) or the mean weight of the round's images of the same prompt
     (`reward_baseline="prompt"`, with `num_generations` images per prompt).
"""

from __future__ import annotations

import math
import time

import torch
from accelerate.utils import gather_object
from torch.utils.data import Sampler
from trl.trainer.utils import RepeatSampler, nanstd

from ..data.rollouts import check_rollout_rows, is_rollout_dataset, rows_to_rollout
from ..models import GenerationConfig
from ..rewards import RewardMap, UMMJudgeRewardFunction, global_weight
from ..warn import warn
from .base import UMMTrainerBase, identity_collator, nanmean
from .credit import object_credit, position_baselines, prompt_baselines
from .common import (check_prompts_fit, check_rewards, check_train_dataset, func_name, resolve_backend,
                     resolve_judge, weighted_nanmean)
from .srum_config import SRUMConfig

_CITATION = """\
@article{jin2025srum,
    title   = {{SRUM: Fine-Grained Self-Rewarding for Unified Multimodal Models}},
    author  = {Weiyang Jin and Yuwei Niu and Jiaqi Liao and Chengqi Duan and Aoxue Li and Shenghua Gao and Xihui Liu},
    journal = {arXiv preprint arXiv:2510.12784},
    year    = {2025}
}"""


def check_offline_groups(group_size: int, args: SRUMConfig) -> None:
    """A rollout store's images per prompt against the config: rounds hold whole groups."""
    grouped = [f"reward_baseline={args.reward_baseline!r}"] if args.reward_baseline in ("prompt", "position") else []
    grouped += ["local_credit='object'"] if args.local_credit == "object" else []
    if grouped and group_size == 1:
        raise ValueError(
            f"{' and '.join(grouped)} compare the images of one prompt, but this rollout store holds one image per "
            "prompt (every weight would average to 0): make the store with several images per prompt "
            "(`srum-trl rollout --num_generations 8`, or build_rollouts(..., num_generations=8)) and set "
            "num_generations to the same number."
        )
    if group_size != args.num_generations:
        raise ValueError(
            f"The rollout store holds {group_size} image(s) per prompt but num_generations={args.num_generations}: "
            f"set num_generations={group_size}, so that each round holds whole groups."
        )


class GroupRowSampler(Sampler):
    """Rows of whole prompt groups: `groups` is a sampler over group indices that repeats each index G times in a
    row (TRL's `RepeatSampler` with `mini_repeat_count=G`); the j-th repeat becomes the group's j-th row."""

    def __init__(self, groups: Sampler, rows: list[list[int]]):
        self.groups, self.rows = groups, rows
        self.size = len(rows[0])

    def __iter__(self):
        for i, g in enumerate(self.groups):
            yield self.rows[g][i % self.size]

    def __len__(self) -> int:
        return len(self.groups)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.groups, "set_epoch"):  # the epoch's order of the groups (`EpochRepeatSampler`)
            self.groups.set_epoch(epoch)


class SRUMTrainer(UMMTrainerBase):
    """Trainer for SRUM, on TRL's trainer base (logging, checkpoints, model cards, `push_to_hub`).

    Args:
        model: a model folder / Hub id, a `PreTrainedModel` of a supported family, or a [`UMMBackend`].
        reward_funcs: `None` (the model judges itself with the config's judge settings), a
            [`UMMJudgeRewardFunction`] (e.g. another model as judge), or a list holding at most one judge plus plain
            callables with TRL's signature `(prompts, completions, **kwargs) -> list[float]` (the dataset's other
            columns and `trainer_state` come as keyword arguments), whose weighted mean (`reward_weights`; values in
            [-1, 1], NaN skipped) replaces the judge's global score; the judge then only scores regions.
        args: an [`SRUMConfig`].
        train_dataset: a `datasets.Dataset` with a "prompt" column (rollouts made on the fly), or a rollout
            dataset written by `srum_trl.data.build_rollouts` / `srum-trl rollout` (the paper's offline pipeline).
        eval_dataset: prompts for `evaluate()`: loss and rewards of fresh rollouts.
        processing_class: the processor, when `model` is a model object.
        callbacks, optimizers: as in `transformers.Trainer`.
        peft_config: a PEFT config; the model is wrapped with `get_peft_model` and only adapters train.
    """

    _tag_names = ["trl", "srum", "srum-trl", "self-rewarding", "text-to-image"]
    _name = "SRUM"
    _paper = {
        "title": "SRUM: Fine-Grained Self-Rewarding for Unified Multimodal Models",
        "id": "2510.12784",
        "citation": _CITATION,
    }
    def __init__(
        self,
        model,
        reward_funcs=None,
        args: SRUMConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = SRUMConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-SRUM")
        if not isinstance(args, SRUMConfig):
            raise ValueError(f"args must be an SRUMConfig, got {type(args).__name__}.")
        check_train_dataset(train_dataset)
        check_train_dataset(eval_dataset, "eval_dataset")
        self.backend = resolve_backend(model, args, processing_class, peft_config)
        self.judge, self.reward_funcs = resolve_judge(reward_funcs, args, self.backend)
        self.reward_weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} plain "
                             "reward functions (the UMMJudgeRewardFunction, which makes the maps, takes none).")
        for dataset, label in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            check_prompts_fit(dataset, self.backend, [self.judge], label)
        self.offline = train_dataset is not None and is_rollout_dataset(train_dataset)
        self._groups = None  # offline: the row indices of each prompt's images
        if self.offline:
            self._groups = check_rollout_rows(train_dataset, self.backend.token_grid)
            check_offline_groups(len(self._groups[0]), args)
        if self.offline and "image" in train_dataset.column_names:
            train_dataset = train_dataset.remove_columns("image")  # training reads tokens and maps only
        self.generation = GenerationConfig(
            guidance=args.guidance_scale,
            temperature=args.temperature,
            top_k=args.top_k,
            batch_size=args.generation_batch_size or args.per_device_train_batch_size * args.steps_per_generation,
        )
        super().__init__(
            model=self.backend.model,
            args=args,
            data_collator=identity_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=self.backend.processor,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        round_size = args.per_device_train_batch_size * args.steps_per_generation * self.accelerator.num_processes
        prompts = len(self._groups) if self.offline else len(train_dataset) if train_dataset is not None else None
        if prompts is not None and prompts < round_size // args.num_generations:
            raise ValueError(
                f"train_dataset has {prompts} {'prompt groups' if self.offline else 'rows'}, fewer than one round of "
                "rollouts needs "
                f"({round_size} = per_device_train_batch_size x steps_per_generation x processes, over "
                f"num_generations={args.num_generations}): lower those or add prompts."
            )
        grouped = [f"reward_baseline={args.reward_baseline!r}"] if args.reward_baseline in ("prompt", "position") else []
        grouped += ["local_credit='object'"] if args.local_credit == "object" else []
        if grouped and args.num_generations == 1:
            raise ValueError(
                f"{' and '.join(grouped)} compares the images of one prompt, but num_generations=1 samples one image "
                "per prompt (every weight would be 0): set num_generations >= 2."
            )
        if self.offline and (args.reward_baseline == "position" or args.local_credit == "object"):
            raise ValueError(
                "reward_baseline='position' and local_credit='object' compare the images of one prompt within a round "
                "of on-the-fly rollouts; a stored rollout dataset has no such rounds: train on prompts instead."
            )
        if eval_dataset is not None and args.per_device_eval_batch_size % args.num_generations != 0:
            raise ValueError(
                f"per_device_eval_batch_size ({args.per_device_eval_batch_size}) must be divisible by num_generations "
                f"({args.num_generations}): an eval batch holds whole groups."
            )
        if args.importance_sampling_correction and self.offline:
            raise ValueError("importance_sampling_correction compares the sampler's log-probabilities with the "
                             "policy's at sampling time: it needs on-the-fly rollouts, not a rollout store.")
        self._check_sampling_correction()
        self._init_state()
        self._last_round: tuple | None = None

    # ------------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self):
        # One dataloader batch = one generation round (per-device batch x steps_per_generation prompts), repeated
        # steps_per_generation times so that the Trainer's step count stays right; `_prepare_inputs` slices it.
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _train_sampler_layout(self) -> dict:
        # one chunk = the round of every process; accelerate deals its consecutive batches out to the processes.
        # Offline rollouts are rows already: whole prompt groups are drawn, each row once.
        repeats = self.args.num_generations
        round_size = self._train_batch_size * self.args.steps_per_generation * self.accelerator.num_processes
        return dict(mini_repeat_count=repeats, batch_size=round_size // repeats,
                    repeat_count=self.args.steps_per_generation, shuffle=True)

    def _get_train_sampler(self, dataset=None):
        if not self.offline:
            return super()._get_train_sampler(dataset)
        return GroupRowSampler(super()._get_train_sampler(self._groups), self._groups)

    def _get_eval_sampler(self, eval_dataset) -> Sampler:
        return RepeatSampler(data_source=eval_dataset, mini_repeat_count=self.args.num_generations, shuffle=False)

    # ------------------------------------------------------------------------------------------- rollouts
    def _judge(self, rollout, mode: str, columns: dict | None = None) -> tuple[list[RewardMap], list[float]]:
        prompts, images = rollout.prompts, rollout.images
        metrics = self._metrics[mode]
        global_scores = None
        if self.reward_funcs:
            per_func = []
            for f in self.reward_funcs:
                values = f(prompts=prompts, completions=images, trainer_state=self.state, **(columns or {}))
                values = check_rewards(values, len(images), func_name(f))
                for v in values:
                    if not math.isnan(v) and not -1.0 <= v <= 1.0:
                        raise ValueError(f"Reward function {func_name(f)!r} returned {v}; SRUM needs values in [-1, 1].")
                gathered = self._gather(values)
                metrics[f"rewards/{func_name(f)}/mean"].append(nanmean(gathered))
                missing = sum(math.isnan(v) for v in gathered)
                metrics[f"rewards/{func_name(f)}/missing_frac"].append(missing / len(gathered))
                if missing == len(gathered):
                    warn(f"Reward function {func_name(f)!r} returned no score (None or NaN) for any of the "
                         f"{len(gathered)} images of this round; images that no function scores get no global score "
                         "and are left out of the loss (metric rewards/<name>/missing_frac).")
                per_func.append(values)
            global_scores = [weighted_nanmean(col, self.reward_weights) for col in zip(*per_func)]  # NaN: none scored
        unparsed_before = self.judge.stats["unparsed"]
        maps = self.judge.judge(images, prompts, rollout.grid, global_scores=global_scores, pixels=rollout.pixels)
        rewards = [UMMJudgeRewardFunction.scalar(m) for m in maps]
        if global_scores is None:  # otherwise the scalar is the plain functions' score, logged above
            metrics[f"rewards/{func_name(self.judge)}/mean"].append(nanmean(self._gather(rewards)))
        if self.judge.mode == "text":
            metrics["judge/unparsed"].append(sum(self._gather([self.judge.stats["unparsed"] - unparsed_before])))
        return maps, rewards

    def _make_round(self, batch: list[dict], mode: str) -> dict:
        """Generate (or read) and judge one round of rollouts (this process's share); log the statistics of the
        whole round, gathered over the processes."""
        metrics = self._metrics[mode]
        if self.offline and mode == "train":
            columns = {k: [row[k] for row in batch] for k in batch[0]}
            rollout, weights = rows_to_rollout(columns)
            rewards = [float(r) for r in columns.get("reward", [math.nan] * len(batch))]
            maps = None
        else:
            prompts = [row["prompt"] for row in batch]
            t0 = time.perf_counter()
            rollout = self._as_forward(self.backend.generate, prompts, self.generation, seed=self._seed("rollout"))
            t1 = time.perf_counter()
            columns = {k: [row[k] for row in batch] for k in batch[0] if k not in ("prompt", "completion")}
            extra = (columns,) if columns else ()  # a `_judge(rollout, mode)` override keeps working
            maps, rewards = self._as_forward(self._judge, rollout, mode, *extra)
            metrics["timing/generate_s"].append(t1 - t0)
            metrics["timing/judge_s"].append(time.perf_counter() - t1)
            if self.args.local_credit == "object":  # the global score's map alone; regions add credit below
                weights = torch.tensor([global_weight(m.global_score, self.judge.map_rule) for m in maps])
                weights = weights[:, None].expand(-1, rollout.grid[0] * rollout.grid[1]).contiguous()
            else:
                weights = torch.stack([torch.from_numpy(m.token_map.reshape(-1)) for m in maps])
            self._last_round = (rollout, maps)
            if rollout.guidance_margin is not None:
                metrics["guidance_margin"].append(nanmean(self._gather(rollout.guidance_margin.tolist())))
            self._log_map_stats(metrics, maps)
        rewards = self._gather(rewards)
        metrics["reward"].append(nanmean(rewards))
        metrics["reward_std"].append(float(nanstd(torch.tensor(rewards))) if len(rewards) > 1 else 0.0)
        # an image without a verdict (NaN map: no global score) gets weight 0 in `compute_loss`
        metrics["srum/unscored_frac"].append(nanmean(self._gather(torch.isnan(weights).any(dim=1).float().tolist())))
        image_means = self._gather(weights.float().mean(dim=1).tolist())  # equal token counts per image
        metrics["srum/token_weight"].append(nanmean(image_means))
        baseline, weights = self.args.reward_baseline, weights.float()
        if baseline in ("prompt", "position") or self.args.local_credit == "object":
            prompts = self._gather_objects(list(rollout.prompts))
            index = self.accelerator.process_index
            mine = slice(index * len(rollout), (index + 1) * len(rollout))  # every process holds as many images
        if baseline == "batch":
            weights = weights - nanmean(image_means)
        elif baseline == "prompt":
            weights = weights - torch.tensor(prompt_baselines(prompts, image_means)[mine], dtype=torch.float32)[:, None]
        elif baseline == "position":
            every = torch.tensor(self._gather_objects(weights.tolist()), dtype=torch.float32)
            weights = weights - position_baselines(prompts, every)[mine]
        if self.args.local_credit == "object" and maps is not None:
            regions = self._gather_objects([[(r.label, r.score, r.box) for r in m.regions] for m in maps])
            credit = object_credit(prompts, regions, rollout.images[0].size, rollout.grid)[mine]
            metrics["srum/object_credit"].append(nanmean(self._gather([float(credit.abs().mean())])))
            weights = weights + self.args.local_credit_weight / 4 * credit
        round_ = {"rollout": rollout, "weights": weights}
        if mode == "train" and self.args.importance_sampling_correction:
            train_logps = self._as_forward(self._batched_logprobs, self.backend, rollout).cpu()
            round_["is_ratio"] = self._sampling_correction(metrics, rollout, train_logps)
        return round_

    def _gather_objects(self, values: list) -> list:
        """`values` (picklable, one per local image) of every process, concatenated in process order."""
        return gather_object(values) if self.accelerator.num_processes > 1 else values

    def _prepare_inputs(self, batch):
        mode = "train" if self.model.training else "eval"
        if mode == "eval":
            return self._make_round(batch, mode)
        spg = self.args.steps_per_generation
        if self._step % spg == 0 or self._buffer is None:
            round_ = self._make_round(batch, mode)
            size = math.ceil(len(round_["rollout"]) / spg)
            self._buffer = [
                {key: value.select(slice(i, i + size)) if key == "rollout" else value[i : i + size]
                 for key, value in round_.items()}
                for i in range(0, len(round_["rollout"]), size)
            ]
        return self._buffer[self._step % len(self._buffer)]

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rollout, weights = inputs["rollout"], inputs["weights"]
        dropout = self.args.text_dropout if model.training else 0.0
        with self.backend.using(model):  # through the DDP / FSDP wrapper, so gradients are synchronised
            per_token = self._as_forward(
                self.backend.token_losses, rollout.prompts, rollout, self.args.loss_guidance, dropout,
                generator=self._generator("loss"),
            )
        # an image whose map is NaN (no verdict: unparsed answer, reward functions without a score) is left out
        weight = torch.nan_to_num(weights.to(per_token.device, per_token.dtype) + self.args.constraint_weight, nan=0.0)
        if "is_ratio" in inputs:
            weight = weight * inputs["is_ratio"].to(per_token.device, per_token.dtype)
        loss = (weight * per_token).mean()  # every process holds as many images: DDP / FSDP's mean is the global one
        mode = "train" if model.training else "eval"
        first_of_round = self._step % self.args.steps_per_generation == 0
        if mode == "train" and first_of_round and rollout.logprobs is not None and "is_ratio" not in inputs:
            policy = self._policy_logps(rollout, per_token, self.args.loss_guidance)
            self._log_sampling_mismatch(self._metrics[mode], policy, rollout.logprobs)
        self._metrics[mode]["srum/token_loss"].append(nanmean(self._gather([float(per_token.detach().mean())])))
        return (loss, None) if return_outputs else loss

    # ---------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict, start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.args.save_reward_maps and self._last_round is not None and self.is_world_process_zero():
            self._save_reward_maps()

    def _log_map_stats(self, metrics, maps: list[RewardMap]) -> None:
        g = self._gather([m.global_score for m in maps if m.global_score is not None])
        local = self._gather([s for m in maps for s in m.local_scores])
        if g:
            metrics["srum/global_score"].append(nanmean(g))
        if local:
            metrics["srum/local_score"].append(nanmean(local))
