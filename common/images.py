"""Load, resize, save and lay out images.

Between loading and saving an image is ``pixels: float32 (height, width, 3), RGB,
0..255``, and sizes are ``(height, width)`` everywhere.

:func:`load_image` takes anything Pillow opens: it applies the EXIF orientation,
brings grey, palette, 1-bit, CMYK, 16-bit and floating-point images to RGB in
0..255, and composites transparency on white. What it decided along the way comes
back as ``notes`` for the caller to print; this module prints nothing.

:func:`save_image` picks the format from the extension and writes atomically: a
temporary file in the same folder, then ``os.replace``, so a failed save never
leaves a half-written file or clobbers an existing one.

Every refusal, whether of a file that cannot be read, a path that cannot be
written or pixels that cannot be saved, is an :class:`ImageError` (a
``ValueError``) whose one-line message starts with the path; the underlying
``OSError`` or Pillow error is chained. Bad sizes, which name no file, are plain
``ValueError``.

Resampling: :func:`resize` works on float32 channels through Pillow's ``"F"``
mode, so nothing is quantised to 8 bits. It uses Lanczos when the image shrinks
(antialiased, sharp) and bicubic when it grows (less ringing than Lanczos).

Notes
-----
Embedded ICC colour profiles are ignored: CMYK goes to RGB by Pillow's plain
formula and wide-gamut RGB is taken as sRGB.
"""

import contextlib
import operator
import os
import secrets
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import (
    ExifTags,
    Image,
    ImageDraw,
    ImageFont,
    ImageOps,
    UnidentifiedImageError,
)
from PIL.PngImagePlugin import PngInfo

ALLOW_LARGE_FLAG = "--allow_large_images"

# Extension -> (Pillow format name, save options).
SAVE_FORMATS = {
    ".png": ("PNG", {}),
    ".jpg": ("JPEG", {"quality": 95}),
    ".jpeg": ("JPEG", {"quality": 95}),
    ".webp": ("WEBP", {"quality": 95}),
    ".tif": ("TIFF", {"compression": "tiff_deflate"}),
    ".tiff": ("TIFF", {"compression": "tiff_deflate"}),
}

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

# What Pillow raises while decoding damaged or unusual data, besides OSError.
_DECODE_ERRORS = (
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    struct.error,
)


class ImageError(ValueError):
    """An image that cannot be read, saved or used; the message names the path."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass
class LoadedImage:
    """An image as loaded, and what :func:`load_image` did to it.

    ``pixels``: float32 (height, width, 3), RGB, 0..255, after any resize.
    ``original_size``: (height, width) of the file after EXIF orientation.
    ``notes``: one-line remarks for the caller to print.
    """

    pixels: np.ndarray
    original_size: tuple
    path: Path
    notes: list = field(default_factory=list)

    @property
    def size(self):
        """(height, width) of ``pixels``."""
        return self.pixels.shape[:2]


def load_image(path, *, max_size=0, size=None, allow_large=False):
    """Read an image file as ``float32 (height, width, 3), RGB, 0..255``.

    ``max_size`` limits the long side, keeping the aspect ratio (0 keeps the
    size; it never upscales). ``size=(height, width)`` resizes to exactly that
    and takes precedence over ``max_size``. Images past Pillow's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused unless
    ``allow_large`` is true; the limit is lifted for this call only.

    Returns a :class:`LoadedImage`. Raises :class:`ImageError` naming the path
    for a missing, empty, unreadable, truncated or non-image file.
    """
    max_size = _check_max_size(max_size)
    if size is not None:
        size = _check_size(size, allow_large)
    path = Path(path)
    _check_readable(path)

    notes = []
    try:
        with _pixel_limit(allow_large), Image.open(path) as image:
            # A full decode here, so truncated data fails inside this try.
            image.load()
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                notes.append(f"{path.name} has {frames} frames: using the first")
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
            if orientation in range(2, 9):
                ImageOps.exif_transpose(image, in_place=True)
                notes.append(f"{path.name} turned by its EXIF orientation")
            pixels = _to_rgb(image, path, notes)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(
            path,
            f"larger than Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels "
            f"against decompression bombs; pass {ALLOW_LARGE_FLAG} to load it anyway",
        ) from error
    except UnidentifiedImageError as error:
        raise ImageError(path, "not an image file Pillow can read") from error
    except OSError as error:
        if error.errno is None:  # Pillow's own complaint about the data
            raise ImageError(path, f"cannot decode the image ({error})") from error
        raise ImageError(path, f"cannot read ({_reason(error)})") from error
    except _DECODE_ERRORS as error:
        raise ImageError(path, f"cannot decode the image ({error})") from error

    original_size = pixels.shape[:2]
    if 0 in original_size:
        raise ImageError(path, "the image has no pixels")
    target = size if size is not None else fit_size(original_size, max_size)
    if target != original_size:
        pixels = np.clip(resize(pixels, target), 0.0, 255.0)
        notes.append(
            f"{path.name} resized from {_size_text(original_size)} "
            f"to {_size_text(target)} (height x width)"
        )
    return LoadedImage(pixels, original_size, path, notes)


def resize(pixels, size):
    """Resize a float image to ``size=(height, width)`` without quantising.

    ``pixels``: float (height, width) or (height, width, channels), any range;
    the result is float32 in the same layout. Values are not clipped: Lanczos
    and bicubic may overshoot a little at sharp edges.
    """
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim not in (2, 3) or 0 in pixels.shape:
        raise ValueError(
            "expected pixels shaped (height, width) or (height, width, channels), "
            f"got shape {pixels.shape}"
        )
    height, width = _check_size(size, allow_large=True)
    if (height, width) == pixels.shape[:2]:
        return pixels.copy()

    grows = height * width > pixels.shape[0] * pixels.shape[1]
    method = Image.Resampling.BICUBIC if grows else Image.Resampling.LANCZOS
    channels = pixels[..., None] if pixels.ndim == 2 else pixels
    resized = np.empty((height, width, channels.shape[2]), dtype=np.float32)
    for channel in range(channels.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(channels[..., channel]), "F")
        resized[..., channel] = np.asarray(plane.resize((width, height), method))
    return resized[..., 0] if pixels.ndim == 2 else resized


def fit_size(size, max_size):
    """The (height, width) after limiting the long side to ``max_size``.

    0 keeps the size; it never upscales; each side stays at least 1 pixel.
    """
    height, width = _check_size(size, allow_large=True)
    max_size = _check_max_size(max_size)
    if max_size == 0 or max(height, width) <= max_size:
        return (height, width)
    scale = max_size / max(height, width)
    return (max(1, round(height * scale)), max(1, round(width * scale)))


def save_image(pixels, path, *, metadata=None):
    """Write ``pixels: float (height, width, 3), RGB, 0..255`` to ``path``.

    Values are clipped to 0..255 and rounded to 8 bits. The format follows the
    extension (see ``SAVE_FORMATS``). ``metadata``, a dict of str to str, goes
    into the PNG's text chunks; other formats drop it. A missing folder is
    created. The write is atomic. Returns the path written.

    Raises :class:`ImageError` for an unknown extension, non-finite or
    misshapen pixels, or a path that cannot be written; nothing is left behind
    and an existing file at ``path`` is unchanged.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVE_FORMATS:
        supported = ", ".join(SAVE_FORMATS)
        raise ImageError(
            path, f"unknown image extension {suffix or '(none)'!r}; use {supported}"
        )
    image = Image.fromarray(_to_uint8(pixels, path), "RGB")
    pillow_format, options = SAVE_FORMATS[suffix]
    options = dict(options)
    if metadata and pillow_format == "PNG":
        options["pnginfo"] = _png_text(metadata)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ImageError(
            path,
            f"cannot create its folder ({folder_error_reason(path.parent, error)})",
        ) from error
    _write_atomically(image, path, pillow_format, options)
    return path


def folder_error_reason(folder, error):
    """Why ``folder`` could not be created or written in, in a few words.

    A file where a folder should be makes the OS say "File exists" or "Not a
    directory"; this names that file instead. Otherwise the OS's words.
    """
    folder = Path(folder)
    for place in (folder, *folder.parents):
        if place.exists():
            if not place.is_dir():
                return f"{place} is a file, not a folder"
            break
    return _reason(error)


def montage(images, captions=None, *, height=256, gap=8, background=255, font_size=14):
    """Lay images side by side at one height, with captions underneath.

    ``images``: a sequence of float (height, width, 3), RGB, 0..255. Each is
    scaled to ``height`` keeping its aspect ratio; ``gap`` pixels of
    ``background`` (a grey level or an RGB triple) separate them and frame the
    whole. ``captions`` (one string per image) are drawn under each image in
    Pillow's default font, wrapped to the image's width.

    Returns float32 (gap + height + caption band + gap, sum of widths + gaps,
    3), RGB, 0..255, ready for :func:`save_image`.
    """
    if len(images) == 0:
        raise ValueError("montage needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(
            f"montage got {len(images)} images but {len(captions)} captions"
        )
    height = _check_size((height, 1), allow_large=True)[0]
    gap = operator.index(gap)
    if gap < 0:
        raise ValueError(f"montage gap must be 0 or more pixels, got {gap}")
    fill = _background_rgb(background)

    # Scale every image to the common height, then wrap each caption to its tile.
    tiles = [_montage_tile(image, index, height) for index, image in enumerate(images)]
    font = _default_font(font_size)
    line_height = _line_height(font)
    if captions is None:
        lines, band = [[] for _ in tiles], 0
    else:
        lines = [
            _wrap(str(caption), font, tile.width)
            for caption, tile in zip(captions, tiles, strict=True)
        ]
        band = max(len(tile_lines) for tile_lines in lines) * line_height + gap

    # Paste tiles left to right on the background, captions under each.
    width = sum(tile.width for tile in tiles) + gap * (len(tiles) + 1)
    canvas = Image.new("RGB", (width, gap + height + band + gap), fill)
    draw = ImageDraw.Draw(canvas)
    ink = (0, 0, 0) if sum(fill) >= 3 * 128 else (255, 255, 255)
    left = gap
    for tile, tile_lines in zip(tiles, lines, strict=True):
        canvas.paste(tile, (left, gap))
        for row, text in enumerate(tile_lines):
            top = gap + height + gap // 2 + row * line_height
            draw.text((left, top), text, fill=ink, font=font)
        left += tile.width + gap
    return np.asarray(canvas, dtype=np.float32)


# -- loading -----------------------------------------------------------------


def _check_readable(path):
    """Refuse paths Pillow would fail on with a less helpful message."""
    if not path.exists():
        raise ImageError(path, "no such file")
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image file")
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "the file is empty (0 bytes)")
    except OSError as error:
        raise ImageError(path, f"cannot read ({_reason(error)})") from error


@contextlib.contextmanager
def _pixel_limit(allow_large):
    """Treat Pillow's decompression-bomb warning as an error, or lift the limit.

    The global ``Image.MAX_IMAGE_PIXELS`` is restored on the way out.
    """
    if not allow_large:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
        return
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _to_rgb(image, path, notes):
    """Any Pillow image -> float32 (height, width, 3), RGB, 0..255."""
    if image.mode in SIXTEEN_BIT_MODES:
        notes.append(f"{path.name} is 16-bit grey: scaled from 0..65535 to 0..255")
        return _grey_to_rgb(np.asarray(image, dtype=np.float32) * (255.0 / 65535.0))
    if image.mode in ("I", "F"):
        return _grey_to_rgb(_wide_grey(image, path, notes))
    if image.mode == "CMYK":
        notes.append(f"{path.name} is CMYK: converted to RGB without a colour profile")
    if _has_transparency(image):
        return _composite_on_white(image.convert("RGBA"), path, notes)
    try:
        rgb = image.convert("RGB")
    except ValueError as error:
        raise ImageError(path, f"colour mode {image.mode} is not supported") from error
    return np.asarray(rgb, dtype=np.float32)


def _has_transparency(image):
    # Image.has_transparency_data needs Pillow 10.1; this is the same test.
    return (
        image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    )


def _wide_grey(image, path, notes):
    """32-bit integer or float grey -> float32 (height, width), 0..255.

    Integers in 0..65535 are taken as 16-bit (what older Pillow gives for
    16-bit files); floats in 0..1 as unit range and in 0..255 as is. Anything
    else is stretched from its own minimum and maximum, with a note.
    """
    grey = np.asarray(image, dtype=np.float64)
    if not np.isfinite(grey).all():
        raise ImageError(path, "the image has NaN or infinite pixels")
    low, high = float(grey.min()), float(grey.max())
    if image.mode == "I" and low >= 0 and high <= 65535:
        notes.append(f"{path.name} is 16-bit grey: scaled from 0..65535 to 0..255")
        return (grey * (255.0 / 65535.0)).astype(np.float32)
    if image.mode == "F" and low >= 0 and high <= 1:
        notes.append(f"{path.name} has float pixels in 0..1: scaled to 0..255")
        return (grey * 255.0).astype(np.float32)
    if image.mode == "F" and low >= 0 and high <= 255:
        return grey.astype(np.float32)
    notes.append(
        f"{path.name} has {image.mode} pixels in {low:g}..{high:g}: stretched to 0..255"
    )
    if high == low:
        return np.zeros(grey.shape, dtype=np.float32)
    return ((grey - low) * (255.0 / (high - low))).astype(np.float32)


def _grey_to_rgb(grey):
    return np.repeat(grey[..., None], 3, axis=2).astype(np.float32)


def _composite_on_white(rgba, path, notes):
    """RGBA image -> float32 RGB over a white background."""
    values = np.asarray(rgba, dtype=np.float32)
    alpha = values[..., 3:] / 255.0
    if alpha.min() < 1.0:
        notes.append(f"{path.name} has transparency: composited on white")
    return values[..., :3] * alpha + 255.0 * (1.0 - alpha)


# -- sizes -------------------------------------------------------------------


def _check_size(size, allow_large):
    """A (height, width) of positive integers within Pillow's pixel limit."""
    try:
        height, width = (operator.index(side) for side in size)
    except (TypeError, ValueError):
        raise ValueError(
            f"expected a size (height, width) of two integers, got {size!r}"
        ) from None
    if height < 1 or width < 1:
        raise ValueError(f"size must be at least 1x1 pixels, got {height}x{width}")
    limit = Image.MAX_IMAGE_PIXELS
    if not allow_large and limit is not None and height * width > limit:
        raise ValueError(
            f"size {height}x{width} is over the limit of {limit} pixels; "
            f"pass {ALLOW_LARGE_FLAG} to allow it"
        )
    return (height, width)


def _check_max_size(max_size):
    try:
        max_size = operator.index(max_size)
    except TypeError:
        raise ValueError(
            f"max_size must be a whole number of pixels, got {max_size!r}"
        ) from None
    if max_size < 0:
        raise ValueError(f"max_size must be 0 (keep the size) or more, got {max_size}")
    return max_size


def _size_text(size):
    return f"{size[0]}x{size[1]}"


# -- saving ------------------------------------------------------------------


def _to_uint8(pixels, path):
    """float (height, width, 3), RGB, 0..255 -> uint8, refusing what can't be saved."""
    try:
        pixels = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ImageError(path, f"pixels are not numbers ({error})") from error
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise ImageError(
            path, f"expected pixels shaped (height, width, 3), got {pixels.shape}"
        )
    if not np.isfinite(pixels).all():
        raise ImageError(path, "the pixels contain NaN or infinity; nothing written")
    return np.rint(np.clip(pixels, 0.0, 255.0)).astype(np.uint8)


def _png_text(metadata):
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(str(key), str(value))
    return info


def _write_atomically(image, path, pillow_format, options):
    """Save to a temporary name beside ``path``, then rename over it."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # "xb" creates the file with the usual permissions (umask), unlike mkstemp.
        with open(temporary, "xb") as file:
            image.save(file, format=pillow_format, **options)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise ImageError(path, f"cannot write ({_reason(error)})") from error
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _reason(error):
    """The OS's words for an error, without repeating the path."""
    return error.strerror or str(error)


# -- montage -----------------------------------------------------------------


def _montage_tile(image, index, height):
    """float (h, w, 3), RGB, 0..255 -> an 8-bit Pillow image ``height`` tall."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise ValueError(
            f"montage image {index} must be shaped (height, width, 3), "
            f"got {pixels.shape}"
        )
    if not np.isfinite(pixels).all():
        raise ValueError(f"montage image {index} has NaN or infinite pixels")
    image_height, image_width = pixels.shape[:2]
    size = (height, max(1, round(image_width * height / image_height)))
    scaled = np.rint(np.clip(resize(pixels, size), 0, 255)).astype(np.uint8)
    return Image.fromarray(scaled, "RGB")


def _background_rgb(background):
    values = np.broadcast_to(np.asarray(background, dtype=np.float64), (3,))
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
        raise ValueError(
            "background must be a grey level or an RGB triple in 0..255, "
            f"got {background!r}"
        )
    return tuple(int(round(value)) for value in values)


def _default_font(font_size):
    """Pillow's default font, at ``font_size`` where FreeType is available."""
    try:
        return ImageFont.load_default(size=font_size)
    except (ImportError, TypeError, OSError):
        return ImageFont.load_default()


def _line_height(font):
    left, top, right, bottom = font.getbbox("Ag|")
    return bottom + 4


def _wrap(text, font, width):
    """Split ``text`` into lines no wider than ``width`` pixels (words kept whole
    unless one alone is too wide)."""
    lines = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        while font.getlength(word) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and font.getlength(word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines
