"""The image budget: resize a table image to [min_pixels, max_pixels] the way Qwen's processor does,
so the size and the token count are known (and recorded) before the processor sees it.

Qwen3-VL: patch 16, spatial merge 2, so one image token per 32×32 pixels; sides are rounded to
multiples of 32. The processor's own default budget is 65,536–16,777,216 pixels (≤ 16,384 tokens).
"""
from __future__ import annotations

import math
from typing import Any

FACTOR = 32                      # patch 16 × merge 2
DEFAULT_MIN_PIXELS = 65_536
DEFAULT_MAX_PIXELS = 16_777_216


def smart_size(width: int, height: int, min_pixels: int | None = None, max_pixels: int | None = None,
               factor: int = FACTOR) -> tuple[int, int]:
    """(width, height) after Qwen's smart resize: multiples of ``factor`` (patch × merge), area within the
    budget, aspect kept."""
    lo = min_pixels or DEFAULT_MIN_PIXELS
    hi = max_pixels or DEFAULT_MAX_PIXELS
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > hi:
        beta = math.sqrt(height * width / hi)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < lo:
        beta = math.sqrt(lo / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def image_tokens(width: int, height: int) -> int:
    """Tokens for an image already sized to multiples of 32."""
    return (width // FACTOR) * (height // FACTOR)


def fit_image(image: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> Any:
    """The image resized to its smart size (a no-op when it already is that size)."""
    from PIL import Image

    w, h = smart_size(image.width, image.height, min_pixels, max_pixels)
    if (w, h) == image.size:
        return image
    return image.resize((w, h), Image.Resampling.BICUBIC)


def halve_pixels(image: Any) -> Any:
    """Half the area (each side / √2), for the OOM ladder and for fitting max_input_tokens."""
    w = max(FACTOR, int(image.width / math.sqrt(2)) // FACTOR * FACTOR)
    h = max(FACTOR, int(image.height / math.sqrt(2)) // FACTOR * FACTOR)
    from PIL import Image

    return image.resize((w, h), Image.Resampling.BICUBIC)
