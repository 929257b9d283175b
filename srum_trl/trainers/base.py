"""What every self-rewarding trainer shares, on top of TRL's `_BaseTrainer`: a micro-step counter for rollout
buffers and seeds, metric averaging in `log`, gathering of logged values over processes, running the backend's calls
through an FSDP2-sharded model, loss-only evaluation, model cards in checkpoints, exact resumption, the sampler/trainer
log-prob mismatch, and keeping the progress of a run that fails."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import defaultdict

import torch
from accelerate.utils import gather_object
from trl.trainer.base_trainer import _BaseTrainer
from trl.trainer.utils import RepeatSampler

from .common import importance_sampling_ratio, logp_difference
from .resume import check_output_dir, derive_seed, load_extra_state, resolve_resume, save_extra_state

logger = logging.getLogger(__name__)

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # torch < 2.6: no FSDP2 under this name
    FSDPModule = ()


def nanmean(values) -> float:
    """Mean of the non-NaN values (NaN when there are none)."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(values) / len(values) if values else float("nan")


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one flag per device family
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def identity_collator(features):
    """Rows go to `_prepare_inputs` as they are (a list of dicts)."""
    return features


class UMMTrainerBase(_BaseTrainer):
    """Base of [`SRUMTrainer`] and [`GRPOUMMTrainer`]. Subclasses fill `self._metrics[mode][key]` lists; `log`
    averages them (NaN-skipping) under the same keys, prefixed with `eval_` in evaluation."""

    loss_is_scaled_for_ga = False

    def _init_state(self) -> None:
        self._step = 0  # micro-steps taken: which slice of the buffered rollout round to serve, and the seeds
        self._eval_step = 0  # evaluation batches taken: the seeds of evaluation
        self._buffer: list[dict] | None = None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._train_start_step: int | None = None  # global step of this `train()` call's first micro-step

    # ------------------------------------------------------------------------------------------ randomness
    def _seed(self, stream: str) -> int:
        """The seed of one draw: distinct per process and per micro-step (training) or evaluation batch, the same
        in a resumed run (see `derive_seed`). `stream`: "rollout" or "loss"."""
        training = self.model.training
        step = self._step if training else self._eval_step
        stream = stream if training else f"eval_{stream}"
        return derive_seed(self.args.seed, self.accelerator.process_index, step, stream, self.accelerator.num_processes)

    def _generator(self, stream: str) -> torch.Generator:
        """A CPU generator seeded with `_seed(stream)`."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self._seed(stream))
        return generator

    def _get_train_sampler(self, dataset=None):
        return EpochRepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset, seed=self.args.seed,
            **self._train_sampler_layout())

    def _gather(self, values) -> list[float]:
        """`values` (floats) of every process, concatenated in process order: the whole batch's, as one process
        holding it would have them. A collective: every process calls it, at the same point."""
        values = [float(v) for v in values]
        if self.accelerator.num_processes == 1:
            return values
        return gather_object(values)

    def _as_forward(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` under the accelerator's autocast, run as the forward of the model when FSDP2 shards
        it (otherwise simply called).

        Backends call the model's submodules directly (sampling, judging, log-probabilities, losses). Under FSDP2
        the wrapped layers gather their weights when called, but the root module's own weights (heads, VQ, vision
        tower, ...) are gathered only by a forward of the root: so `fn` becomes that forward for one call (TRL's
        forward redirection). Its result is handed back outside the forward's return value, which FSDP would cast
        to its output dtype (bf16 under accelerate's mixed precision: rewards and log-probabilities would lose
        their float32). Gradients still reach every shard: FSDP reduces the root's gradients at the end of the
        backward. Every process must make the same calls (collectives).
        """
        model = self.model
        if not isinstance(model, FSDPModule):
            with self._mixed_precision():  # mixed precision (`bf16=True`) also for calls that skip `forward`
                return fn(*args, **kwargs)
        own = vars(model).get("forward")  # e.g. accelerate's autocast wrapper

        def restore():
            if own is not None:
                model.forward = own
            else:
                vars(model).pop("forward", None)

        result = []

        def forward(*a, **k):
            restore()  # `fn` may call the model's real forward (the judge does)
            with self._mixed_precision():
                result.append(fn(*a, **k))

        model.forward = forward
        try:
            model(*args, **kwargs)
        finally:
            restore()
        return result[0]

    @contextlib.contextmanager
    def _mixed_precision(self):
        """The accelerator's autocast; while it is on, PEFT's LoRA layers also stop casting their input to the
        adapter's float32 (`peft.helpers.disable_input_dtype_casting`). That cast copies every adapted layer's input
        to float32 and autocast copies it back to bf16 for the matmul, a lossless round trip that cost about 70 ms of
        a 550 ms LoRA step at Janus-Pro-1B dimensions (docs/speed.md): without it the matmuls see the same bf16
        values."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.accelerator.autocast())
            device_type = self.accelerator.device.type
            if _autocast_on(device_type):
                from peft.helpers import disable_input_dtype_casting

                stack.enter_context(disable_input_dtype_casting(self.model))
            yield

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._train_start_step is None:
            self._train_start_step = self.state.global_step
        out = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return out

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        self._eval_step += 1
        return loss.detach(), None, None

    # ----------------------------------------------------------------------------- sampler / trainer log-probs
    @torch.no_grad()
    def _batched_logprobs(self, backend, rollout) -> torch.Tensor:
        """Per-token log-probabilities of `rollout` under `backend`'s policy, by micro-batches, without gradient."""
        size = self.args.per_device_train_batch_size
        parts = []
        for i in range(0, len(rollout), size):
            part = rollout.select(slice(i, i + size))
            parts.append(backend.token_logprobs(part.prompts, part).float())
        return torch.cat(parts)

    def _policy_logps(self, rollout, per_token: torch.Tensor, loss_guidance: str) -> torch.Tensor:
        """The training forward's log-probabilities of the rollout's tokens, given its per-token loss: the guided loss
        of a discrete backend is their negative (no second forward); otherwise one no-gradient forward."""
        if loss_guidance == "guided" and self.backend.token_kind == "discrete":
            return -per_token.detach().float()
        return self._as_forward(self._batched_logprobs, self.backend, rollout)

    def _log_sampling_mismatch(self, metrics, train_logps: torch.Tensor, sampling_logps: torch.Tensor) -> None:
        """TRL's `sampling/sampling_logp_difference/{mean,max}`: |log p of the training forward - log p recorded by
        the sampler| over the tokens, mean over processes of the means and max of the maxima. A collective."""
        mean, top = logp_difference(train_logps, sampling_logps)
        gathered = self._gather([mean, top])
        metrics["sampling/sampling_logp_difference/mean"].append(nanmean(gathered[0::2]))
        metrics["sampling/sampling_logp_difference/max"].append(max(gathered[1::2]))

    def _sampling_correction(self, metrics, rollout, train_logps: torch.Tensor) -> torch.Tensor:
        """The truncated (or masked) importance weights `exp(train - sampling)` of a round (TRL's correction for the
        sampler's numerics, `importance_sampling_*` fields), logged as `sampling/importance_sampling_ratio/*`, with
        the log-prob mismatch. A collective."""
        args = self.args
        sampling = rollout.logprobs.float().to(train_logps.device)
        self._log_sampling_mismatch(metrics, train_logps, sampling)
        ratio = importance_sampling_ratio(train_logps, sampling, args.importance_sampling_mode,
                                          args.importance_sampling_clip_min, args.importance_sampling_clip_max)
        flat = ratio.flatten()
        gathered = self._gather([float(flat.min()), float(flat.mean()), float(flat.max())])
        metrics["sampling/importance_sampling_ratio/min"].append(min(gathered[0::3]))
        metrics["sampling/importance_sampling_ratio/mean"].append(nanmean(gathered[1::3]))
        metrics["sampling/importance_sampling_ratio/max"].append(max(gathered[2::3]))
        return ratio

    def _check_sampling_correction(self) -> None:
        if getattr(self.args, "importance_sampling_correction", False) and self.backend.token_kind != "discrete":
            raise ValueError(
                "importance_sampling_correction needs the sampler's log-probabilities, which "
                f"{type(self.backend).__name__} ({self.backend.token_kind} tokens) does not record: set "
                "importance_sampling_correction=False."
            )

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            logs[prefix + key] = nanmean(values)
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def _save_reward_maps(self) -> None:
        """Pictures of the last round's first `save_reward_maps` images beside their reward maps: PNGs under
        `output_dir/reward_maps/` and images for the trackers (`_log_images`)."""
        from ..rewards import render_reward_map

        if self._last_round is getattr(self, "_pictured_round", None):
            return  # already drawn at an earlier log of the same round (e.g. the closing log of `train`)
        self._pictured_round = self._last_round
        rollout, maps = self._last_round
        folder = os.path.join(self.args.output_dir, "reward_maps")
        os.makedirs(folder, exist_ok=True)
        pictures = []
        for i in range(min(self.args.save_reward_maps, len(maps))):
            picture = render_reward_map(rollout.images[i], maps[i], rollout.prompts[i])
            picture.save(os.path.join(folder, f"step{self.state.global_step:06d}_{i}.png"))
            pictures.append((picture, rollout.prompts[i]))
        self._log_images("reward_maps", pictures)

    def _log_images(self, key: str, pictures: list) -> None:
        """Send `(image, caption)` pictures to the trackers of `report_to` that take images (trackio, W&B,
        TensorBoard), as `key/0`, `key/1`, ... at the current step. Trackers that are not running are skipped."""
        report = self.args.report_to or []
        if not pictures or not self.is_world_process_zero():
            return
        step = self.state.global_step
        named = {f"{key}/{i}": pair for i, pair in enumerate(pictures)}
        if "trackio" in report:
            import trackio

            if trackio.context_vars.current_run.get() is not None:
                trackio.log({**{k: trackio.Image(p, caption=c) for k, (p, c) in named.items()},
                             "train/global_step": step})
        if "wandb" in report:
            import wandb

            if wandb.run is not None:
                wandb.log({**{k: wandb.Image(p, caption=c) for k, (p, c) in named.items()}, "train/global_step": step})
        if "tensorboard" in report:
            import numpy as np

            for callback in self.callback_handler.callbacks:
                writer = getattr(callback, "tb_writer", None)
                if writer is not None:
                    for k, (p, _) in named.items():
                        writer.add_image(k, np.asarray(p.convert("RGB")), step, dataformats="HWC")

    def _save_checkpoint(self, model, trial):
        name = self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id else os.path.basename(
            os.path.normpath(self.args.output_dir))
        self.create_model_card(model_name=name)
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """`Trainer.train`, with these differences:

        - `resume_from_checkpoint` may also be "true" / "last" (the command line's spelling of True); True picks the
          last *complete* checkpoint in `output_dir` (one whose saving finished), and an incomplete one is refused.
          The resumed run continues the uninterrupted one exactly (micro-step counter, prompt order, the rollout round
          in progress, unlogged metrics: see `srum_trl.trainers.resume`).
        - without it, an `output_dir` that already holds checkpoints is refused unless `overwrite_output_dir`.
        - if training fails after optimizer steps of this call, the weights reached are saved to
          `output_dir/interrupted-step-N` before the error propagates (not under FSDP / DeepSpeed, where saving needs
          every process, nor when the failure came before the first step, e.g. loading a damaged checkpoint).
        """
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is None:
            check_output_dir(self.args.output_dir, getattr(self.args, "overwrite_output_dir", False))
        self._train_start_step = None
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            self._rescue_save()
            raise

    def _rescue_save(self) -> None:
        start = self._train_start_step
        if start is None or self.state.global_step <= start:
            return  # nothing trained in this call: the failure came before (e.g. a damaged checkpoint)
        folder = os.path.join(self.args.output_dir, f"interrupted-step-{self.state.global_step}")
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or getattr(self, "is_distributed_loading_by_transformers",
                                                                        False):
            logger.warning(
                "Training failed at step %d; the weights are sharded over the processes, and gathering them needs "
                "every process, which a failing one cannot count on: %s is not written. The last checkpoint "
                "(save_steps) holds the progress.", self.state.global_step, folder)
            return
        if self.is_world_process_zero():
            try:
                self._save(folder)  # no collective: the other processes may be gone
            except Exception as error:  # the original failure matters more
                logger.warning("Could not save %s: %s", folder, error)

    # ------------------------------------------------------------------------------ checkpointed extra state
    def _extra_state(self) -> dict:
        return {
            "micro_step": self._step,
            "eval_step": self._eval_step,
            "buffer": self._buffer,
            "metrics": {mode: dict(values) for mode, values in self._metrics.items()},
            "tr_loss": float(self._tr_loss) if getattr(self, "_tr_loss", None) is not None else None,
            "globalstep_last_logged": getattr(self, "_globalstep_last_logged", None),
        }

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        save_extra_state(output_dir, self.accelerator.process_index, self._extra_state())

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is None:
            return
        state = load_extra_state(checkpoint, self.accelerator.process_index)
        if state is None:
            logger.warning(
                "%s holds no trainer_extra_state for process %d (an older checkpoint, or another number of "
                "processes): the run continues, but not exactly as the uninterrupted one would have.",
                checkpoint, self.accelerator.process_index)
            self._step = self.state.global_step * self.args.gradient_accumulation_steps
            return
        self._step, self._eval_step, self._buffer = state["micro_step"], state["eval_step"], state["buffer"]
        for mode, values in state["metrics"].items():
            self._metrics[mode] = defaultdict(list, values)
        if state["tr_loss"] is not None:
            self._tr_loss.fill_(state["tr_loss"])
            self._globalstep_last_logged = state["globalstep_last_logged"]


class EpochRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler` whose order depends on the epoch only (the Trainer calls `set_epoch`): epoch `e` is the
    `e + 1`-th permutation of a generator seeded with `seed`, the order that TRL's sampler gives in an uninterrupted
    run. TRL's own sampler restarts its generator when it is rebuilt, so a run resumed in epoch 2 or later would
    replay the first epoch's order."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle and self.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.seed)
            for _ in range(self.epoch):
                torch.randperm(self.num_samples, generator=self.generator)
        return super().__iter__()
