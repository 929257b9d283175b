"""Model inputs for Janus image understanding (`JanusBackend.yes_probability` and `answer`), built fast.

What: `input_ids`, `attention_mask` and `pixel_values` for a batch of (image, question) rows, equal to what the
`JanusProcessor` returns, but made with batched tensor work: each distinct question is tokenized once, and images are
stacked as uint8, resized when needed (with Pillow's own fixed-point algorithm) and normalised on the model's device.
Images that are already on the device (a `PixelViews` of `Rollout.pixels`: whole images and crop boxes) are cropped,
resized, padded and normalised there without any host work per image.

Why: preparing these inputs on the host (per-image numpy work, tokenizing hundreds of image placeholders per row) was
the judge's bottleneck, not the model's forward.

Exactness: on first use each part (text, images already at size, resized images) is compared with the processor's
output on a few rows of the call; a part that differs is switched off with a warning and the processor is used
instead. Anything this module cannot reproduce (another image processor, another resample filter) goes through the
processor. On the CPU the fast pixel values equal the processor's bit for bit (tested). On CUDA the resize is integer
arithmetic (exact) and the normalisation is the same IEEE float32 operations (the rescale divides by a device tensor:
PyTorch's CUDA division by a Python scalar multiplies by its reciprocal instead, one float32 ulp off on ~40% of byte
values), so the pixel values should be identical there too; the first-use check allows 1e-6.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..base import PixelViews


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a host sync on CUDA (pinned copy, non-blocking)."""
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class JanusInputBuilder:
    """Builds the understanding inputs of one [`JanusBackend`].

    The reference is `processor(text=texts, images=images, return_tensors="pt", padding=True)`: per image a PIL
    resize (even to the same size), a float64 rescale and a float32 normalise in numpy; per row the tokenization of a
    text holding `num_image_tokens` placeholders. The fast path makes the same tensors:

    * text: each distinct text is tokenized once with a single placeholder, which tensor ops then repeat;
    * images already at the processor's size ("plain"): stacked as uint8, moved to the device and normalised there
      with a formula checked bit for bit against the processor's rescale / normalise on all 256 byte values;
    * other sizes ("resize"): resized like the processor (on the device with Pillow's algorithm written in torch, or
      on the host with Pillow itself when the model is on the CPU) and padded to a square with its background colour;
    * rows given as a [`PixelViews`] (images already on the device, whole or cropped): gathered from the device
      tensor (one indexing kernel per view size), then made like "plain" or "resize" rows;
    * anything else ("processor"): the image processor itself, per image.

    Args:
        backend: the owning backend; its `processor`, `device` and `core` are read at each call, so a processor or
            model swapped on the backend is picked up.

    Attributes:
        state: which parts ("text", "plain", "resize") passed the first-use comparison with the processor (None: not
            compared yet, False: switched off), and the cached image plan under "plan".
        resize_on_device: resize with the torch version of Pillow's algorithm on the device (True) or with Pillow on
            the host (False); None (default) means on the device unless the model is on the CPU (there Pillow is
            several times faster than the torch version). The same holds for rows given as a [`PixelViews`].
    """

    resize_on_device: bool | None = None

    def __init__(self, backend):
        self.backend = backend
        self.state = {"text": None, "plain": None, "resize": None, "plan": None}

    @property
    def processor(self):
        return self.backend.processor

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return to_device(tensor, self.device)

    def _pixel_dtype(self) -> torch.dtype:
        """The dtype the vision tower casts pixel values to (its patch embedding's), float32 if there is none."""
        try:
            return self.backend.core.model.vision_model.embeddings.patch_embedding.weight.dtype
        except AttributeError:
            return torch.float32

    # ------------------------------------------------------------------------------------------------- entry
    def build(self, images, texts, fast: bool = True) -> dict:
        """`input_ids`, `attention_mask` and `pixel_values` on the device for one batch of (image, formatted text)
        rows, equal to the processor's output (ids and mask exactly, pixel values bit for bit where the fast path
        reproduces them, checked to 1e-6 on first use). Pixel values are in the vision tower's dtype on the fast
        path and float32 from the processor. `fast=False` always uses the processor. `images`: PIL images, or a
        [`PixelViews`] (the processor then sees `images.to_pil()`)."""
        if not isinstance(images, PixelViews):
            images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        if fast and len(texts):
            enc = self._fast_inputs(images, texts)
            if enc is not None:
                return enc
        return self.processor_inputs(images, texts)

    def processor_inputs(self, images, texts) -> dict:
        """The reference: the processor on the formatted texts and RGB images (pixel values in float32)."""
        if isinstance(images, PixelViews):
            images = images.to_pil()
        enc = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    def _fast_inputs(self, images, texts):
        state = self.state
        if state["text"] is False:
            return None
        text = self.fast_text(texts)
        if text is None:
            return None
        pixels, kinds = self.fast_pixels(images)
        enc = {"input_ids": self._to_device(text[0]), "attention_mask": self._to_device(text[1]),
               "pixel_values": pixels}
        unchecked = {k for k in kinds if k != "processor" and state[k] is None}
        if state["text"] is None or unchecked:
            if not self._check(images, texts, enc, kinds, unchecked):
                return None
        enc["pixel_values"] = pixels.to(self._pixel_dtype())  # what the vision tower casts them to first
        return enc

    def _check(self, images, texts, enc, kinds, unchecked) -> bool:
        """Compare the fast inputs with the processor's on a few rows of this call (the first one, one of each
        unchecked image kind, one of another length); switch off the parts that differ. False: redo this call
        with the processor."""
        from transformers.utils import logging

        state = self.state
        rows = {0} | {kinds.index(k) for k in unchecked}
        lengths = enc["attention_mask"].sum(-1).tolist()
        rows |= {next((i for i, n in enumerate(lengths) if n != lengths[0]), 0)}
        rows = sorted(rows)
        picked = images[rows] if isinstance(images, PixelViews) else [images[r] for r in rows]
        ref = self.processor_inputs(picked, [texts[r] for r in rows])
        ids, mask = self.fast_text([texts[r] for r in rows])
        state["text"] = (set(ref) == set(enc) and torch.equal(ref["input_ids"].cpu(), ids)
                         and torch.equal(ref["attention_mask"].cpu(), mask))
        ok = state["text"]
        for kind in unchecked:
            pick = [j for j, r in enumerate(rows) if kinds[r] == kind]
            fast = enc["pixel_values"][[rows[j] for j in pick]]
            state[kind] = bool((fast - ref["pixel_values"][pick]).abs().max() <= 1e-6)
            ok = ok and state[kind]
        if not ok:
            logging.get_logger(__name__).warning(
                "JanusBackend: the fast understanding inputs differ from the processor's here (%s); using the "
                "processor for them.", ", ".join(k for k in ("text", *sorted(unchecked)) if not state[k]))
        return ok

    # -------------------------------------------------------------------------------------------------- text
    def _padding_side(self) -> str:
        """The side the processor pads on: the tokenizer's attribute when the tokenizer was built with one, else the
        processor's default text kwargs (left for Janus), else the tokenizer's."""
        tokenizer = self.processor.tokenizer
        if "padding_side" in getattr(tokenizer, "init_kwargs", {}):
            return tokenizer.padding_side
        return (getattr(self.processor, "text_kwargs", None) or {}).get("padding_side", tokenizer.padding_side)

    def fast_text(self, texts):
        """Left/right-padded `input_ids` and `attention_mask` (CPU, int64) equal to the processor's: each distinct
        text is tokenized once as `... <begin_of_image><image><end_of_image> ...` and its one image token is then
        repeated `num_image_tokens` times. None when a text does not hold exactly one image placeholder or its
        tokenization is not of that form."""
        processor, tokenizer = self.processor, self.processor.tokenizer
        image, boi, eoi = processor.image_token, processor.image_start_token, processor.image_end_token
        n_image = processor.num_image_tokens
        image_id, boi_id, eoi_id = tokenizer.convert_tokens_to_ids([image, boi, eoi])
        if getattr(processor, "use_default_system_prompt", False):
            from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

            texts = [DEFAULT_SYSTEM_PROMPT + t for t in texts]
        if any(t.count(image) != 1 for t in texts):
            return None
        distinct = list(dict.fromkeys(texts))
        compact = tokenizer([t.replace(image, boi + image + eoi) for t in distinct])["input_ids"]
        rows = {}
        for text, ids in zip(distinct, compact):
            if ids.count(image_id) != 1:
                return None
            p = ids.index(image_id)
            if p == 0 or p == len(ids) - 1 or ids[p - 1] != boi_id or ids[p + 1] != eoi_id:
                return None
            ids = torch.tensor(ids, dtype=torch.long)
            rows[text] = torch.cat([ids[:p], ids.new_full((n_image,), image_id), ids[p + 1 :]])
        rows = [rows[t] for t in texts]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        left = self._padding_side() == "left"
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            input_ids[i, span] = row
            mask[i, span] = 1
        return input_ids, mask

    # ------------------------------------------------------------------------------------------------ images
    def image_plan(self):
        """What the fast image path needs from the image processor, or None when it cannot reproduce it: the square
        target size, resize / pad settings, and a rescale + normalise formula that equals the processor's own on
        every byte value (checked on the CPU here; the device runs the same IEEE float32 operations)."""
        state = self.state
        ip = self.processor.image_processor
        if state["plan"] is not None and state["plan"][0] is ip:
            return state["plan"][1]
        plan = None
        try:
            plan = _make_image_plan(ip)
        except Exception:  # an image processor of another shape: the processor handles every image
            plan = None
        state["plan"] = (ip, plan)
        return plan

    def fast_pixels(self, images):
        """float32 pixel values `[B, 3, S, S]` on the device, and per image how they were made:
        "plain" (already S x S: stacked, normalised on the device), "resize" (resized and padded like the
        processor) or "processor" (the image processor itself). `images`: PIL images or a [`PixelViews`]."""
        if isinstance(images, PixelViews):
            return self.view_pixels(images)
        plan = self.image_plan()
        device = self.device
        if plan is None:
            pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            return pixels.to(device), ["processor"] * len(images)
        size = plan["size"]
        on_device = self._resize_on_device(plan)
        kinds, host, groups = [], {}, {}
        for i, im in enumerate(images):
            w, h = im.size
            kind = self._row_kind(plan, h, w)
            kinds.append(kind)
            if kind == "plain":
                host[i] = np.asarray(im)
            elif kind == "resize" and not on_device:  # Pillow itself, as the processor, then pad
                new_h, new_w = _resized_size(plan, h, w)
                host[i] = _pad_square_np(np.asarray(im.resize((new_w, new_h), plan["resample"])), plan)
            elif kind == "resize":
                groups.setdefault((h, w), []).append(i)
        n = len(images)
        parts = []  # (row indices, uint8 [k, 3, S, S] on the device)
        if host:
            idx = list(host)
            buf = torch.empty((len(idx), size, size, 3), dtype=torch.uint8, pin_memory=device.type == "cuda")
            view = buf.numpy()
            for j, i in enumerate(idx):
                view[j] = host[i]
            parts.append((idx, self._to_device(buf).permute(0, 3, 1, 2)))
        for (h, w), idx in groups.items():
            buf = torch.empty((len(idx), h, w, 3), dtype=torch.uint8, pin_memory=device.type == "cuda")
            view = buf.numpy()
            for j, i in enumerate(idx):
                view[j] = np.asarray(images[i])
            parts.append((idx, _resize_pad_torch(self._to_device(buf).permute(0, 3, 1, 2), plan)))
        rest = [i for i, k in enumerate(kinds) if k == "processor"]
        return self._assemble(parts, n, plan, rest, lambda: [images[i] for i in rest]), kinds

    def _resize_on_device(self, plan) -> bool:
        """Resize on the device (Pillow's algorithm in torch) unless the model is on the CPU, where Pillow is faster,
        or `resize_on_device` says otherwise; only for filters the torch version reproduces."""
        on_device = self.resize_on_device
        on_device = self.device.type != "cpu" if on_device is None else on_device
        return on_device and plan["resample"] in _PIL_FILTERS and pil_pass_order() is not None

    def _row_kind(self, plan, h: int, w: int) -> str:
        """How a row of an `h x w` image is prepared: "plain" (already S x S: normalise), "resize" (resize and pad
        as the processor does, then normalise) or "processor" (a case the fast path does not reproduce, or one the
        first-use check found different)."""
        size, state = plan["size"], self.state
        if (h, w) == (size, size):
            return "plain" if state["plain"] is not False else "processor"
        new_h, new_w = _resized_size(plan, h, w)
        ok = (state["resize"] is not False and plan["do_resize"] and plan["pil_resize"] and max(new_h, new_w) == size
              and (new_h == new_w or (plan["do_pad"] and plan["background"] is not None)))
        return "resize" if ok else "processor"

    def view_pixels(self, views: PixelViews):
        """[`fast_pixels`] for rows given as views of images on the device: the views of each size are gathered
        from `views.pixels` in one indexing kernel, then normalised ("plain", already S x S) or resized, padded and
        normalised ("resize") on the device; rows the fast path cannot reproduce go to the processor through
        `views.to_pil()`. No per-row host work besides the box arithmetic."""
        plan = self.image_plan()
        device, n = self.device, len(views)
        if plan is None:
            pixels = self.processor.image_processor(views.to_pil(), return_tensors="pt")["pixel_values"]
            return pixels.to(device), ["processor"] * n
        size = plan["size"]
        on_device = self._resize_on_device(plan)  # as for PIL images: Pillow on the host when the model is on the CPU
        kinds, groups = [], {}
        for r, (h, w) in enumerate(views.sizes()):
            # an empty box goes to the processor, which fails as it would on the PIL crop
            kind = "processor" if h < 1 or w < 1 else self._row_kind(plan, h, w)
            kinds.append(kind)
            if kind != "processor":
                groups.setdefault((h, w), []).append(r)
        src = views.pixels.to(device)
        parts = []
        for (h, w), rows in groups.items():
            if (h, w) != (size, size) and not on_device:  # Pillow itself on the host, as the processor, then pad
                new_h, new_w = _resized_size(plan, h, w)
                host = np.stack([_pad_square_np(np.asarray(im.resize((new_w, new_h), plan["resample"])), plan)
                                 for im in views[rows].to_pil()])
                parts.append((rows, self._to_device(torch.from_numpy(host)).permute(0, 3, 1, 2)))
                continue
            u8 = gather_views(src, [views.index[r] for r in rows], [views.boxes[r] for r in rows], h, w)
            u8 = u8.permute(0, 3, 1, 2)
            parts.append((rows, u8 if (h, w) == (size, size) else _resize_pad_torch(u8, plan)))
        rest = [i for i, k in enumerate(kinds) if k == "processor"]
        return self._assemble(parts, n, plan, rest, lambda: views[rest].to_pil()), kinds

    def _assemble(self, parts, n, plan, rest, rest_images):
        """float32 `[n, 3, S, S]` on the device: the uint8 `parts` (row indices, `[k, 3, S, S]`) normalised with the
        plan's formula, and the image processor's output for the rows `rest` (their images: `rest_images()`)."""
        device, size = self.device, plan["size"]
        if len(parts) == 1 and len(parts[0][0]) == n and parts[0][0] == list(range(n)):
            u8 = parts[0][1]
        else:
            u8 = torch.zeros((n, 3, size, size), dtype=torch.uint8, device=device)
            for idx, part in parts:
                u8.index_copy_(0, self._to_device(torch.tensor(idx, dtype=torch.long)), part)
        pixels = _normalize_u8(u8, *plan["norm"])
        if rest:
            ref = self.processor.image_processor(rest_images(), return_tensors="pt")["pixel_values"]
            pixels.index_copy_(0, self._to_device(torch.tensor(rest, dtype=torch.long)), ref.to(device).float())
        return pixels


def gather_views(src: torch.Tensor, index: list[int], boxes: list, height: int, width: int) -> torch.Tensor:
    """uint8 `[k, height, width, 3]` on `src`'s device: for each row, image `index[r]` of `src` (`[N, H, W, 3]`),
    whole (box None; then `(height, width)` is `(H, W)`) or cropped to its `(x0, y0, x1, y1)` box of that size, with
    zeros outside the image (as `Image.crop`). Whole images in order are `src` itself; otherwise one indexing kernel
    (its indices built on the host and copied once, without a host sync)."""
    n, full_h, full_w, _ = src.shape
    if all(b is None for b in boxes):
        if index == list(range(n)):
            return src
        return src.index_select(0, to_device(torch.tensor(index, dtype=torch.long), src.device))
    x0 = np.array([0 if b is None else b[0] for b in boxes], dtype=np.int64)
    y0 = np.array([0 if b is None else b[1] for b in boxes], dtype=np.int64)
    ys = y0[:, None] + np.arange(height)  # [k, height]
    xs = x0[:, None] + np.arange(width)  # [k, width]
    y_in, x_in = (ys >= 0) & (ys < full_h), (xs >= 0) & (xs < full_w)
    k = len(index)
    idx = to_device(torch.from_numpy(np.concatenate([np.asarray(index, dtype=np.int64), ys.clip(0, full_h - 1).ravel(),
                                                     xs.clip(0, full_w - 1).ravel()])), src.device)
    rows, ys_t, xs_t = idx[:k], idx[k : k + k * height].view(k, height), idx[k + k * height :].view(k, width)
    out = src[rows[:, None, None], ys_t[:, :, None], xs_t[:, None, :]]
    if not (y_in.all() and x_in.all()):
        mask = torch.from_numpy((y_in[:, :, None] & x_in[:, None, :])[..., None].astype(np.uint8))
        out = out * to_device(mask, src.device)
    return out


# ------------------------------------------------------------------------------------------ image processor plan
def _make_image_plan(ip):
    backend = getattr(ip, "backend", None)
    if backend not in ("pil", "torchvision") or not type(ip).__name__.startswith("JanusImageProcessor"):
        return None
    size = ip.size
    height, width = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    if not height or height != width:
        return None
    do_rescale, do_normalize = bool(ip.do_rescale), bool(ip.do_normalize)
    if not (do_rescale or do_normalize):
        return None
    rescale = float(ip.rescale_factor)
    mean = [float(m) for m in np.broadcast_to(np.asarray(ip.image_mean, dtype=np.float64), (3,))]
    std = [float(s) for s in np.broadcast_to(np.asarray(ip.image_std, dtype=np.float64), (3,))]
    # the processor's own output for every byte value of every channel
    values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256)).copy()
    if backend == "pil":
        ref = values
        if do_rescale:
            ref = ip.rescale(ref, rescale)
        if do_normalize:
            ref = ip.normalize(ref, mean, std)
        ref = torch.from_numpy(np.asarray(ref, dtype=np.float32))[None]
    else:
        ref = ip.rescale_and_normalize(torch.from_numpy(values)[None], do_rescale, rescale, do_normalize,
                                       tuple(mean), tuple(std)).float()
    mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    scales = []
    if do_rescale:
        if abs(1.0 / rescale - round(1.0 / rescale)) < 1e-9:
            scales.append(("div", float(round(1.0 / rescale))))
        scales += [("mul", rescale), ("f64", rescale)]
    candidates = [(s, mean_t, std_t) if do_normalize else (s, None, None) for s in scales]
    if do_normalize:  # no rescale, or rescale fused into the mean and std as transformers' torchvision backend
        fused = (1.0 / rescale) if do_rescale else 1.0
        candidates.append((("none", None), mean_t * fused, std_t * fused))
    norm = None
    for scale, m, s in candidates:
        if torch.equal(_normalize_u8(torch.from_numpy(values)[None], scale, m, s), ref):
            norm = (scale, m, s)
            break
    if norm is None:
        return None
    background = tuple(int(c) for c in getattr(ip, "background_color", (127, 127, 127)))
    resample = int(ip.resample) if ip.resample is not None else int(Image.Resampling.BILINEAR)
    return dict(
        size=int(height),
        norm=norm,
        do_resize=bool(ip.do_resize),
        do_pad=bool(getattr(ip, "do_pad", True)),
        min_size=int(getattr(ip, "min_size", 0) or 0),
        resample=resample,
        background=background if len(background) == 3 else None,
        # transformers' torchvision backend resizes with torchvision: those images go to the processor
        pil_resize=backend == "pil",
    )


_ON_DEVICE: dict = {}  # (id of a long-lived host tensor, device) -> (that tensor, its copy on the device)


def _cached_on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The copy on `device` of a long-lived host tensor (resampling taps, mean / std), made once per device. A
    blocking host-to-device copy at every call (`.to(device)` synchronises the stream) would make the host wait for
    the GPU, so that the input preparation of a chunk could not overlap the forward of the one before."""
    if device.type == "cpu":
        return tensor
    key = (id(tensor), str(device))
    hit = _ON_DEVICE.get(key)
    if hit is None or hit[0] is not tensor:  # the entry keeps its tensor alive: its id cannot be reused meanwhile
        if len(_ON_DEVICE) > 4096:
            _ON_DEVICE.clear()
        hit = _ON_DEVICE[key] = (tensor, to_device(tensor, device))
    return hit[1]


def _normalize_u8(u8: torch.Tensor, scale, mean, std) -> torch.Tensor:
    """uint8 `[B, 3, H, W]` (any strides) -> contiguous float32, with the plan's formula."""
    mode, value = scale
    if mode == "f64":
        x = (u8.to(torch.float64) * value).to(torch.float32).contiguous()
    else:
        x = torch.empty(u8.shape, dtype=torch.float32, device=u8.device)
        x.copy_(u8)
        if mode == "div" and x.device.type != "cpu":
            # by a device tensor, not a Python scalar: CUDA divides by a host scalar as a multiply by its reciprocal
            # (one ulp off on some byte values); a tensor divisor is IEEE division, as on the CPU
            x.div_(torch.full((), value, dtype=torch.float32, device=x.device))
        elif mode == "div":
            x.div_(value)
        elif mode == "mul":
            x.mul_(value)
    if mean is not None:
        x.sub_(_cached_on(mean, x.device).view(1, -1, 1, 1)).div_(_cached_on(std, x.device).view(1, -1, 1, 1))
    return x


def _resized_size(plan, height: int, width: int) -> tuple[int, int]:
    """The processor's resize: the longest edge to the target size, the other by the aspect ratio, rounded."""
    delta = plan["size"] / max(height, width)
    return max(round(height * delta), plan["min_size"]), max(round(width * delta), plan["min_size"])


def _pad_square_np(arr: np.ndarray, plan) -> np.ndarray:
    """The processor's `pad_to_square` on an `[h, w, 3]` uint8 array: centred, the rest its background colour."""
    h, w = arr.shape[:2]
    if h == w:
        return arr
    side = max(h, w)
    out = np.empty((side, side, 3), dtype=np.uint8)
    out[...] = np.asarray(plan["background"], dtype=np.uint8)
    if w > h:
        top = (side - h) // 2
        out[top : top + h] = arr
    else:
        left = (side - w) // 2
        out[:, left : left + w] = arr
    return out


def _resize_pad_torch(u8: torch.Tensor, plan) -> torch.Tensor:
    """uint8 `[B, 3, h, w]` -> uint8 `[B, 3, S, S]`: the processor's resize (Pillow's fixed-point resampling, bit
    for bit) and pad to square, as tensor ops on `u8`'s device."""
    h, w = u8.shape[-2:]
    new_h, new_w = _resized_size(plan, h, w)
    x = pil_resize_torch(u8, new_h, new_w, plan["resample"], pil_pass_order())
    size = plan["size"]
    if new_h == new_w:
        return x
    out = torch.empty((x.shape[0], 3, size, size), dtype=torch.uint8, device=x.device)
    for c, value in enumerate(plan["background"]):
        out[:, c] = value
    if new_w > new_h:
        top = (size - new_h) // 2
        out[:, :, top : top + new_h] = x
    else:
        left = (size - new_w) // 2
        out[:, :, :, left : left + new_w] = x
    return out


# ------------------------------------------------------------------------------------ Pillow's resize in torch
def pil_resize_torch(u8: torch.Tensor, new_h: int, new_w: int, resample: int, order: str) -> torch.Tensor:
    """uint8 `[B, C, h, w]` -> uint8 `[B, C, new_h, new_w]` as `Image.resize` does it: two 8-bit passes, each
    rounded and clipped. `order` says which pass Pillow runs first: "h" (always horizontal, as Pillow's
    Resample.c up to 12) or "auto" (vertical first when it shrinks the height by more than twice what it takes
    off the width: what Pillow 13.0 does, found by probing it)."""
    h, w = u8.shape[-2:]
    x = u8.to(torch.int32)
    passes = [(3, w, new_w), (2, h, new_h)]
    if order == "auto" and new_h < h and (h - new_h) > 2 * (w - new_w):
        passes.reverse()
    for dim, size_in, size_out in passes:
        if size_in != size_out:
            x = _pil_resample_axis(x, size_in, size_out, resample, dim=dim)
    return x.to(torch.uint8)


_PIL_ORDER: str | None = "unprobed"  # Pillow's pass order in this process, see `pil_pass_order`


def pil_pass_order():
    """Which pass order reproduces this process's Pillow on probe resizes where the orders differ (the
    coefficients and rounding are the same in every Pillow since 4); None if neither does."""
    global _PIL_ORDER
    if _PIL_ORDER == "unprobed":
        rng = np.random.default_rng(0)
        probes = [((67, 14), (32, 7)), ((60, 40), (30, 30)), ((40, 60), (30, 30)), ((24, 11), (11, 39)),
                  ((33, 47), (45, 60)), ((100, 50), (30, 40)), ((50, 100), (40, 30))]
        probes = [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), size) for (h, w), size in probes]
        _PIL_ORDER = None
        for order in ("auto", "h"):
            if all(np.array_equal(np.asarray(Image.fromarray(a).resize(size[::-1], Image.Resampling.BICUBIC)),
                                  pil_resize_torch(torch.from_numpy(a).permute(2, 0, 1)[None], *size,
                                                   int(Image.Resampling.BICUBIC), order)[0]
                                  .permute(1, 2, 0).numpy()) for a, size in probes):
                _PIL_ORDER = order
                break
    return _PIL_ORDER


# Pillow's filters (src/libImaging/Resample.c), written as there so that the coefficients are the same doubles
def _bicubic(x: float) -> float:
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    if x < 0.0:
        x = -x
    if x < 1.0:
        return 1.0 - x
    return 0.0


_PIL_FILTERS = {int(Image.Resampling.BICUBIC): (_bicubic, 2.0), int(Image.Resampling.BILINEAR): (_bilinear, 1.0)}
_PIL_COEFFS: dict = {}  # (in_size, out_size, resample) -> Pillow's fixed-point taps, shared by every backend


def _pil_coefficients(in_size: int, out_size: int, resample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's taps for resizing one axis from `in_size` to `out_size` (`precompute_coeffs` +
    `normalize_coeffs_8bpc`): source indices `[out, k]` and int32 fixed-point weights `[out, k]` (22 fraction
    bits, 0 past each output's window)."""
    key = (in_size, out_size, resample)
    if key not in _PIL_COEFFS:
        if len(_PIL_COEFFS) > 1024:  # many crop sizes: start over
            _PIL_COEFFS.clear()
        filt, support = _PIL_FILTERS[resample]
        scale = in_size / out_size
        filterscale = max(scale, 1.0)
        support = support * filterscale
        ksize = int(math.ceil(support)) * 2 + 1
        ss = 1.0 / filterscale
        index = np.zeros((out_size, ksize), dtype=np.int64)
        weight = np.zeros((out_size, ksize), dtype=np.int32)
        for xx in range(out_size):
            center = (xx + 0.5) * scale
            xmin = max(int(center - support + 0.5), 0)
            xmax = min(int(center + support + 0.5), in_size) - xmin
            k = [filt((x + xmin - center + 0.5) * ss) for x in range(xmax)]
            ww = 0.0
            for v in k:
                ww += v
            for x, v in enumerate(k):
                v = v / ww if ww != 0.0 else v
                weight[xx, x] = int(-0.5 + v * (1 << 22)) if v < 0 else int(0.5 + v * (1 << 22))
                index[xx, x] = xmin + x
        _PIL_COEFFS[key] = (torch.from_numpy(index), torch.from_numpy(weight))
    return _PIL_COEFFS[key]


def _pil_resample_axis(x: torch.Tensor, in_size: int, out_size: int, resample: int, dim: int):
    """One pass of Pillow's 8-bit resampling along `dim` of int32 `x`: sum of taps in int32 plus half, shifted
    right by 22, clipped to 0..255."""
    index, weight = _pil_coefficients(in_size, out_size, resample)
    index, weight = _cached_on(index, x.device), _cached_on(weight, x.device)
    shape = [1] * x.dim()
    shape[dim] = out_size
    acc = torch.full((), 1 << 21, dtype=torch.int32, device=x.device)
    for j in range(index.shape[1]):
        acc = acc + x.index_select(dim, index[:, j]) * weight[:, j].view(shape)
    return (acc >> 22).clamp_(0, 255)
