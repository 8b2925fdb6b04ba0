"""Turn uploaded images (and client-sent tensors) into exactly what a model expects.

One implementation shared by the servers, batch jobs and the CLI, driven by the
model's :class:`~torchship.store.manifest.InputSpec`: Pillow decodes, NumPy and torch's
uint8 resampling do the rest (no torchvision):

1. :func:`decode_image` refuses what must not be decoded: empty or non-image bytes,
   truncated files (400) and decompression bombs (413, checked from the header
   before any pixel is allocated). It applies the EXIF orientation.
2. :func:`image_to_array` composites transparency, converts the colour mode, inverts
   dark-on-light drawings when the model was trained on light-on-dark data, fits the
   image to the model's size (``stretch``, ImageNet ``center_crop`` or digit ``ink``
   cropping) and normalizes it per channel.
3. :func:`validate_tensor` checks tensor inputs (JSON arrays, ``.npy``) instead.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from torchship.errors import (
    InvalidImageError,
    InvalidInputError,
    PayloadTooLargeError,
)
from torchship.store.manifest import InputSpec

T = TypeVar("T")

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "array_to_image",
    "decode_image",
    "image_to_array",
    "preprocess_batch",
    "preprocess_image",
    "tensor_to_image",
    "validate_tensor",
]

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest width * height accepted (~16.8 MP, a 64 MiB RGBA frame); more is a 413."""

SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
"""Pillow formats tried when decoding (JPEG includes the MPO files phone cameras write).
Others are refused (EPS runs Ghostscript, ...): every extra parser is attack surface on
an endpoint that decodes strangers' bytes."""

CROP_RATIO = 224 / 256
"""``center_crop`` resizes so the crop covers this fraction of the shorter side (ImageNet)."""

# "ink" fitting, tuned on round-tripped digits test images (see tests/test_preprocessing.py):
_INK_THRESHOLD = 0.3  # a pixel is ink above this fraction of the contrast range
_INK_MARGIN = 0.0  # the data set's digits touch the top and bottom of the 8x8 box
_INK_MIN_CONTRAST = 0.15  # below this the image is blank: no cropping, no stretching
_INK_STROKE = 0.155  # the data set's stroke width as a fraction of the digit's height
_INK_STROKE_BAND = (0.65, 1.35)  # strokes outside this band of it are dilated or eroded
_INK_STROKE_MIN_SIDE = 4  # measure strokes only when the ink spans 4x the output size
_INK_GRID = 8  # stroke width is adjusted on a grid 8x finer than the output (64x64)
_INK_GRID_MAX = 256  # ... but at most 256 pixels a side, for larger "ink" outputs
_INK_WORK_SIZE = 512  # bigger drawings are box-reduced first; 8x8 needs no more detail
_PROBE_SIZE = 256  # the invert decision looks at a reduced copy of big images


# --- decoding ----------------------------------------------------------------------


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode bytes into a fully loaded Pillow image, upright per its EXIF orientation.

    Raises :class:`InvalidImageError` for empty, unrecognized, truncated or corrupt
    data and :class:`PayloadTooLargeError` when the header declares more than
    ``max_pixels`` pixels; that check runs before the pixels are decoded, so a tiny
    file claiming 30000x30000 costs nothing. Multi-frame files (GIF, TIFF) give their
    first frame. ``draft`` (width, height) lets JPEGs decode at a reduced scale that is
    still at least that large: ~5x faster for phone photos headed for a 224x224 model.
    """
    if not data:
        raise InvalidImageError(
            "The image is empty (0 bytes).",
            hint="Send the file's bytes as the request body or as a multipart file field.",
        )
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (its warning too, where warnings are errors) fires in open()
        # for headers far beyond Image.MAX_IMAGE_PIXELS.
        raise _too_large(None, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            "The data is not an image in a supported format.",
            hint=f"Send one of: {', '.join(SUPPORTED_FORMATS)}.",
            size_bytes=len(data),
        ) from exc
    except Exception as exc:  # header parsers raise SyntaxError, OSError, struct.error, ...
        raise _corrupt(exc) from exc

    width, height = img.size
    if width * height > max_pixels:
        raise _too_large(img.size, max_pixels)
    if width == 0 or height == 0:
        raise InvalidImageError(f"The image has no pixels ({width}x{height}).")
    try:
        if draft is not None and img.format == "JPEG":
            img.draft(None, draft)
        img.load()  # force the full decode: Image.open only reads the header
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(img.size, max_pixels) from exc
    except Exception as exc:  # truncated or corrupt pixel data
        raise _corrupt(exc) from exc
    # A malformed EXIF block must not cost the user an otherwise valid image.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)
    return img


def _too_large(size: tuple[int, int] | None, max_pixels: int) -> PayloadTooLargeError:
    if size is None:  # Pillow refused the header before we could read its size
        what = "its header declares far more pixels than"
    else:
        what = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels, over"
    return PayloadTooLargeError(
        f"The image is too large: {what} the limit of {max_pixels:,} pixels.",
        hint="Downscale it before sending; the model only sees a small resized copy.",
        max_pixels=max_pixels,
    )


def _corrupt(exc: Exception) -> InvalidImageError:
    return InvalidImageError(
        "The image is truncated or corrupt and could not be decoded.",
        hint="Check that the whole file was sent (e.g. curl --data-binary @file).",
        reason=str(exc) or type(exc).__name__,
    )


# --- image -> model input --------------------------------------------------------------


def image_to_array(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """A decoded image as a float32 array of exactly ``spec.shape`` (C, H, W).

    Steps, in order: composite transparency (onto white, or onto black when the
    visible content is light, so white strokes stay visible); convert to
    ``spec.color``; decide inversion; fit to ``spec.shape[1:]`` by ``spec.fit``;
    scale to [0, 1]; then ``(x - mean) / std`` per channel.
    """
    _, size = _geometry(spec)
    img = _flatten(img)
    if img.mode != spec.color:
        img = img.convert(spec.color)
    invert = _should_invert(img, spec.invert)
    if spec.fit == "ink":
        arr = _to_float(_reduce(img, _INK_WORK_SIZE))
        if invert:
            arr = 1.0 - arr
        arr = _fit_ink(arr, size)
    else:
        fitted = _center_crop(img, size) if spec.fit == "center_crop" else _stretch(img, size)
        return _normalize_u8(fitted, spec, invert)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def _normalize_u8(chw: np.ndarray, spec: InputSpec, invert: bool) -> np.ndarray:
    """(C, H, W) 8-bit pixels straight to ``(x / 255 - mean) / std`` (or of ``1 - x / 255``).

    One scale and one shift per channel, written into the (C, H, W) output in place:
    the same numbers as the step-by-step formula, with two passes over the data
    instead of five (it matters for photo models, where this runs per image).
    """
    mean = np.asarray(spec.mean, dtype=np.float64).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float64).reshape(-1, 1, 1)
    if invert:  # (1 - x/255 - mean) / std
        scale, shift = -1.0 / (255.0 * std), (1.0 - mean) / std
    else:
        scale, shift = 1.0 / (255.0 * std), -mean / std
    out = np.empty(chw.shape, dtype=np.float32)
    np.multiply(chw, scale.astype(np.float32), out=out)
    out += shift.astype(np.float32)
    return out


def preprocess_image(
    data: bytes, spec: InputSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Encoded image bytes to one model input: a float32 tensor of ``spec.shape``."""
    if spec.kind != "image":
        raise InvalidInputError(
            "This model takes tensors, not images.",
            hint="Send a JSON array or an .npy file of the model's input shape.",
        )
    _geometry(spec)  # a broken spec fails before any decoding work
    img = decode_image(data, max_pixels=max_pixels, draft=_draft_size(spec))
    return torch.from_numpy(image_to_array(img, spec))


def preprocess_batch(
    items: Sequence[bytes], spec: InputSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Several encoded images to one batch (N, *spec.shape); errors name the bad item."""
    return torch.stack(
        each_image(items, lambda data: preprocess_image(data, spec, max_pixels=max_pixels))
    )


def each_image(items: Sequence[bytes], preprocess: Callable[[bytes], T]) -> list[T]:
    """``preprocess`` applied to each encoded image of a request; a refusal names the
    image (``Image 2: ...``) when there are several, and an empty list is refused."""
    if len(items) == 0:
        raise InvalidInputError("The batch holds no images.", hint="Send at least one image.")
    out = []
    for i, data in enumerate(items):
        try:
            out.append(preprocess(data))
        except (InvalidInputError, PayloadTooLargeError) as exc:
            if len(items) == 1:
                raise
            raise type(exc)(f"Image {i}: {exc.message}", hint=exc.hint, **exc.details) from exc
    return out


def _draft_size(spec: InputSpec) -> tuple[int, int]:
    """The smallest decode that loses nothing: twice what ``spec.fit`` will read."""
    if spec.fit == "ink":
        return (_INK_WORK_SIZE, _INK_WORK_SIZE)
    h, w = spec.shape[-2:]
    if spec.fit == "center_crop":
        h, w = math.ceil(h / CROP_RATIO), math.ceil(w / CROP_RATIO)
    return (2 * w, 2 * h)


def _geometry(spec: InputSpec) -> tuple[int, tuple[int, int]]:
    """(channels, (height, width)) of one input; ``spec.shape`` is authoritative."""
    channels = 1 if spec.color == "L" else 3
    if len(spec.shape) != 3 or spec.shape[0] != channels:
        raise ValueError(
            f"Input spec shape {spec.shape} does not fit color {spec.color!r}: "
            f"expected [{channels}, height, width]."
        )
    for name, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) not in (1, channels):
            raise ValueError(f"Input spec {name} needs 1 or {channels} values, got {values}.")
    if min(spec.std) <= 0:
        raise ValueError(f"Input spec std must be positive, got {spec.std}.")
    return channels, (spec.shape[1], spec.shape[2])


def _flatten(img: Image.Image) -> Image.Image:
    """An 8-bit "L" or "RGB" image: alpha composited, palettes and odd modes converted."""
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_depth_to_l(img)
    has_alpha = "A" in mode or "a" in mode or "transparency" in img.info
    if has_alpha:
        return _composite(img)
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    try:
        return img.convert("RGB")  # P, CMYK, YCbCr, HSV
    except ValueError as exc:  # e.g. LAB: Pillow needs a colour profile for it
        raise InvalidImageError(
            f"Images in colour mode {mode} are not supported.",
            hint="Convert the image to RGB or grayscale first.",
        ) from exc


def _composite(img: Image.Image) -> Image.Image:
    """Flatten transparency onto white, or onto black if what is visible is light.

    People upload drawings on transparent canvases. Dark strokes belong on white; light
    strokes on white would vanish, so those go on black instead.
    """
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    visible = float(alpha.sum())
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    light = visible > 0 and float((luma * alpha[..., 0]).sum()) / visible > 0.6
    background = 0.0 if light else 1.0
    out = rgb * alpha + background * (1.0 - alpha)
    return Image.fromarray(np.round(out * 255.0).astype(np.uint8), "RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale to 8-bit, scaled by the type's range."""
    a = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        full = 1.0 if a.size == 0 or np.nanmax(a) <= 1.0 else 255.0
    elif img.mode.startswith("I;16"):
        full = 65535.0
    else:  # "I": 16-bit PNGs in older Pillow; guess the range from the data
        peak = float(a.max()) if a.size else 0.0
        full = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    a = np.nan_to_num(np.clip(a / full, 0.0, 1.0))
    return Image.fromarray(np.round(a * 255.0).astype(np.uint8), "L")


def _should_invert(img: Image.Image, mode: str) -> bool:
    """``auto``: invert when the border is mostly light, i.e. a dark-on-light drawing.

    The models that use ``auto`` (digits) were trained on light ink on a dark
    background; the border of a drawing is background far more often than ink.
    """
    if mode != "auto":
        return mode == "always"
    probe = _reduce(img.convert("L"), _PROBE_SIZE)
    return float(np.median(_border(_to_float(probe)[0]))) > 0.5


def _border(a: np.ndarray) -> np.ndarray:
    """The pixels of a 2-D array's outer frame, ~3% of each side thick (at least 1)."""
    h, w = a.shape
    t = max(1, round(0.03 * min(h, w)))
    return np.concatenate(
        [a[:t].ravel(), a[-t:].ravel(), a[t:-t, :t].ravel(), a[t:-t, -t:].ravel()]
    )


def _reduce(img: Image.Image, limit: int) -> Image.Image:
    """Box-reduce by an integer factor so the longer side is at most ~``limit``."""
    factor = math.ceil(max(img.size) / limit)
    return img.reduce(factor) if factor > 1 else img


def _to_float(img: Image.Image) -> np.ndarray:
    """(C, H, W) float32 in [0, 1] from an 8-bit "L" or "RGB" image."""
    a = np.asarray(img, dtype=np.float32) / 255.0
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _stretch(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    return _resample(np.asarray(img), size)


def _center_crop(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """torchvision's ``Resize(256)`` + ``CenterCrop(224)``, generalized to any crop size.

    Resizes only the centred box that the crop keeps, so a long thin panorama costs no
    more than a square photo. The box is whole pixels, as torchvision's crop is.
    """
    h, w = size
    width, height = img.size
    scale = max(h / CROP_RATIO / height, w / CROP_RATIO / width)  # output px per source px
    crop_w = min(width, max(1, round(w / scale)))
    crop_h = min(height, max(1, round(h / scale)))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return _resample(np.asarray(img)[top : top + crop_h, left : left + crop_w], size)


def _resample(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W[, C]) 8-bit pixels to (C, *size), bilinear, antialiased when shrinking.

    torch's uint8 kernel for this is a vectorized port of Pillow's resampling (the same
    filter, within a level or two): 2-2.5x faster than Pillow on photos, which made it
    a third of a ResNet request's preprocessing.
    """
    h, w = size
    x = torch.from_numpy(np.array(pixels))  # a writable copy of Pillow's read-only buffer
    x = x.permute(2, 0, 1)[None] if x.ndim == 3 else x[None, None]
    if tuple(x.shape[-2:]) != (h, w):
        x = torch.nn.functional.interpolate(
            x, size=(h, w), mode="bilinear", antialias=True, align_corners=False
        )
    return x[0].numpy()


def _fit_ink(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Crop to the ink, centre it, normalize stroke width, area-resize, stretch contrast.

    ``arr`` is (C, H, W) in [0, 1] with light ink on a dark background. The result
    looks like the data set's digits: the longer side of the ink fills the box, the ink
    is centred, strokes are about as thick relative to the digit as the data set's, and
    the strongest ink is 1.0.
    """
    lum = arr.mean(axis=0)
    background = float(np.median(_border(lum)))
    peak = float(lum.max())
    if peak - background < _INK_MIN_CONTRAST:  # blank: nothing to crop or stretch
        return _resize(arr, size, box=None)
    arr = np.clip((arr - background) / (peak - background), 0.0, 1.0)
    lum = (lum - background) / (peak - background)
    ink = lum > _INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    top, bottom = rows[0], rows[-1] + 1
    left, right = cols[0], cols[-1] + 1
    h, w = size
    scale = max((bottom - top) / h, (right - left) / w) * (1 + 2 * _INK_MARGIN)  # src px/px
    cy, cx = (top + bottom) / 2, (left + right) / 2
    # Snap the box to whole source pixels: on small images a sub-pixel shift is a blur.
    y0, x0 = round(cy - h * scale / 2), round(cx - w * scale / 2)
    y1, x1 = y0 + h * scale, x0 + w * scale
    # Pad with background where the box leaves the image, then resize the box onto a
    # finer grid first: stroke width is adjusted there, before the final area-resize.
    _, height, width = arr.shape
    pt, pl = max(0, math.ceil(-y0)), max(0, math.ceil(-x0))
    pb, pr = max(0, math.ceil(y1 - height)), max(0, math.ceil(x1 - width))
    if pt or pl or pb or pr:
        arr = np.pad(arr, ((0, 0), (pt, pb), (pl, pr)))
    k = max(1, min(_INK_GRID, _INK_GRID_MAX // max(h, w)))
    grid = _resize(arr, (h * k, w * k), box=(x0 + pl, y0 + pt, x1 + pl, y1 + pt))
    side = max(bottom - top, right - left)
    if side >= _INK_STROKE_MIN_SIDE * max(h, w):  # small images: too coarse to measure
        stroke = _stroke_width(np.clip(lum, 0.0, 1.0)) / side  # fraction of the ink box
        low, high = _INK_STROKE_BAND
        if stroke < _INK_STROKE * low:
            grid = _dilate(grid, round((_INK_STROKE - stroke) * k * max(h, w) / 2))
        elif stroke > _INK_STROKE * high:
            grid = _erode(grid, round((stroke - _INK_STROKE) * k * max(h, w) / 2))
    out = _resize(grid, size, box=None)
    top_ink = float(out.max())
    return out / top_ink if top_ink > 0 else out


def _stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width in pixels of a drawing with ink in [0, 1]: 2 * mass / variation.

    A stroke of width t, length L and full intensity has mass t * L and total variation
    (the summed absolute steps across it) 2 * L. Blurring preserves both, so the estimate
    holds for anti-aliased, smoothed and JPEG-compressed drawings alike.
    """
    p = np.pad(ink, 1)
    variation = float(np.abs(np.diff(p, axis=0)).sum() + np.abs(np.diff(p, axis=1)).sum())
    return 2.0 * float(ink.sum()) / variation if variation else 0.0


def _dilate(a: np.ndarray, r: int) -> np.ndarray:
    """Grey dilation of each plane by a (2r+1) square; the planes grow by r on each side."""
    if r <= 0:
        return a
    _, h, w = a.shape
    p = np.pad(a, ((0, 0), (2 * r, 2 * r), (2 * r, 2 * r)))
    rows = np.max([p[:, i : i + h + 2 * r] for i in range(2 * r + 1)], axis=0)
    return np.max([rows[:, :, j : j + w + 2 * r] for j in range(2 * r + 1)], axis=0)


def _erode(a: np.ndarray, r: int) -> np.ndarray:
    """Grey erosion of each plane by a (2r+1) square, treating outside as background."""
    if r <= 0:
        return a
    _, h, w = a.shape
    p = np.pad(a, ((0, 0), (r, r), (r, r)))
    rows = np.min([p[:, i : i + h] for i in range(2 * r + 1)], axis=0)
    return np.min([rows[:, :, j : j + w] for j in range(2 * r + 1)], axis=0)


def _resize(
    arr: np.ndarray, size: tuple[int, int], *, box: tuple[float, float, float, float] | None
) -> np.ndarray:
    """Area-resize each channel of a (C, H, W) float array (Pillow "F" images)."""
    h, w = size
    out = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(channel), "F").resize(
                (w, h), Image.Resampling.BOX, box=box
            )
        )
        for channel in arr
    ]
    return np.stack(out).astype(np.float32)


# --- tensors -------------------------------------------------------------------------


def validate_tensor(x: np.ndarray | torch.Tensor | Sequence[Any], spec: InputSpec) -> torch.Tensor:
    """Check a client-sent tensor (array, tensor or nested lists) against ``spec``.

    Accepts one item of ``spec.shape`` or a batch ``(N, *spec.shape)``; requires a
    numeric dtype that casts to ``spec.dtype`` without losing its kind (no floats into
    an integer model) and finite values after the cast. Returns a contiguous
    ``(N, *spec.shape)`` tensor of ``spec.dtype``.
    """
    target = _torch_dtype(spec.dtype)
    expected = tuple(spec.shape)
    if isinstance(x, torch.Tensor):
        tensor = x.detach().cpu()
        kind, shape = _torch_kind(tensor.dtype), tuple(tensor.shape)
        dtype: object = tensor.dtype
    else:
        try:
            array = np.asarray(x)
        except ValueError as exc:  # ragged nested lists
            raise InvalidInputError(
                "The input is not a rectangular array (rows of different lengths).",
                hint=_shape_hint(expected),
            ) from exc
        kind, shape, dtype = array.dtype.kind, array.shape, array.dtype
    if kind not in "iuf":
        dtype_name = str(dtype).removeprefix("torch.")  # str() of a dtype is slow: errors only
        raise InvalidInputError(
            f"The input has dtype {dtype_name}; a numeric array is required.",
            hint=f"Send numbers convertible to {spec.dtype}.",
        )
    if kind == "f" and not target.is_floating_point:
        dtype_name = str(dtype).removeprefix("torch.")
        raise InvalidInputError(
            f"The input has dtype {dtype_name}, but the model takes {spec.dtype}.",
            hint="Send integers.",
        )
    if shape == expected:
        batched = False
    elif len(shape) == len(expected) + 1 and shape[1:] == expected:
        batched = True
    else:
        dims = ", ".join(map(str, expected))
        raise InvalidInputError(
            f"Expected an input of shape [{dims}] or [N, {dims}], got {list(shape)}.",
            hint=_shape_hint(expected),
            expected=list(expected),
            got=list(shape),
        )
    if batched and shape[0] == 0:
        raise InvalidInputError("The batch is empty.", hint="Send at least one item.")
    if not isinstance(x, torch.Tensor):
        # numpy first: it handles big-endian and unsigned types that torch does not.
        as_numpy = _numpy_dtype(target)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused below
            converted = np.ascontiguousarray(array, dtype=as_numpy)
        if not converted.flags.writeable:  # e.g. np.frombuffer over a request body
            converted = converted.copy()
        if as_numpy.kind == "f" and target in _NUMPY_EXACT:
            # The check in numpy: a fraction of torch's per-call cost on small requests.
            if not np.isfinite(converted).all():
                raise _not_finite(spec)
            # numpy held the exact dtype: from_numpy is the answer (each torch call
            # skipped is a few microseconds of a small request)
            return torch.from_numpy(converted if batched else converted[None])
        tensor = torch.from_numpy(converted)
    tensor = tensor.to(target).contiguous()
    if target.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise _not_finite(spec)
    return tensor if batched else tensor.unsqueeze(0)


_NUMPY_EXACT = frozenset({torch.float16, torch.float32, torch.float64})
"""Float dtypes numpy holds exactly (not bfloat16), so finiteness can be checked there."""


def _not_finite(spec: InputSpec) -> InvalidInputError:
    return InvalidInputError(
        f"The input contains NaN or infinite values, or values too large for {spec.dtype}.",
        hint="Send finite numbers only.",
    )


def _torch_kind(dtype: torch.dtype) -> str:
    """numpy's dtype.kind letter for a torch dtype: f, c, b or i."""
    if dtype.is_floating_point:
        return "f"
    if dtype.is_complex:
        return "c"
    return "b" if dtype == torch.bool else "i"


@functools.cache
def _numpy_dtype(target: torch.dtype) -> np.dtype[Any]:
    try:
        return np.dtype(str(target).removeprefix("torch."))
    except TypeError:  # bfloat16 and friends: go through a type numpy has
        return np.dtype(np.float32 if target.is_floating_point else np.int64)


def _shape_hint(expected: tuple[int, ...]) -> str:
    dims = ", ".join(map(str, expected))
    return f"Send one item of shape [{dims}] or a batch of shape [N, {dims}]."


@functools.cache
def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"Input spec dtype {name!r} is not a torch dtype.")
    return dtype


# --- arrays -> images (samples, previews) --------------------------------------------


def array_to_image(a: np.ndarray | torch.Tensor, *, vmax: float = 1.0) -> Image.Image:
    """An 8-bit image from an array of values in [0, vmax].

    Accepts (H, W), (1, H, W) or (H, W, 1) for grayscale and (3, H, W) or (H, W, 3)
    for RGB; values are clipped.
    """
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    arr = arr.astype(np.float32)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise ValueError(f"Cannot render an array of shape {arr.shape} as an image.")
    pixels = np.round(np.clip(arr / vmax, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB")


def tensor_to_image(x: np.ndarray | torch.Tensor, spec: InputSpec) -> Image.Image:
    """What the model sees: undo ``spec``'s normalization of one (C, H, W) input."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    return array_to_image(arr.astype(np.float32) * std + mean)
