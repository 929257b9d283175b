"""CLIP score and PickScore: image-text agreement from a CLIP checkpoint (transformers' `CLIPModel`).

Both are the cosine similarity `cos` of CLIP's normalised image and text embeddings; they differ by scale:

- `scale="cosine"` (default): `cos`, in [-1, 1];
- `scale="clipscore"`: `2.5 * max(cos, 0)`, in [0, 2.5] (CLIPScore, Hessel et al. 2021);
- `scale="pickscore"`: `logit_scale.exp() * cos / 26`, clamped to [-1, 1]. PickScore (Kirstain et al. 2023) is a
  CLIP-H checkpoint fine-tuned on human preferences whose raw score is the logit `logit_scale.exp() * cos` (about 100
  * cos, typically 17 to 24); the division by 26 is the normalisation Flow-GRPO uses to bring it near [0, 1].

SRUMTrainer needs rewards in [-1, 1]: "cosine" and "pickscore" are; "clipscore" is not (use it with GRPO or for
evaluation).
"""

from __future__ import annotations

import torch

from ._loading import as_rgb_images, check_prompts, load_checkpoint, model_device

SCALES = ("cosine", "clipscore", "pickscore")
PICKSCORE_DIVISOR = 26.0
CLIPSCORE_WEIGHT = 2.5


def _embedding(output) -> torch.Tensor:
    """Projected embeddings from `get_*_features` (a tensor, or an output holding them as `pooler_output`)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScoreReward:
    """Reward: how well each image matches its prompt according to a CLIP checkpoint (TRL's reward signature).

    Args:
        model: a CLIP checkpoint (folder or Hub id, `model_type` "clip"), or a `CLIPModel` object (then pass
            `processor`). Users pick e.g. `openai/clip-vit-large-patch14` (CLIP score) or
            `yuvalkirstain/PickScore_v1` (PickScore).
        processor: the processor (object, folder or Hub id); default: the model's own folder. PickScore_v1 ships no
            processor: use `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (see [`PickScoreReward`]).
        scale: "cosine", "clipscore" or "pickscore" (see the module docs).
        device: where the model runs (default: CUDA when available).
        dtype: weights dtype (e.g. "bfloat16"; default: the checkpoint's).
        batch_size: images per forward pass.
        name: the name logged by the trainers (`rewards/<name>/mean`).
    """

    def __init__(self, model="openai/clip-vit-large-patch14", processor=None, scale: str = "cosine", device=None,
                 dtype=None, batch_size: int = 32, name: str | None = None):
        from transformers import AutoModel

        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model, self.processor = load_checkpoint(model, processor, AutoModel, {"clip"}, "CLIPScoreReward",
                                                     "openai/clip-vit-large-patch14", device, dtype)
        self.scale = scale
        self.batch_size = batch_size
        self.__name__ = name or ("pickscore" if scale == "pickscore" else "clip_score")

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """L2-normalised image embeddings `[N, D]` (float32, on the model's device)."""
        images = as_rgb_images(images, "images")
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")["pixel_values"]
            pixels = pixels.to(model_device(self.model), self.model.dtype)
            out.append(_embedding(self.model.get_image_features(pixel_values=pixels)).float())
        embeddings = torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)
        return torch.nn.functional.normalize(embeddings, dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings `[N, D]` (float32); texts longer than the model's context are truncated."""
        out = []
        limit = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        for start in range(0, len(texts), self.batch_size):
            enc = self.processor(text=list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                 max_length=limit, return_tensors="pt")
            enc = {k: v.to(model_device(self.model)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out.append(_embedding(self.model.get_text_features(**enc)).float())
        embeddings = torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)
        return torch.nn.functional.normalize(embeddings, dim=-1)

    def scores(self, images, texts: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its text, `[N]` on the CPU."""
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1).cpu()

    def rescale(self, cosine: torch.Tensor) -> torch.Tensor:
        """Map cosine similarities to this reward's scale."""
        if self.scale == "clipscore":
            return CLIPSCORE_WEIGHT * cosine.clamp(min=0.0)
        if self.scale == "pickscore":
            logit_scale = float(self.model.logit_scale.detach().float().exp())
            return (logit_scale * cosine / PICKSCORE_DIVISOR).clamp(-1.0, 1.0)
        return cosine

    def classify(self, images, classes: list[str], templates: list[str] | None = None) -> list[int]:
        """Zero-shot classification: for each image, the index of the class whose text embedding (the mean over
        `templates`, each with `{}` for the class) is nearest."""
        templates = templates or ["{}"]
        text = torch.stack([
            torch.nn.functional.normalize(self.text_embeddings([t.format(c) for t in templates]).mean(0), dim=-1)
            for c in classes
        ])
        return (self.image_embeddings(images) @ text.T.to(model_device(self.model))).argmax(-1).tolist()

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        """TRL's reward signature: one score per (prompt, image)."""
        images = as_rgb_images(completions)
        prompts = check_prompts(prompts, len(images))
        if not images:
            return []
        return self.rescale(self.scores(images, prompts)).tolist()


def PickScoreReward(model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                    device=None, dtype=None, batch_size: int = 32, name: str = "pickscore") -> CLIPScoreReward:
    """A [`CLIPScoreReward`] with PickScore's checkpoint, its processor and its scale (`scale="pickscore"`)."""
    return CLIPScoreReward(model, processor=processor, scale="pickscore", device=device, dtype=dtype,
                           batch_size=batch_size, name=name)
