"""Another model as judge: any transformers image-text-to-text model (Qwen2.5-VL, LLaVA, Janus, ...) answers a yes/no
question per image, and optionally per region; its logits give the score and the regions give a reward map like the
self-judge's.

[`TransformersJudge`] is the understanding half of the backend interface (`yes_probability`, `answer`) over such a
model, so that [`VLMJudgeReward`], a [`UMMJudgeRewardFunction`] whose backend it is, reuses the self-judge's
questions, region proposers and map rules unchanged. In `SRUMTrainer` a `VLMJudgeReward` is *the* judge (it makes the
reward maps); in `GRPOUMMTrainer` it is a reward function whose maps can drive dense advantages.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from ._loading import as_rgb_images, check_prompts, load_checkpoint, model_device
from .judge import UMMJudgeRewardFunction

_YES = ("yes", "Yes", " yes", " Yes", "YES")
_NO = ("no", "No", " no", " No", "NO")


def _image_text_model_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


class TransformersJudge:
    """A transformers image-text-to-text model seen as a judge: P(yes) and free-text answers per (image, question).

    Args:
        model: a checkpoint (folder / Hub id) of any `AutoModelForImageTextToText` family, or the model object (then
            pass `processor`). E.g. `Qwen/Qwen2.5-VL-7B-Instruct`, `llava-hf/llava-1.5-7b-hf`,
            `deepseek-community/Janus-Pro-1B`.
        processor: the processor (object, folder or Hub id); default: the model's folder.
        question_template: how a question is written: `{image}` becomes the processor's image token and `{question}`
            the question. None: the processor's chat template (one user turn: the image, then the question) when it
            has one, else `"{image}{question}"`.
        device, dtype: where and in which dtype the model runs (default: CUDA when available; the checkpoint's).
        batch_size: (image, question) rows per forward pass.
        map_grid: `(h, w)` of the reward maps when the judge is called without a token grid (standalone use; the
            trainers pass their model's own grid).

    The processor's tokenizer is set to pad on the left, so that the last position of every row is the answer's.
    """

    accepts_pixel_views = False

    def __init__(self, model, processor=None, question_template: str | None = None, device=None, dtype=None,
                 batch_size: int = 8, map_grid: tuple[int, int] = (16, 16)):
        from transformers import AutoModelForImageTextToText

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        self.model, self.processor = load_checkpoint(
            model, processor, AutoModelForImageTextToText, _image_text_model_types(), "a VLM judge",
            "Qwen/Qwen2.5-VL-7B-Instruct", device, dtype)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("processor has no tokenizer: a VLM judge needs a processor with text and images.")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if question_template is not None and "{question}" not in question_template:
            raise ValueError("question_template must contain '{question}' (and usually '{image}').")
        self.question_template = question_template
        if question_template is None and getattr(self.processor, "chat_template", None) is None:
            if getattr(self.processor, "image_token", None) is None:
                raise ValueError("processor has neither a chat template nor an image token: pass question_template.")
        self.batch_size = batch_size
        self.token_grid = tuple(map_grid)
        self.yes_ids, self.no_ids = self._single_tokens(_YES), self._single_tokens(_NO)
        self._keep_one = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def _single_tokens(self, words) -> list[int]:
        ids = set()
        for word in words:
            enc = self.tokenizer.encode(word, add_special_tokens=False)
            if len(enc) == 1 and enc[0] != self.tokenizer.unk_token_id:
                ids.add(enc[0])
        return sorted(ids)

    def format_question(self, question: str) -> str:
        """The text, with one image placeholder, after which the model's next token answers `question`."""
        if self.question_template is not None:
            return self.question_template.format(image=getattr(self.processor, "image_token", ""), question=question)
        if getattr(self.processor, "chat_template", None) is not None:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"{self.processor.image_token}{question}"

    def _inputs(self, images, questions) -> dict:
        texts = [self.format_question(q) for q in questions]
        enc = self.processor(text=texts, images=list(images), padding=True, return_tensors="pt")
        dtype = self.model.dtype
        return {k: (v.to(self.device, dtype) if torch.is_floating_point(v) else v.to(self.device))
                for k, v in enc.items()}

    def _check(self, images, questions):
        images = as_rgb_images(images, "images")
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images but {len(questions)} questions.")
        return images

    @torch.no_grad()
    def yes_probability(self, images, questions: list[str]) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) of the next token after each question, `[N]` on the CPU ("yes" and "no" in any
        of their single-token spellings)."""
        images = self._check(images, questions)
        if not self.yes_ids or not self.no_ids:
            raise ValueError("The tokenizer has no single-token 'yes'/'no': use mode='text' with this model.")
        yes, no = torch.tensor(self.yes_ids), torch.tensor(self.no_ids)
        out = []
        for start in range(0, len(images), self.batch_size):
            enc = self._inputs(images[start : start + self.batch_size], questions[start : start + self.batch_size])
            extra = {"logits_to_keep": 1} if self._keep_one else {}
            logits = self.model(**enc, use_cache=False, **extra).logits[:, -1].float().cpu()
            out.append(torch.sigmoid(torch.logsumexp(logits[:, yes], -1) - torch.logsumexp(logits[:, no], -1)))
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def answer(self, images, questions: list[str], max_new_tokens: int = 128, temperature: float = 0.0) -> list[str]:
        """Free-text answers (greedy at temperature 0, sampled above), special tokens removed."""
        images = self._check(images, questions)
        answers = []
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        for start in range(0, len(images), self.batch_size):
            enc = self._inputs(images[start : start + self.batch_size], questions[start : start + self.batch_size])
            ids = self.model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                                      **sampling)
            answers.extend(self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
        return answers

    def frozen(self):
        """The judge is never trained: nothing to disable."""
        return contextlib.nullcontext()


class VLMJudgeReward(UMMJudgeRewardFunction):
    """Reward from another model's yes/no answers: `2 * P(yes) - 1` per image (and per region with a proposer),
    turned into reward maps by the self-judge's rules.

    Args:
        model, processor, question_template, device, dtype, batch_size, map_grid: see [`TransformersJudge`]; or pass
            a ready `TransformersJudge` as `model`.
        question: the global question, a template with `{prompt}` (default: the self-judge's, 'Does this image
            match the description "{prompt}"? Answer yes or no.').
        region_proposer: "none" (default: one question per image), "grid", "sam", or a proposer; with regions, each
            region (a crop) gets `local_question` and the map rule (`map_rule`) builds the dense map.
        mode: "logits" (default; scored from the yes/no logits) or "text" (the answer's `Score: x`).
        **judge_kwargs: other [`UMMJudgeRewardFunction`] arguments (`region_grid`, `local_question`, `map_rule`,
            `region_view`, `downsample_mode`, ...).
    """

    def __init__(self, model="Qwen/Qwen2.5-VL-7B-Instruct", processor=None, question: str | None = None,
                 region_proposer="none", mode: str = "logits", question_template: str | None = None, device=None,
                 dtype=None, batch_size: int = 8, map_grid: tuple[int, int] = (16, 16), name: str = "vlm_judge",
                 **judge_kwargs):
        judge = model if isinstance(model, TransformersJudge) else TransformersJudge(
            model, processor, question_template=question_template, device=device, dtype=dtype,
            batch_size=batch_size, map_grid=map_grid)
        use_local = not (isinstance(region_proposer, str) and region_proposer == "none")
        super().__init__(backend=judge, mode=mode, region_proposer=region_proposer, use_local=use_local,
                         global_question=question, frozen=False, name=name, **judge_kwargs)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        images = as_rgb_images(completions)
        return super().__call__(check_prompts(prompts, len(images)), images)
