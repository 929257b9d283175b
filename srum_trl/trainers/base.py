"""What every self-rewarding trainer shares, on top of TRL's `_BaseTrainer`: a micro-step counter for rollout
buffers, metric averaging in `log`, gathering of logged values over processes, running the backend's calls through
an FSDP2-sharded model, loss-only evaluation, model cards in checkpoints, and keeping the progress of a run that
fails."""

from __future__ import annotations

import contextlib
import math
import os
from collections import defaultdict

import torch
from accelerate.utils import gather_object
from trl.trainer.base_trainer import _BaseTrainer

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
        self._step = 0  # micro-steps taken: which slice of the buffered rollout round to serve
        self._buffer: list[dict] | None = None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

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
        out = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return out

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

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

    def train(self, *args, **kwargs):
        """`Trainer.train`; if it fails after some optimizer steps, the weights reached so far are saved to
        `output_dir/interrupted-step-N` before the error propagates, so no progress is lost."""
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            if self.state.global_step > 0 and self.is_world_process_zero():
                self.save_model(os.path.join(self.args.output_dir, f"interrupted-step-{self.state.global_step}"))
            raise
