"""neural_style_transfer.py, run through main() on tiny images and real weights."""

import itertools

import numpy as np
import pytest
from PIL import Image

import neural_style_transfer as nst
from common import backend, run, vgg16

# Shallow layers keep the network small, so a run on a 24x32 image takes
# about a second (and JAX compiles quickly).
FAST = [
    "--content_layer",
    "block2_conv1",
    "--style_layers",
    "block1_conv1,block2_conv1",
    "--iter",
    "2",
]


@pytest.fixture(scope="module")
def weights_path(shared_dir):
    return shared_dir / "weights" / "vgg16_hed_bsds500_notop.h5"


@pytest.fixture(scope="module")
def loaded_weights(weights_path):
    return vgg16.load_weights(weights_path)


@pytest.fixture
def weights(monkeypatch, weights_path, loaded_weights):
    """The real weights file, read once for the whole module."""
    monkeypatch.setattr(vgg16, "load_weights", lambda *args, **kwargs: loaded_weights)
    return weights_path


def write_image(path, size, seed):
    """A smooth random RGB image of ``size`` (height, width), saved at ``path``."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(coarse).resize((size[1], size[0]), Image.BICUBIC)
    image.save(path)
    return path


@pytest.fixture
def images(tmp_path):
    """A content image and two style images of other shapes."""
    return (
        write_image(tmp_path / "content.png", (24, 32), 0),
        write_image(tmp_path / "style one.png", (40, 20), 1),
        write_image(tmp_path / "style_two.jpg", (30, 30), 2),
    )


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def run_main(weights, *args):
    return nst.main(["--weights_root", str(weights), *map(str, args)])


@pytest.fixture
def recorded_steps(monkeypatch):
    """The losses each step hands the progress bar, parts at every step."""
    steps = []
    real_step = run.Run.step

    def step(self, current_image, **losses):
        steps.append(losses)
        return real_step(self, current_image, **losses)

    monkeypatch.setattr(run.Run, "step", step)
    monkeypatch.setattr(nst, "PARTS_EVERY", 1)
    return steps


# ---------------------------------------------------------------------------
# Every option path runs
# ---------------------------------------------------------------------------


def test_help_is_the_docstring_with_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        nst.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "Gatys, Ecker and Bethge" in text and "arXiv:1508.06576" in text
    assert f"(default: {nst.DEFAULT_ITERATIONS})" in text
    assert "--original_colors" in text and "--style_blend_weights" in text
    # A name that ends in an image extension is used as is, as the help says.
    text = " ".join(text.split())
    assert "or the name itself if it ends in an image extension" in text


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_each_optimizer_writes_the_result_snapshots_and_montage(
    weights, images, tmp_path, capsys, optimizer
):
    content, style, _ = images
    prefix = tmp_path / "out" / "ninja scream"
    status = run_main(
        weights,
        content,
        style,
        prefix,
        *FAST,
        "--iter",
        "4",
        "--save_every",
        "2",
        "--optimizer",
        optimizer,
        "--montage",
    )

    assert status == 0
    names = sorted(path.name for path in prefix.parent.iterdir())
    assert names == [
        "ninja scream.png",
        "ninja scream_at_iteration_2.png",
        "ninja scream_montage.png",
    ]
    result = pixels(prefix.parent / "ninja scream.png")
    assert result.shape == (24, 32, 3)
    assert not np.array_equal(result, pixels(content))  # it did change
    assert pixels(prefix.parent / "ninja scream_montage.png").shape[1] > 3 * 32
    out = capsys.readouterr().out
    assert "weights: Keras Applications VGG16" in out
    assert "result: 24x32 (height x width)" in out
    assert "loss-and-gradient evaluations" in out


def test_guide_command_shape_writes_prefix_png_in_the_working_folder(
    weights, images, tmp_path, monkeypatch
):
    content, style, _ = images
    monkeypatch.chdir(tmp_path)
    assert run_main(weights.parent, content, style, "ninjascream", *FAST) == 0
    assert (tmp_path / "ninjascream.png").is_file()


def test_scales_count_iterations_across_scales(weights, images, tmp_path, capsys):
    content, style, _ = images
    prefix = tmp_path / "coarse"
    status = run_main(
        weights,
        content,
        style,
        prefix,
        *FAST,
        "--scales",
        "16,32",
        "--save_every",
        "3",
        "--optimizer",
        "adam",
    )
    assert status == 0
    # 2 iterations at 12x16, then 2 at 24x32: step 3 is the first at 24x32.
    assert pixels(tmp_path / "coarse_at_iteration_3.png").shape == (24, 32, 3)
    assert pixels(tmp_path / "coarse.png").shape == (24, 32, 3)
    assert "result: 12x16 then 24x32" in capsys.readouterr().out


def test_scales_above_the_content_size_do_not_upscale(weights, images, tmp_path):
    content, style, _ = images
    prefix = tmp_path / "big"
    assert run_main(weights, content, style, prefix, *FAST, "--scales", "64") == 0
    assert pixels(tmp_path / "big.png").shape == (24, 32, 3)


def test_max_size_limits_the_long_side(weights, images, tmp_path):
    content, style, _ = images
    args = [content, style, tmp_path / "s", *FAST, "--max_size", "16"]
    assert run_main(weights, *args) == 0
    assert pixels(tmp_path / "s.png").shape == (12, 16, 3)


def test_styles_blend_and_keep_their_own_shapes(weights, images, tmp_path, capsys):
    content, style_one, style_two = images
    args = [content, style_one, style_two, tmp_path / "blend", *FAST]
    status = run_main(
        weights, *args, "--style_blend_weights", "3,1", "--style_scale", "0.5"
    )
    assert status == 0
    out = capsys.readouterr().out
    # Long side 16 (half the result's 32), each style's aspect ratio kept.
    assert "style one.png (40x20), used at 16x8, weight 0.75" in out
    assert "style_two.jpg (30x30), used at 16x16, weight 0.25" in out
    assert pixels(tmp_path / "blend.png").shape == (24, 32, 3)


def test_blending_targets_equals_blending_losses(loaded_weights):
    """A weighted mean of Gram targets has the same gradient as the weighted
    sum of the separate style losses."""
    import keras

    model = vgg16.build_feature_model(loaded_weights, ["block1_conv2"])
    rng = np.random.default_rng(0)
    styles = [rng.uniform(0, 255, (12, 10 + k, 3)).astype("float32") for k in (0, 4)]
    weights = (2.0, 1.0)
    blended = nst.style_targets(model, ["block1_conv2"], styles, weights)
    gram, _ = blended["block1_conv2"]
    separate = [
        nst.style_targets(model, ["block1_conv2"], [style], (1.0,))["block1_conv2"][0]
        for style in styles
    ]
    expected = (2 * separate[0] + separate[1]) / 3
    np.testing.assert_allclose(
        backend.to_numpy(gram), backend.to_numpy(expected), rtol=1e-5, atol=1e-6
    )
    assert keras.ops.shape(gram) == (64, 64)


def test_original_colors_keep_the_content_colours(weights, images, tmp_path):
    content, style, _ = images
    prefix = tmp_path / "colours"
    args = [content, style, prefix, *FAST, "--iter", "5", "--original_colors"]
    assert run_main(weights, *args, "--init", "noise") == 0

    def yiq(image):
        return image @ nst.RGB_TO_YIQ.T

    result, original = yiq(pixels(tmp_path / "colours.png")), yiq(pixels(content))
    # I and Q come from the content (up to 8-bit rounding and clipping); Y does not.
    assert np.abs(result[..., 1:] - original[..., 1:]).mean() < 2.0
    assert np.abs(result[..., 0] - original[..., 0]).mean() > 5.0


def test_colour_conversions_round_trip():
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (5, 7, 3)).astype(np.float32)
    np.testing.assert_allclose(nst.with_colours_of(image, image), image, atol=1e-3)
    grey = nst.luminance(image)
    assert np.allclose(grey[..., 0], grey[..., 2])
    matched = nst.match_luminance(image * 0.2, image)
    assert matched.mean() == pytest.approx(grey.mean(), rel=1e-3)


@pytest.mark.parametrize("init", nst.INITS)
def test_each_init_starts_where_it_says(weights, images, tmp_path, init):
    content, style, _ = images
    prefix = tmp_path / init
    # With every loss weight at 0 the optimiser cannot move: the result is
    # the starting image.
    status = run_main(
        weights,
        content,
        style,
        prefix,
        *FAST,
        "--init",
        init,
        "--content_weight",
        "0",
        "--style_weight",
        "0",
        "--tv_weight",
        "0",
        "--optimizer",
        "adam",
    )
    assert status == 0
    result = pixels(tmp_path / f"{init}.png")
    if init == "content":
        np.testing.assert_allclose(result, pixels(content), atol=1)
    elif init == "noise":
        assert result.std() > 60  # uniform noise over 0..255 has std 74
    else:
        assert np.abs(result - pixels(content)).mean() > 10


@pytest.mark.parametrize(
    ("optimizer", "words"),
    [("lbfgs", "L-BFGS ended after 0 iterations"), ("adam", "in 10 iterations")],
)
def test_a_loss_that_stops_moving_is_reported(
    weights, images, tmp_path, capsys, optimizer, words
):
    content, style, _ = images
    zero = ["--content_weight", "0", "--style_weight", "0", "--tv_weight", "0"]
    args = [content, style, tmp_path / "flat", *FAST, "--iter", "12", *zero]
    assert run_main(weights, *args, "--optimizer", optimizer) == 0
    out = capsys.readouterr().out
    assert "the loss stopped moving" in out and words in out
    assert (tmp_path / "flat.png").is_file()


def test_init_image_continues_from_a_saved_result(weights, images, tmp_path):
    content, style, other = images
    start = write_image(tmp_path / "start.png", (48, 64), 7)  # resized to 24x32
    args = [content, style, tmp_path / "again", *FAST, "--init_image", start]
    zero = ["--content_weight", "0", "--style_weight", "0", "--tv_weight", "0"]
    assert run_main(weights, *args, *zero, "--optimizer", "adam") == 0
    expected = np.asarray(Image.open(start).resize((32, 24), Image.LANCZOS), "float32")
    assert np.abs(pixels(tmp_path / "again.png") - expected).mean() < 3


def test_average_pooling_runs_and_differs_from_max(weights, images, tmp_path):
    content, style, _ = images
    deep = ["--content_layer", "block3_conv1", "--style_layers", "block3_conv1"]
    for pooling in ("max", "avg"):
        args = [content, style, tmp_path / pooling, *FAST, *deep]
        assert run_main(weights, *args, "--pooling", pooling) == 0
    assert not np.array_equal(
        pixels(tmp_path / "max.png"), pixels(tmp_path / "avg.png")
    )


def test_same_seed_same_result(weights, images, tmp_path):
    content, style, _ = images
    results = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        args = [content, style, tmp_path / name, *FAST, "--init", "noise"]
        assert run_main(weights, *args, "--seed", seed) == 0
        results.append(pixels(tmp_path / f"{name}.png"))
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], results[2])


# ---------------------------------------------------------------------------
# Usage errors
# ---------------------------------------------------------------------------


def usage_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        nst.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--style_blend_weights", "1,2"], "has 2 weights for 1 style images"),
        (["--style_blend_weights", "-1"], "expected 0 or a number above, got -1"),
        (["--style_blend_weights", "0"], "are all 0"),
        (["--style_weight", "-2"], "expected 0 or a number above, got -2"),
        (["--iter", "0"], "expected 1 or more, got 0"),
        (["--scales", "512,256"], "they must increase"),
        (["--content_layer", "block1_conv1,block2_conv1"], "takes one layer, got 2"),
        (["--optimizer", "sgd"], "invalid choice: 'sgd'"),
    ],
)
def test_usage_errors(capsys, options, words):
    message = usage_error(capsys, ["c.png", "s.png", "out", *options])
    assert words in message


def test_unknown_layer_lists_valid_ones(capsys):
    message = usage_error(capsys, ["c.png", "s.png", "out", "--style_layers", "conv9"])
    assert "unknown VGG16 layer 'conv9'" in message
    assert "block1_conv1" in message and "block5_pool" in message


def test_too_small_image_says_the_minimum(weights, images, tmp_path, capsys):
    content, style, _ = images
    deep = ["--content_layer", "block5_conv1", "--max_size", "12"]
    assert run_main(weights, content, style, tmp_path / "x", *deep) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "9x12 pixels, too small for block5_conv1" in err[0]
    assert "at least 16 pixels" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_missing_style_image_is_one_line(weights, images, tmp_path, capsys):
    content, _, _ = images
    missing = tmp_path / "no such.png"
    assert run_main(weights, content, missing, tmp_path / "x", *FAST) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"neural_style_transfer.py: error: {missing}: no such file"]


# ---------------------------------------------------------------------------
# Early stops keep the image
# ---------------------------------------------------------------------------


def fail_after(monkeypatch, good_steps, failure):
    """Make every loss-and-gradient evaluation after ``good_steps`` fail.

    ``failure`` is ``"nan"`` (the image turns to NaN, so the real check finds a
    NaN loss) or ``"interrupt"`` (Ctrl+C).
    """
    real = backend.image_gradient_fn

    def failing(loss_fn, **kwargs):
        step = real(loss_fn, **kwargs)
        calls = itertools.count(1)

        def failing_step(image):
            if next(calls) > good_steps:
                if failure == "interrupt":
                    raise KeyboardInterrupt
                image = image * float("nan")
            return step(image)

        return failing_step

    monkeypatch.setattr(backend, "image_gradient_fn", failing)


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_non_finite_loss_keeps_the_last_good_image(
    weights, images, tmp_path, capsys, monkeypatch, optimizer
):
    content, style, _ = images
    fail_after(monkeypatch, 3, "nan")
    args = [content, style, tmp_path / "nan", *FAST, "--iter", "6"]
    assert run_main(weights, *args, "--optimizer", optimizer) == 1

    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the loss is nan" in err
    assert "the last good image is saved as" in err
    saved = sorted(tmp_path.glob("nan_at_iteration_*.png"))
    assert len(saved) == 1 and str(saved[0]) in err
    assert np.isfinite(pixels(saved[0])).all() and pixels(saved[0]).std() > 1
    assert not (tmp_path / "nan.png").exists()


def test_ctrl_c_saves_the_current_image(weights, images, tmp_path, capsys, monkeypatch):
    content, style, _ = images
    fail_after(monkeypatch, 2, "interrupt")
    args = [content, style, tmp_path / "stop", *FAST, "--iter", "5"]
    assert run_main(weights, *args, "--optimizer", "adam") == run.EXIT_INTERRUPTED

    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "interrupted at iteration 2 of 5" in err
    assert (tmp_path / "stop_at_iteration_2.png").is_file()
    assert not (tmp_path / "stop.png").exists()


# ---------------------------------------------------------------------------
# Real weights, real pictures
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_falls_steadily_on_the_cat_and_the_scream(
    shared_dir, tmp_path, recorded_steps
):
    images_dir = shared_dir / "images"
    status = nst.main(
        [
            "--weights_root",
            str(shared_dir / "weights"),
            str(images_dir / "chelsea_cat.png"),
            str(images_dir / "the_scream.jpg"),
            str(tmp_path / "cat"),
            "--max_size",
            "64",
            "--iter",
            "8",
        ]
    )
    assert status == 0
    losses = [step["loss"] for step in recorded_steps]
    styles = [step["style"] for step in recorded_steps]
    assert len(losses) == 8
    assert all(later < earlier for earlier, later in itertools.pairwise(losses))
    assert losses[-1] < 0.5 * losses[0]
    assert styles[-1] < 0.5 * styles[0]
    for step in recorded_steps:  # the parts add up to the total shown
        parts = step["content"] + step["style"] + step["tv"]
        assert parts == pytest.approx(step["loss"], rel=1e-3)
