"""GRPOUMMTrainer: GRPO and self-SFT on the image tokens of a unified multimodal model (UniRL, arXiv 2505.23380).

One generation round:
  1. rollouts: the dataloader repeats each prompt `num_generations` (G) times; the current policy samples one image
     per row with classifier-free guidance;
  2. rewards: every reward function scores every image (a [`UMMJudgeRewardFunction`] also returns its reward maps);
     the reward is the NaN-skipping weighted sum over functions, the advantage `A = (r - mean_group r) / (std + 1e-4)`;
  3. loss (mode "grpo"): TRL's clipped surrogate on the per-token log-probabilities of the guided logits that sampled
     the tokens, with optional k3 KL to the adapters-disabled model, aggregated by `loss_type`. With
     `advantage_mode="dense"` each token's advantage is modulated by the judge's reward map ([`dense_advantages`]).
     Mode "sft": cross-entropy on the model's own images (optionally only the best of each group).

Flow-matching backends (BAGEL) take the same steps on their continuous latents (Flow-GRPO): rollouts from the SDE
sampler, log-probabilities per denoising step and latent token (`flow_grpo.FlowGRPOMixin`).

The loss core is a pure function over tensors, [`grpo_loss`], tested against hand computations.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch.utils.data import Sampler
from trl.trainer.utils import RepeatSampler, nanstd

from ..data.rollouts import is_rollout_dataset
from ..models import GenerationConfig, UMMBackend
from ..rewards import UMMJudgeRewardFunction
from .base import UMMTrainerBase, identity_collator, nanmean
from .common import check_prompts_fit, check_rewards, check_train_dataset, default_judge, func_name, resolve_backend
from .flow_grpo import FlowGRPOMixin
from .grpo_config import GRPOUMMConfig
from .grpo_loss import (
    combine_rewards,
    dense_advantages,
    group_advantages,
    grpo_loss,
    normalise_token_map,
)

_CITATION = """\
@article{mao2025unirl,
    title   = {{UniRL: Self-Improving Unified Multimodal Models via Supervised and Reinforcement Learning}},
    author  = {Weijia Mao and Zhenheng Yang and Mike Zheng Shou},
    journal = {arXiv preprint arXiv:2505.23380},
    year    = {2025}
}"""


class GRPOUMMTrainer(FlowGRPOMixin, UMMTrainerBase):
    """GRPO (and self-SFT) for unified multimodal models on TRL's trainer base, with TRL's GRPO names.

    Args:
        model: a model folder / Hub id, a `PreTrainedModel` of a supported family, or a [`UMMBackend`].
        reward_funcs: `None` (the model judges itself with the config's judge settings), or a reward function or a
            list of them: [`UMMJudgeRewardFunction`]s (the first one's reward maps drive dense advantages) and plain
            callables with TRL's signature `(prompts, completions, **kwargs) -> list[float]`, `completions` being
            PIL images; the dataset's other columns and `trainer_state` come as keyword arguments. `None`/NaN
            values are skipped.
        args: a [`GRPOUMMConfig`].
        train_dataset: a `datasets.Dataset` with a "prompt" column.
        eval_dataset: prompts for `evaluate()` (loss and rewards of fresh rollouts).
        processing_class: the processor, when `model` is a model object.
        callbacks, optimizers: as in `transformers.Trainer`.
        peft_config: a PEFT config; the model is wrapped with `get_peft_model` and only adapters train. Then the KL
            reference (`beta > 0`) is the model with adapters disabled.
    """

    _tag_names = ["trl", "grpo", "unirl", "srum-trl", "text-to-image"]
    _name = "GRPO"
    _paper = {
        "title": "UniRL: Self-Improving Unified Multimodal Models via Supervised and Reinforcement Learning",
        "id": "2505.23380",
        "citation": _CITATION,
    }
    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOUMMConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else type(model).__name__
            args = GRPOUMMConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-GRPO")
        if not isinstance(args, GRPOUMMConfig):
            raise ValueError(f"args must be a GRPOUMMConfig, got {type(args).__name__}.")
        for dataset, label in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            check_train_dataset(dataset, label)
            if dataset is not None and is_rollout_dataset(dataset):
                raise ValueError(f"{label} is a stored rollout dataset; GRPO samples its own images on-policy. "
                                 "Pass a prompt dataset (stored rollouts train with SRUMTrainer).")
        self.backend = resolve_backend(model, args, processing_class, peft_config)
        self._flow = args.mode == "grpo" and self.backend.token_kind == "continuous"
        if self._flow and type(self.backend).step_logprobs is UMMBackend.step_logprobs:
            raise ValueError(f"GRPO on continuous latents needs SDE step log-probabilities; "
                             f"{type(self.backend).__name__} has no `step_logprobs`. Use mode='sft'.")
        if args.importance_sampling_level == "step" and not self._flow:
            raise ValueError("importance_sampling_level='step' applies to flow-matching backends in mode='grpo'.")
        self.reward_funcs = self._resolve_reward_funcs(reward_funcs, args)
        self.reward_func_names = [func_name(f) for f in self.reward_funcs]
        weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward functions.")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.judge = next((f for f in self.reward_funcs if isinstance(f, UMMJudgeRewardFunction)), None)
        judges = [f for f in self.reward_funcs if isinstance(f, UMMJudgeRewardFunction)]
        for dataset, label in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset")):
            check_prompts_fit(dataset, self.backend, judges, label)
        if args.mode == "grpo" and args.advantage_mode == "dense" and self.judge is None:
            raise ValueError("advantage_mode='dense' needs a UMMJudgeRewardFunction in reward_funcs (its reward maps).")
        self.ref_backend = self._resolve_reference(args)
        self.num_generations = args.num_generations
        self.max_completion_length = args.max_completion_length or math.prod(self.backend.token_grid)
        round_size = args.generation_batch_size // args.world_size
        self.generation = GenerationConfig(
            guidance=args.guidance_scale,
            temperature=args.temperature,
            top_k=args.top_k,
            batch_size=args.generation_chunk_size or round_size,
            sde=args.sde_config() if self._flow else None,
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
        if self.ref_backend is not None and self.ref_backend is not self.backend:
            self.ref_backend.model.to(self.accelerator.device)
        self._check_sampling_correction()
        self._init_state()
        self._last_round = None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self.args.save_reward_maps and self._last_round is not None and self.is_world_process_zero():
            self._save_reward_maps()

    def _resolve_reward_funcs(self, reward_funcs, args) -> list:
        if reward_funcs is None:
            return [default_judge(args).bind(self.backend)]
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("reward_funcs is empty; pass at least one reward function (or None for the self-judge).")
        for f in funcs:
            if isinstance(f, UMMJudgeRewardFunction):
                f.bind(self.backend)
            elif not callable(f):
                raise ValueError(f"reward_funcs entries must be callables or UMMJudgeRewardFunction, got {f!r}.")
        return funcs

    def _resolve_reference(self, args):
        """The backend whose log-probs are the KL reference: `self.backend` under `frozen()` (PEFT), a frozen copy
        (`ref_model_copy`), or None when `beta == 0`."""
        if args.beta == 0.0:
            return None
        try:
            from peft import PeftModel

            is_peft = isinstance(self.backend.model, PeftModel)
        except ImportError:
            is_peft = False
        if is_peft:
            return self.backend
        if not args.ref_model_copy:
            raise ValueError(
                "beta > 0 needs a reference model: train LoRA adapters (pass peft_config; the reference is then the "
                "model with adapters disabled, no extra memory) or set ref_model_copy=True to keep a frozen copy."
            )
        ref = copy.copy(self.backend)
        ref.model = copy.deepcopy(self.backend.model).eval().requires_grad_(False)
        return ref

    # ------------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self):
        # One dataloader batch = one generation round on this process (per-device batch x steps_per_generation
        # rows, each prompt G times); `_prepare_inputs` slices it into micro-batches.
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _train_sampler_layout(self) -> dict:
        return dict(mini_repeat_count=self.num_generations,
                    batch_size=self.args.generation_batch_size // self.num_generations,
                    repeat_count=self.args.num_iterations * self.args.steps_per_generation,
                    shuffle=self.args.shuffle_dataset)

    def _get_eval_sampler(self, eval_dataset) -> Sampler:
        return RepeatSampler(data_source=eval_dataset, mini_repeat_count=self.num_generations, seed=self.args.seed)

    # ------------------------------------------------------------------------------------------- rollouts
    def _score(self, rollout, batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rewards `[n, F]` of the local images, and the first judge's token maps `[n, T]` on [0, 1] (or None)."""
        prompts, images = rollout.prompts, rollout.images
        extra = {k: [row[k] for row in batch] for k in batch[0] if k not in ("prompt", "completion")}
        columns, token_maps = [], None
        for f, name in zip(self.reward_funcs, self.reward_func_names):
            if isinstance(f, UMMJudgeRewardFunction):
                maps = f.judge(images, prompts, rollout.grid, pixels=rollout.pixels)
                values = [f.scalar(m) for m in maps]
                if f is self.judge:
                    self._last_round = (rollout, maps)
                    token_maps = torch.stack([
                        normalise_token_map(torch.from_numpy(m.token_map.reshape(-1)), m.rule) for m in maps
                    ])
            else:
                values = f(prompts=prompts, completions=images, trainer_state=self.state, **extra)
            columns.append(check_rewards(values, len(images), name))
        return torch.tensor(columns, dtype=torch.float32).T.contiguous(), token_maps

    def _generate_and_score(self, batch: list[dict], mode: str) -> dict:
        """Generate and score one round; return its advantages (or SFT weights) and log-probs, all local."""
        metrics, device, args = self._metrics[mode], self.accelerator.device, self.args
        prompts = [row["prompt"] for row in batch]
        t0 = time.perf_counter()
        generation = self._flow_generation() if self._flow else self.generation
        rollout = self._as_forward(self.backend.generate, prompts, generation, seed=self._seed("rollout"))
        t1 = time.perf_counter()
        judges = [f for f in self.reward_funcs if isinstance(f, UMMJudgeRewardFunction)]
        unparsed_before = sum(f.stats["unparsed"] for f in judges)
        local_rewards, token_maps = self._as_forward(self._score, rollout, batch)
        if any(f.mode == "text" for f in judges):  # unread answers: NaN rewards, left out of the group statistics
            unparsed = sum(f.stats["unparsed"] for f in judges) - unparsed_before
            metrics["judge/unparsed"].append(sum(self._gather([unparsed])))
        metrics["timing/generate_s"].append(t1 - t0)
        metrics["timing/reward_s"].append(time.perf_counter() - t1)
        rewards_per_func = self.accelerator.gather(local_rewards.to(device)).float().cpu()
        rewards = combine_rewards(rewards_per_func, self.reward_weights)
        advantages, zero_std = group_advantages(rewards, self.num_generations, args.scale_rewards)
        start = self.accelerator.process_index * len(prompts)
        local = slice(start, start + len(prompts))
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(float(torch.nanmean(rewards_per_func[:, i])))
            metrics[f"rewards/{name}/std"].append(float(nanstd(rewards_per_func[:, i])))
        metrics["reward"].append(float(torch.nanmean(rewards)))
        metrics["reward_std"].append(float(nanstd(rewards)))
        metrics["frac_reward_zero_std"].append(float(zero_std.float().mean()))
        metrics["completions/mean_length"].append(float(math.prod(rollout.grid)))
        if rollout.guidance_margin is not None:
            metrics["guidance_margin"].append(nanmean(self._gather(rollout.guidance_margin.tolist())))
        out = {"rollout": rollout}
        steps = args.steps_per_generation if mode == "train" else 1
        if args.mode == "sft":
            selected = torch.ones(len(rewards), dtype=torch.bool)  # rows of the whole round, over the processes
            if args.sft_best_of_n:
                scores = torch.nan_to_num(rewards, nan=-math.inf).view(-1, self.num_generations)
                best = torch.zeros_like(scores, dtype=torch.bool)
                best[torch.arange(scores.shape[0]), scores.argmax(dim=1)] = True
                selected = best.view(-1)
            out["sft_weights"] = selected[local].float()
            # The loss normaliser: the round's selected image tokens per process and micro-step (as "dapo" does),
            # so that the loss does not depend on how the selected rows fall on processes and micro-steps.
            out["num_items"] = float(selected.sum()) * math.prod(rollout.grid) / self.accelerator.num_processes / steps
            return out
        advantages = advantages[local]
        if args.advantage_mode == "dense":
            advantages = dense_advantages(advantages, token_maps)
        out["advantages"] = advantages
        if self._flow:
            return self._flow_finish_round(out, mode)
        generate_every = args.steps_per_generation * args.num_iterations
        out["old_logps"] = out["is_ratio"] = None
        correct = mode == "train" and args.importance_sampling_correction
        if mode == "train" and (args.gradient_accumulation_steps % generate_every != 0 or correct):
            out["old_logps"] = self._as_forward(self._batched_logprobs, self.backend, rollout).cpu()
            if correct:
                out["is_ratio"] = self._sampling_correction(metrics, rollout, out["old_logps"])
            elif rollout.logprobs is not None:
                self._log_sampling_mismatch(metrics, out["old_logps"], rollout.logprobs)
        out["ref_logps"] = None
        if self.ref_backend is self.backend:  # PEFT: the model with its adapters disabled
            with self.backend.frozen():
                out["ref_logps"] = self._as_forward(self._batched_logprobs, self.backend, rollout).cpu()
        elif self.ref_backend is not None:  # a frozen, unsharded copy
            out["ref_logps"] = self._batched_logprobs(self.ref_backend, rollout).cpu()
        tokens = float(len(rollout) * math.prod(rollout.grid))  # every image token counts: the mask is all ones
        total = float(self.accelerator.gather(torch.tensor([tokens], device=device)).sum())
        out["num_items"] = total / self.accelerator.num_processes / steps
        return out

    def _split(self, round_: dict) -> list[dict]:
        """Shuffle a round and cut it into `steps_per_generation` micro-batches (SFT: only rows of weight > 0)."""
        if self._flow:
            return self._flow_split(round_)
        spg = self.args.steps_per_generation
        n = len(round_["rollout"])
        if self.args.mode == "sft":
            rows = [i for i in range(n) if round_["sft_weights"][i] > 0]
            rows = [rows[i] for i in torch.randperm(len(rows)).tolist()]
            size = max(math.ceil(len(rows) / spg), 1)
            batches = []
            for i in range(spg):  # exactly spg micro-batches: no selected row is served twice
                chunk = rows[i * size : (i + 1) * size]
                weights = torch.ones(len(chunk))
                if not chunk:  # nothing left here for this micro-step: one zero-weight row keeps the step defined
                    chunk, weights = [0], torch.zeros(1)
                batches.append({"rollout": round_["rollout"].select(chunk), "sft_weights": weights,
                                "num_items": round_["num_items"]})
            return batches
        perm = torch.randperm(n).tolist()
        size = math.ceil(n / spg)
        batches = []
        for i in range(0, n, size):
            rows = perm[i : i + size]
            item = {"rollout": round_["rollout"].select(rows), "advantages": round_["advantages"][rows],
                    "num_items": round_["num_items"]}
            for key in ("old_logps", "ref_logps", "is_ratio"):
                item[key] = round_[key][rows] if round_[key] is not None else None
            batches.append(item)
        return batches

    def _prepare_inputs(self, batch):
        mode = "train" if self.model.training else "eval"
        if mode == "eval":
            return self._generate_and_score(batch, mode)
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._step % generate_every == 0 or self._buffer is None:
            self._buffer = self._split(self._generate_and_score(batch, mode))
        return self._buffer[self._step % self.args.steps_per_generation % len(self._buffer)]

    # ------------------------------------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        rollout = inputs["rollout"]
        # the round's first micro-step: the weights are still those that sampled it
        first_of_round = self._step % (self.args.steps_per_generation * self.args.num_iterations) == 0
        if self.args.mode == "sft":
            dropout = self.args.sft_text_dropout if model.training else 0.0
            with self.backend.using(model):  # through the DDP / FSDP wrapper, so gradients are synchronised
                per_token = self._as_forward(
                    self.backend.token_losses, rollout.prompts, rollout, self.args.sft_loss_guidance, dropout,
                    generator=self._generator("loss"),
                )
            if mode == "train" and first_of_round and rollout.logprobs is not None:
                self._log_sampling_mismatch(self._metrics[mode], self._policy_logps(
                    rollout, per_token, self.args.sft_loss_guidance), rollout.logprobs)
            weights = inputs["sft_weights"].to(per_token.device, per_token.dtype)
            normaliser = inputs.get("num_items") or float(weights.sum()) * per_token.shape[1]
            loss = (weights[:, None] * per_token).sum() / max(normaliser, 1.0)
            # the selected images' mean per-token cross-entropy (this micro-step's share of the round's)
            self._metrics[mode]["sft/token_loss"].append(nanmean(self._gather([float(loss.detach())])))
            return (loss, None) if return_outputs else loss
        if self._flow:
            loss = self._flow_compute_loss(model, inputs, mode)
            return (loss, None) if return_outputs else loss
        with self.backend.using(model):
            logps = self._as_forward(self.backend.token_logprobs, rollout.prompts, rollout)
        old = inputs.get("old_logps")
        if mode == "train" and first_of_round and old is None and rollout.logprobs is not None:
            self._log_sampling_mismatch(self._metrics[mode], logps.detach(), rollout.logprobs)
        out = grpo_loss(
            logps,
            logps.detach() if old is None else old,
            inputs["advantages"],
            ref_per_token_logps=inputs.get("ref_logps"),
            beta=self.args.beta,
            epsilon_low=self.args.epsilon,
            epsilon_high=self.args.epsilon_high,
            loss_type=self.args.loss_type,
            importance_sampling_level=self.args.importance_sampling_level,
            max_completion_length=self.max_completion_length,
            num_items=inputs.get("num_items"),
            importance_sampling_ratio=inputs.get("is_ratio"),
        )
        keys = list(out.metrics)
        gathered = self._gather([out.metrics[k] for k in keys])  # process after process
        for i, key in enumerate(keys):
            self._metrics[mode][key].append(nanmean(gathered[i :: len(keys)]))
        return (out.loss, None) if return_outputs else out.loss
