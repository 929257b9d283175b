"""Images that users hand in (files to score, images to judge): a size limit, checked before any pixel is decoded.

PIL refuses only images above twice its decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, 89.5 million pixels:
it warns above that and raises above 179 million). Our limit is lower, 4096 x 4096 = 16.8 million pixels by
default, far above any image a UMM generates or judges (Janus 384 px, BAGEL 1024 px). Raise it per call
(`max_pixels=`, `UMMJudgeRewardFunction(max_image_pixels=...)`, `srum-trl shapes eval --max_image_pixels`) or for
the whole process with the environment variable `SRUM_TRL_MAX_IMAGE_PIXELS`.
"""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_PIXELS_ENV = "SRUM_TRL_MAX_IMAGE_PIXELS"


def max_image_pixels(value: int | None = None) -> int:
    """The limit in force: `value` if given, else `$SRUM_TRL_MAX_IMAGE_PIXELS`, else the default."""
    if value is None:
        env = os.environ.get(MAX_IMAGE_PIXELS_ENV)
        if env is None:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{MAX_IMAGE_PIXELS_ENV}={env!r} is not a whole number of pixels.") from None
    if value < 1:
        raise ValueError(f"The image size limit must be >= 1 pixel, got {value}.")
    return int(value)


def check_image_size(image: Image.Image, where: str, max_pixels: int | None = None) -> None:
    """Raise a ValueError naming `where` when `image` has more pixels than the limit."""
    limit = max_image_pixels(max_pixels)
    width, height = image.size
    if width * height > limit:
        raise ValueError(
            f"{where} is {width} x {height} = {width * height} pixels, above the limit of {limit}: refused so that an "
            f"oversized (or decompression-bomb) image cannot exhaust memory. Shrink it, or raise the limit "
            f"(max_image_pixels, or the environment variable {MAX_IMAGE_PIXELS_ENV})."
        )


def open_image(path: str, max_pixels: int | None = None) -> Image.Image:
    """Open and decode an image file, checking its size from the header first; errors name the file."""
    try:
        image = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path}: {error}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not an image PIL can read ({error}).") from None
    check_image_size(image, path, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError) as error:  # a file cut short, a corrupt stream
        raise ValueError(f"{path} cannot be decoded ({error}): it is cut short or damaged.") from None
    return image
