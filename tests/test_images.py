"""Tests for common/images.py: odd modes built from the real photos, bad paths,
atomic saves, resizing and the montage."""

import os
import sys

import numpy as np
import pytest
from PIL import ExifTags, Image

from common import images
from common.images import ImageError, fit_size, load_image, montage, resize, save_image

CAT_SIZE = (300, 451)  # chelsea_cat.png, (height, width)
SCREAM_SIZE = (1528, 1200)  # the_scream.jpg, (height, width)


@pytest.fixture(scope="module")
def cat(shared_dir):
    """The cat photo as a Pillow RGB image, 451x300."""
    with Image.open(shared_dir / "images" / "chelsea_cat.png") as image:
        return image.convert("RGB")


@pytest.fixture
def folder(tmp_path):
    """A folder whose name has a space, to check paths are taken as typed."""
    path = tmp_path / "my images"
    path.mkdir()
    return path


def write(image, path, **options):
    image.save(path, **options)
    return path


def leftovers(path):
    """Temporary files a save may have left in ``path``."""
    return sorted(name for name in os.listdir(path) if name.endswith(".tmp"))


# -- the real photos -----------------------------------------------------------


def test_rgb_photo_loads_unchanged(shared_dir, cat):
    loaded = load_image(shared_dir / "images" / "chelsea_cat.png")

    assert loaded.pixels.dtype == np.float32
    assert loaded.pixels.shape == (*CAT_SIZE, 3)
    assert loaded.original_size == CAT_SIZE
    np.testing.assert_array_equal(loaded.pixels, np.asarray(cat, dtype=np.float32))
    assert loaded.notes == []


def test_max_size_limits_the_long_side_and_says_so(shared_dir):
    loaded = load_image(str(shared_dir / "images" / "the_scream.jpg"), max_size=512)

    assert loaded.original_size == SCREAM_SIZE
    assert loaded.pixels.shape == (512, 402, 3)
    assert 0.0 <= loaded.pixels.min() and loaded.pixels.max() <= 255.0
    assert loaded.notes == [
        "the_scream.jpg resized from 1528x1200 to 512x402 (height x width)"
    ]


def test_max_size_never_upscales(shared_dir):
    loaded = load_image(shared_dir / "images" / "chelsea_cat.png", max_size=1000)

    assert loaded.pixels.shape == (*CAT_SIZE, 3)
    assert loaded.notes == []


def test_size_resizes_to_exactly_that(shared_dir):
    loaded = load_image(
        shared_dir / "images" / "astronaut.png", size=(64, 80), max_size=32
    )

    assert loaded.pixels.shape == (64, 80, 3)
    assert loaded.original_size == (512, 512)
    assert "to 64x80" in loaded.notes[0]


# -- odd modes, built from the cat -------------------------------------------------


def test_grey_becomes_three_equal_channels(cat, folder):
    grey = cat.convert("L")
    loaded = load_image(write(grey, folder / "grey.png"))

    expected = np.asarray(grey, dtype=np.float32)
    for channel in range(3):
        np.testing.assert_array_equal(loaded.pixels[..., channel], expected)


def test_one_bit_becomes_black_and_white(cat, folder):
    loaded = load_image(write(cat.convert("1"), folder / "bits.png"))

    assert set(np.unique(loaded.pixels)) == {0.0, 255.0}
    assert loaded.pixels.shape == (*CAT_SIZE, 3)


def test_palette_without_transparency(cat, folder):
    palette = cat.quantize(colors=32)
    loaded = load_image(write(palette, folder / "palette.png"))

    np.testing.assert_array_equal(loaded.pixels, np.asarray(palette.convert("RGB")))
    assert loaded.notes == []


def test_palette_transparency_becomes_white(cat, folder):
    palette = cat.quantize(colors=32)
    indices = np.asarray(palette)
    clear = int(indices[0, 0])
    loaded = load_image(write(palette, folder / "clear.png", transparency=clear))

    opaque = np.asarray(palette.convert("RGB"), dtype=np.float32)
    is_clear = indices == clear
    assert is_clear.any() and not is_clear.all()
    assert (loaded.pixels[is_clear] == 255.0).all()
    np.testing.assert_array_equal(loaded.pixels[~is_clear], opaque[~is_clear])
    assert loaded.notes == ["clear.png has transparency: composited on white"]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(cat, folder, mode):
    colour = cat.convert(mode[:-1])
    alpha = np.full(CAT_SIZE, 255, dtype=np.uint8)
    alpha[:10, :10] = 0  # fully transparent corner
    alpha[-10:, -10:] = 128  # half transparent corner
    colour.putalpha(Image.fromarray(alpha))
    loaded = load_image(write(colour, folder / f"{mode}.png"))

    opaque = np.asarray(colour.convert("RGB"), dtype=np.float32)
    assert (loaded.pixels[:10, :10] == 255.0).all()
    half = 128 / 255
    np.testing.assert_allclose(
        loaded.pixels[-10:, -10:],
        opaque[-10:, -10:] * half + 255 * (1 - half),
        atol=1e-3,
    )
    np.testing.assert_array_equal(loaded.pixels[20:-20], opaque[20:-20])
    assert loaded.notes == [f"{mode}.png has transparency: composited on white"]


def test_opaque_alpha_gives_no_note(cat, folder):
    loaded = load_image(write(cat.convert("RGBA"), folder / "opaque.png"))

    np.testing.assert_array_equal(loaded.pixels, np.asarray(cat, dtype=np.float32))
    assert loaded.notes == []


def test_sixteen_bit_grey_is_scaled_not_clipped(cat, folder):
    grey = np.asarray(cat.convert("L"), dtype=np.uint16)
    deep = grey * 257  # 0..255 -> 0..65535, brightness order kept
    deep[0, 0], deep[0, 1] = 0, 65535
    path = write(Image.fromarray(deep), folder / "deep.png")
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a 16-bit file
    loaded = load_image(path)

    assert loaded.pixels.min() == 0.0 and loaded.pixels.max() == 255.0
    np.testing.assert_allclose(loaded.pixels[..., 1], deep / 257.0, atol=1e-3)
    assert loaded.notes == ["deep.png is 16-bit grey: scaled from 0..65535 to 0..255"]


def test_thirty_two_bit_integer_grey_in_sixteen_bit_range(folder):
    values = np.array([[0, 1000], [30000, 65535]], dtype=np.int32)
    path = write(Image.fromarray(values, "I"), folder / "wide.tif")
    loaded = load_image(path)

    np.testing.assert_allclose(loaded.pixels[..., 0], values * 255 / 65535, atol=1e-3)


@pytest.mark.parametrize(
    ("values", "expected", "note"),
    [
        ([[0.0, 0.25], [0.5, 1.0]], [[0, 63.75], [127.5, 255]], "in 0..1: scaled"),
        ([[0.0, 10.5], [100.0, 200.0]], [[0, 10.5], [100, 200]], None),
        ([[-1.0, 0.0], [1.0, 3.0]], [[0, 63.75], [127.5, 255]], "stretched"),
    ],
)
def test_float_grey(folder, values, expected, note):
    path = write(Image.fromarray(np.float32(values), "F"), folder / "float.tif")
    loaded = load_image(path)

    np.testing.assert_allclose(loaded.pixels[..., 2], expected, atol=1e-3)
    if note:
        assert len(loaded.notes) == 1 and note in loaded.notes[0]
    else:
        assert loaded.notes == []


def test_cmyk_jpeg_comes_back_close_to_the_rgb(cat, folder):
    path = write(cat.convert("CMYK"), folder / "print.jpg", quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    loaded = load_image(path)

    difference = np.abs(loaded.pixels - np.asarray(cat, dtype=np.float32))
    assert difference.mean() < 4.0
    assert "CMYK" in loaded.notes[0]


@pytest.mark.parametrize(("orientation", "turns"), [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(cat, folder, orientation, turns):
    plain = load_image(write(cat, folder / "plain.jpg", quality=95)).pixels
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    path = write(cat, folder / "turned.jpg", quality=95, exif=exif)
    loaded = load_image(path)

    # The stored pixels are the same; only the display orientation differs.
    np.testing.assert_array_equal(loaded.pixels, np.rot90(plain, k=turns))
    assert loaded.original_size == loaded.pixels.shape[:2]
    assert loaded.notes == ["turned.jpg turned by its EXIF orientation"]


def test_tiny_image(folder):
    pixel = Image.new("RGB", (1, 1), (10, 200, 30))
    path = write(pixel, folder / "dot.png")

    loaded = load_image(path, max_size=512)
    np.testing.assert_array_equal(loaded.pixels, [[[10, 200, 30]]])
    grown = load_image(path, size=(3, 2))
    assert grown.pixels.shape == (3, 2, 3)
    np.testing.assert_allclose(grown.pixels, np.tile([10, 200, 30], (3, 2, 1)))


def test_animation_uses_the_first_frame(cat, folder):
    frames = [cat.convert("L").convert("P"), cat.rotate(180).convert("L").convert("P")]
    path = folder / "two.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    loaded = load_image(path)

    first = np.asarray(cat.convert("L"), dtype=np.float32)
    assert np.abs(loaded.pixels[..., 0] - first).mean() < 1.0
    assert loaded.notes == ["two.gif has 2 frames: using the first"]


# -- decompression bombs -----------------------------------------------------------


# 135300 pixels: past twice the first limit (Pillow's error), past only the second
# (Pillow's warning).
@pytest.mark.parametrize("limit", [1000, 100_000])
def test_images_past_the_pixel_limit_need_the_flag(shared_dir, monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    path = shared_dir / "images" / "chelsea_cat.png"

    with pytest.raises(ImageError) as refused:
        load_image(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ")
    assert "--allow_large_images" in message and f"{limit} pixels" in message

    loaded = load_image(path, allow_large=True)
    assert loaded.pixels.shape == (*CAT_SIZE, 3)
    assert Image.MAX_IMAGE_PIXELS == limit


def test_pixel_limit_is_restored_after_a_failed_large_load(folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = folder / "notes.png"
    path.write_text("not a picture")

    with pytest.raises(ImageError):
        load_image(path, allow_large=True)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_a_requested_size_past_the_limit_needs_the_flag(shared_dir, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    path = shared_dir / "images" / "chelsea_cat.png"

    with pytest.raises(ValueError, match="500x500 is over .*--allow_large_images"):
        load_image(path, size=(500, 500))
    assert load_image(path, size=(500, 500), allow_large=True).pixels.shape[:2] == (
        500,
        500,
    )


# -- bad files and sizes -----------------------------------------------------------


def make_missing(folder, cat):
    return folder / "no such photo.png"


def make_folder(folder, cat):
    path = folder / "a folder.png"
    path.mkdir()
    return path


def make_empty(folder, cat):
    path = folder / "empty.png"
    path.write_bytes(b"")
    return path


def make_truncated(folder, cat):
    whole = write(cat, folder / "whole.png")
    path = folder / "cut short.png"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def make_text(folder, cat):
    path = folder / "readme.png"
    path.write_text("this is text, not a PNG\n")
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (make_missing, "no such file"),
        (make_folder, "is a folder, not an image file"),
        (make_empty, "the file is empty (0 bytes)"),
        (make_truncated, "cannot decode the image (image file is truncated"),
        (make_text, "not an image file Pillow can read"),
    ],
)
@pytest.mark.parametrize("as_text", [False, True])
def test_bad_files_give_one_line_naming_the_path(folder, cat, make, words, as_text):
    path = make(folder, cat)

    with pytest.raises(ImageError) as refused:
        load_image(str(path) if as_text else path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ")
    assert words in message
    assert "\n" not in message


def test_unreadable_file_gives_the_reason_once(shared_dir, folder, monkeypatch):
    path = folder / "private.png"
    path.write_bytes((shared_dir / "images" / "chelsea_cat.png").read_bytes())

    # Root ignores permission bits, so the refusal is simulated.
    def refuse(fp, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(images.Image, "open", refuse)
    with pytest.raises(ImageError) as refused:
        load_image(path)
    assert str(refused.value) == f"{path}: cannot read (Permission denied)"


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_size": -1}, "max_size must be 0 (keep the size) or more, got -1"),
        ({"max_size": 2.5}, "max_size must be a whole number of pixels, got 2.5"),
        ({"size": (0, 10)}, "size must be at least 1x1 pixels, got 0x10"),
        ({"size": (10.5, 10)}, "expected a size (height, width) of two integers"),
        ({"size": (1, 2, 3)}, "expected a size (height, width) of two integers"),
    ],
)
def test_bad_sizes_are_refused(shared_dir, options, words):
    with pytest.raises(ValueError) as refused:
        load_image(shared_dir / "images" / "chelsea_cat.png", **options)
    assert words in str(refused.value)


# -- saving --------------------------------------------------------------------


def random_pixels(shape=(20, 30, 3), seed=0):
    """float32 in -20..275, fractional, so clipping and rounding both matter."""
    return np.random.default_rng(seed).uniform(-20, 275, shape).astype(np.float32)


@pytest.mark.parametrize("name", ["out.png", "OUT.PNG", "out.tif", "out.tiff"])
def test_lossless_round_trip_is_exact(folder, name):
    pixels = random_pixels()
    path = save_image(pixels, folder / name)

    with Image.open(path) as saved:
        assert saved.mode == "RGB"
        np.testing.assert_array_equal(
            np.asarray(saved), np.rint(np.clip(pixels, 0, 255)).astype(np.uint8)
        )
    assert leftovers(folder) == []


@pytest.mark.parametrize(
    ("name", "kind"), [("out.jpg", "JPEG"), ("out.jpeg", "JPEG"), ("out.webp", "WEBP")]
)
def test_lossy_formats_read_back_close(cat, folder, name, kind):
    pixels = np.asarray(cat, dtype=np.float32)
    path = save_image(pixels, folder / name)

    with Image.open(path) as saved:
        assert saved.format == kind
        assert np.abs(np.asarray(saved, dtype=np.float32) - pixels).mean() < 3.0


def test_metadata_goes_into_png_text(folder):
    metadata = {"command": "deep_dream.py 'my cat.png' dream", "note": "naïve ✓"}
    path = save_image(random_pixels(), str(folder / "tagged.png"), metadata=metadata)

    with Image.open(path) as saved:
        assert saved.text == metadata


def test_missing_folders_are_created(folder):
    path = save_image(random_pixels(), folder / "new" / "deeper" / "out.png")

    assert path.is_file()


def test_unknown_extension_lists_the_supported_ones(folder):
    path = folder / "out.bmp"

    with pytest.raises(ImageError) as refused:
        save_image(random_pixels(), path)
    assert str(refused.value) == (
        f"{path}: unknown image extension '.bmp'; "
        "use .png, .jpg, .jpeg, .webp, .tif, .tiff"
    )
    assert not path.exists()


def test_parent_that_is_a_file_gives_one_line(folder):
    blocker = folder / "plain file"
    blocker.write_text("x")
    path = blocker / "out.png"

    with pytest.raises(ImageError) as refused:
        save_image(random_pixels(), path)
    message = str(refused.value)
    assert message.startswith(f"{path}: cannot create its folder (")
    assert f"({blocker} is a file, not a folder)" in message
    assert "\n" not in message
    assert leftovers(folder) == []


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0,
    reason="permission bits do not stop writes here (Windows or root)",
)
def test_read_only_folder_gives_one_line(folder):
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ImageError, match="cannot write"):
            save_image(random_pixels(), locked / "out.png")
    finally:
        locked.chmod(0o700)
    assert os.listdir(locked) == []


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (np.full((4, 4, 3), np.nan), "the pixels contain NaN or infinity"),
        (np.full((4, 4, 3), np.inf), "the pixels contain NaN or infinity"),
        (np.zeros((4, 4)), "expected pixels shaped (height, width, 3), got (4, 4)"),
        (np.zeros((4, 4, 4)), "expected pixels shaped (height, width, 3)"),
    ],
)
def test_unsavable_pixels_leave_the_old_file(folder, bad, words):
    path = save_image(random_pixels(), folder / "keep.png")
    before = path.read_bytes()

    with pytest.raises(ImageError) as refused:
        save_image(bad, path)
    assert str(refused.value).startswith(f"{path}: ")
    assert words in str(refused.value)
    assert path.read_bytes() == before
    assert leftovers(folder) == []


def test_failed_rename_removes_the_temporary_file(folder, monkeypatch):
    path = save_image(random_pixels(seed=1), folder / "keep.png")
    before = path.read_bytes()

    def refuse(source, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images.os, "replace", refuse)
    with pytest.raises(ImageError, match=r"cannot write \(Permission denied\)"):
        save_image(random_pixels(seed=2), path)
    assert path.read_bytes() == before
    assert leftovers(folder) == []


# -- sizes and resizing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_size", "expected"),
    [
        ((300, 451), 0, (300, 451)),
        ((300, 451), 451, (300, 451)),
        ((300, 451), 1000, (300, 451)),
        ((1528, 1200), 512, (512, 402)),
        ((300, 451), 100, (67, 100)),
        ((5000, 1), 100, (100, 1)),
        ((1, 5000), 100, (1, 100)),
    ],
)
def test_fit_size(size, max_size, expected):
    assert fit_size(size, max_size) == expected


def test_fit_size_keeps_the_aspect_ratio():
    height, width = fit_size((1528, 1200), 300)

    assert max(height, width) == 300
    assert abs(height / width - 1528 / 1200) < 0.01


def test_resize_keeps_float_precision_and_layout():
    pixels = np.full((40, 60, 3), 100.25, dtype=np.float32)
    pixels[..., 1] = -3.5  # out of range on purpose: resize does not clip

    for size in [(20, 30), (80, 90), (40, 60)]:
        resized = resize(pixels, size)
        assert resized.shape == (*size, 3) and resized.dtype == np.float32
        np.testing.assert_allclose(resized[..., 0], 100.25, atol=1e-3)
        np.testing.assert_allclose(resized[..., 1], -3.5, atol=1e-3)
    assert resize(pixels[..., 0], (10, 15)).shape == (10, 15)


def test_resize_matches_pillow_on_each_channel(cat):
    pixels = np.asarray(cat, dtype=np.float32)
    resized = resize(pixels, (100, 150))

    # An 8-bit Lanczos resize of the same photo agrees up to its rounding and
    # its clipping of Lanczos's overshoot at dark edges.
    reference = np.asarray(cat.resize((150, 100), Image.Resampling.LANCZOS))
    assert np.abs(np.clip(resized, 0, 255) - reference).max() <= 1.0
    assert resized.min() < 0


def test_resize_refuses_bad_input():
    with pytest.raises(ValueError, match="size must be at least 1x1"):
        resize(np.zeros((4, 4, 3)), (0, 4))
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        resize(np.zeros(4), (2, 2))


# -- montage -------------------------------------------------------------------


def test_montage_shape_without_captions(cat):
    pixels = np.asarray(cat, dtype=np.float32)
    square = np.zeros((50, 50, 3), dtype=np.float32)
    sheet = montage([pixels, square], height=128, gap=4)

    cat_width = round(451 * 128 / 300)
    assert sheet.dtype == np.float32
    assert sheet.shape == (4 + 128 + 4, 4 + cat_width + 4 + 128 + 4, 3)
    assert (sheet[:4] == 255).all()  # the frame is background
    assert (sheet[4:132, 4 + cat_width + 4 :][:, :128] == 0).all()  # the square


def test_captions_are_drawn_under_the_images(cat):
    pixels = np.asarray(cat, dtype=np.float32)
    plain = montage([pixels, pixels], height=64)
    captioned = montage([pixels, pixels], ["content", "style"], height=64)
    renamed = montage([pixels, pixels], ["content", "result"], height=64)

    assert captioned.shape[1] == plain.shape[1]
    assert captioned.shape[0] > plain.shape[0]
    band = captioned[8 + 64 + 8 :]
    assert (band < 128).any()  # dark text on the white band
    assert not np.array_equal(captioned, renamed)
    np.testing.assert_array_equal(captioned[:, :80], renamed[:, :80])


def test_montage_refuses_mismatched_captions(cat):
    with pytest.raises(ValueError, match="montage got 1 images but 2 captions"):
        montage([np.zeros((4, 4, 3))], ["a", "b"])
