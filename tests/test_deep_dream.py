"""deep_dream.py: every option path on tiny images, each error, and a real dream."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

import deep_dream
from common import backend, images, vgg16
from common.run import EXIT_INTERRUPTED

SHALLOW = "block1_conv2,block2_conv1:0.5"


@pytest.fixture(scope="module")
def weights_path(shared_dir):
    return shared_dir / "weights" / "vgg16_hed_bsds500_notop.h5"


@pytest.fixture(scope="module")
def weights(weights_path):
    return vgg16.load_weights(weights_path)


@pytest.fixture(autouse=True)
def loaded_once(monkeypatch, weights):
    """Read the real weights file once per module, not once per run."""
    monkeypatch.setattr(deep_dream, "load_weights", lambda path, fmt="auto": weights)


def picture(path, size=(24, 32), seed=0):
    """A small smooth colour picture, saved as PNG; returns the path."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    images.save_image(images.resize(coarse, size), path)
    return path


def dream(tmp_path, weights_path, *options, image=None, prefix="dream"):
    image = image or picture(tmp_path / "in.png")
    argv = [
        "--weights_root",
        str(weights_path),
        str(image),
        str(tmp_path / prefix),
        "--layers",
        SHALLOW,
        "--iterations",
        "2",
        "--octaves",
        "2",
        *options,
    ]
    return deep_dream.main(argv)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# -- the program --------------------------------------------------------------


def test_writes_prefix_png_of_the_same_size(tmp_path, weights_path, capsys):
    assert dream(tmp_path, weights_path) == 0
    result = pixels(tmp_path / "dream.png")
    assert result.shape == (24, 32, 3)
    assert not np.array_equal(result, pixels(tmp_path / "in.png"))
    out = capsys.readouterr().out
    assert "vgg16_hed_bsds500_notop.h5" in out and "no top" in out
    assert "octaves (height x width): 17x23, 24x32" in out
    assert "saved" in out


def test_backend_notes_are_printed(tmp_path, weights_path, capsys, monkeypatch):
    # What select_backend noticed, e.g. a keras.json naming TensorFlow.
    chosen = backend.select_backend()
    noted = dataclasses.replace(chosen, notes=("keras.json names backend 'x'",))
    monkeypatch.setattr(backend, "select_backend", lambda requested=None: noted)
    assert dream(tmp_path, weights_path, "--iter", "1") == 0
    assert "keras.json names backend 'x'" in capsys.readouterr().out


def test_a_prefix_with_an_image_extension_is_used_as_is(tmp_path, weights_path):
    assert dream(tmp_path, weights_path, "--iter", "1", prefix="out.jpg") == 0
    assert (tmp_path / "out.jpg").is_file()
    assert not (tmp_path / "out.jpg.png").exists()


def test_large_images_are_scaled_and_the_output_says_how_to_go_bigger(
    tmp_path, weights_path, capsys
):
    image = picture(tmp_path / "big.png", size=(40, 60))
    assert dream(tmp_path, weights_path, "--max_size", "30", image=image) == 0
    assert pixels(tmp_path / "dream.png").shape == (20, 30, 3)
    assert "--max_size 0" in capsys.readouterr().out


def test_tiles_cover_the_image_once(tmp_path, weights_path, capsys):
    assert dream(tmp_path, weights_path, "--tile_size", "12", "--jitter", "3") == 0
    assert pixels(tmp_path / "dream.png").shape == (24, 32, 3)
    assert "tiles of at most 12 pixels" in capsys.readouterr().out


@pytest.mark.parametrize(("length", "tile"), [(32, 12), (24, 12), (5, 5), (13, 4)])
def test_tile_starts(length, tile):
    covered = np.zeros(length, int)
    for start, keep in deep_dream.tile_starts(length, tile):
        assert 0 <= start and start + tile <= length
        covered[start + keep : start + tile] += 1
    assert covered.tolist() == [1] * length


def test_tiled_gradient_equals_the_whole_image_gradient():
    import keras

    step = backend.image_gradient_fn(lambda x: keras.ops.sum(keras.ops.square(x)))
    image = np.random.default_rng(0).uniform(0, 255, (1, 23, 30, 3))
    loss, grad = deep_dream.tiled_gradient(step, backend.to_device(image), (8, 16))
    np.testing.assert_allclose(backend.to_numpy(grad), 2 * image, rtol=1e-5)


def test_guide_changes_the_dream(tmp_path, weights_path):
    guide = picture(tmp_path / "guide.png", size=(20, 20), seed=5)
    assert dream(tmp_path, weights_path, prefix="free") == 0
    assert dream(tmp_path, weights_path, "--guide", str(guide), prefix="guided") == 0
    free, guided = pixels(tmp_path / "free.png"), pixels(tmp_path / "guided.png")
    assert guided.shape == free.shape
    assert not np.array_equal(free, guided)


def test_channels_dream_only_the_chosen_layer(tmp_path, weights_path):
    options = ("--channels", "block1_conv2:3,7", "--channels", "block1_conv2:7,9")
    assert dream(tmp_path, weights_path, *options) == 0
    assert (tmp_path / "dream.png").is_file()


def test_objective_layers():
    default = deep_dream.parse_layer_weights(deep_dream.DEFAULT_LAYERS)
    assert default == {"block4_conv3": 1.0, "block5_conv1": 0.5}
    chosen = [("block3_conv1", (4, 2)), ("block3_conv1", (2, 9))]
    layers, channels = deep_dream.objective_layers(default, chosen)
    assert layers == {"block3_conv1": 1.0}
    assert channels == {"block3_conv1": (4, 2, 9)}
    layers, _ = deep_dream.objective_layers({"block2_conv1": 0.5}, chosen)
    assert layers == {"block3_conv1": 1.0, "block2_conv1": 0.5}


def test_zoom_frames_and_gif(tmp_path, weights_path):
    options = ("--zoom_frames", "2", "--zoom", "1.2", "--octaves", "1")
    assert dream(tmp_path, weights_path, *options) == 0
    frames = sorted(path.name for path in tmp_path.glob("dream_frame_*.png"))
    assert frames == [
        "dream_frame_000.png",
        "dream_frame_001.png",
        "dream_frame_002.png",
    ]
    np.testing.assert_array_equal(
        pixels(tmp_path / "dream.png"), pixels(tmp_path / "dream_frame_002.png")
    )
    with Image.open(tmp_path / "dream.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (32, 24)


def test_save_every_counts_across_octaves(tmp_path, weights_path):
    options = ("--iterations", "3", "--save_every", "2")
    assert dream(tmp_path, weights_path, *options) == 0
    saved = sorted(path.name for path in tmp_path.glob("dream_at_iteration_*"))
    assert saved == ["dream_at_iteration_2.png", "dream_at_iteration_4.png"]
    # Iteration 4 is the first step of the second (full-size) octave.
    assert pixels(tmp_path / "dream_at_iteration_4.png").shape == (24, 32, 3)
    with Image.open(tmp_path / "dream.png") as result:
        assert '"seed": 0' in result.text["Parameters"]


def test_same_seed_same_dream(tmp_path, weights_path):
    for prefix, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        options = ("--seed", seed, "--octaves", "1", "--jitter", "8")
        assert dream(tmp_path, weights_path, *options, prefix=prefix) == 0
    a, b, c = (pixels(tmp_path / f"{name}.png") for name in "abc")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# -- octaves --------------------------------------------------------------------


def test_default_octaves_are_reduced_with_a_note(tmp_path, weights_path, capsys):
    argv = [
        "--weights_root",
        str(weights_path),
        str(picture(tmp_path / "in.png", size=(8, 12))),
        str(tmp_path / "dream"),
        "--layers",
        "block3_conv1",
        "--iterations",
        "1",
        # One tile shape for every octave: one compilation on JAX.
        "--tile_size",
        "4",
    ]
    assert deep_dream.main(argv) == 0
    out = capsys.readouterr().out
    assert "3 octaves instead of 4" in out and "4 pixels block3_conv1 needs" in out


def test_too_many_explicit_octaves_are_refused_before_any_work(
    tmp_path, weights_path, capsys, monkeypatch
):
    def no_weights(*args):
        raise AssertionError("weights loaded before the octaves were checked")

    monkeypatch.setattr(deep_dream, "load_weights", no_weights)
    image = picture(tmp_path / "in.png", size=(8, 12))
    code = deep_dream.main(
        ["--weights_root", str(weights_path), str(image), str(tmp_path / "dream")]
        + ["--layers", "block3_conv1", "--octaves", "4"]
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "--octave_scale 1.4 gives octaves of 3x4, 4x6, 6x9, 8x12" in err
    assert "block3_conv1 needs at least 4 pixels" in err
    assert "use --octaves 3 or fewer" in err
    assert not (tmp_path / "dream.png").exists()


def test_octave_shapes():
    shapes = deep_dream.octave_shapes((300, 451), 4, 1.4)
    assert shapes == [(109, 164), (153, 230), (214, 322), (300, 451)]


# -- errors -------------------------------------------------------------------


def usage_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        deep_dream.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("layers", ["block9_conv1", "block1_pool", "block1_conv1:x"])
def test_unknown_layer_lists_the_valid_ones(capsys, layers):
    err = usage_error(capsys, ["in.png", "out", "--layers", layers])
    if layers.endswith(":x"):
        assert "expected a number, got 'x'" in err
    else:
        assert f"unknown convolution layer {layers!r}" in err
        assert "valid layers: block1_conv1, block1_conv2, block2_conv1" in err
        assert "block5_conv3" in err


@pytest.mark.parametrize("option", ["--octave_scale", "--zoom"])
@pytest.mark.parametrize("value", ["nan", "inf", "1", "0.5"])
def test_scales_must_be_finite_and_above_one(capsys, option, value):
    err = usage_error(capsys, ["in.png", "out", option, value])
    assert f"argument {option}: expected a number above 1, got {value}" in err


def test_unknown_channel_names_the_valid_range(capsys):
    err = usage_error(capsys, ["in.png", "out", "--channels", "block1_conv1:3,64"])
    assert "block1_conv1 has 64 channels, 0..63; got 64" in err
    err = usage_error(capsys, ["in.png", "out", "--channels", "block1_conv1"])
    assert "expected LAYER:i,j,..." in err


def test_missing_image(tmp_path, weights_path, capsys):
    code = dream(tmp_path, weights_path, image=tmp_path / "no such.png")
    assert code == 1
    err = capsys.readouterr().err
    assert "no such.png: no such file" in err and err.count("\n") == 1


def test_image_too_small_for_the_layer(tmp_path, weights_path, capsys):
    image = picture(tmp_path / "tiny.png", size=(6, 40))
    code = dream(tmp_path, weights_path, "--layers", "block4_conv1", image=image)
    assert code == 1
    assert "6x40 pixels; block4_conv1 needs at least 8" in capsys.readouterr().err


def test_a_tile_smaller_than_the_deepest_layer_needs_is_refused_before_any_work(
    tmp_path, weights_path, capsys, monkeypatch
):
    def no_weights(*args):
        raise AssertionError("weights loaded before the tile size was checked")

    monkeypatch.setattr(deep_dream, "load_weights", no_weights)
    code = dream(tmp_path, weights_path, "--tile_size", "3", "--layers", "block3_conv1")
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "--tile_size 3 is under the 4 pixels block3_conv1 needs" in err
    assert "use --tile_size 4 or more, or 0" in err
    assert not (tmp_path / "dream.png").exists()


def test_unwritable_output_is_refused_before_any_work(tmp_path, weights_path, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    code = dream(tmp_path, weights_path, prefix="a file/dream")
    assert code == 1
    assert "cannot write in" in capsys.readouterr().err


def test_an_image_format_it_cannot_write_is_refused(tmp_path, weights_path, capsys):
    code = dream(tmp_path, weights_path, prefix="dream.gif")
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write .gif images" in err[0]
    assert not list(tmp_path.glob("dream.gif*"))


def test_non_finite_loss_keeps_the_last_good_image(
    tmp_path, weights_path, capsys, monkeypatch
):
    real = deep_dream.gradient_function

    def poisoned(loss_fn, variables):
        step, calls = real(loss_fn, variables), []

        def poisoned_step(image):
            calls.append(1)
            return step(image * float("nan") if len(calls) > 3 else image)

        return poisoned_step

    monkeypatch.setattr(deep_dream, "gradient_function", poisoned)
    (tmp_path / "dream.png").write_bytes(b"earlier result")
    assert dream(tmp_path, weights_path, "--iterations", "3") == 1
    err = capsys.readouterr().err
    assert "stopped after iteration 3 of 6" in err and "nan" in err
    assert "last good image is saved as" in err
    assert pixels(tmp_path / "dream_at_iteration_3.png").shape == (24, 32, 3)
    assert (tmp_path / "dream.png").read_bytes() == b"earlier result"


def test_ctrl_c_saves_the_current_image(tmp_path, weights_path, capsys, monkeypatch):
    real, calls = deep_dream.ascent_step, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(deep_dream, "ascent_step", interrupted)
    (tmp_path / "dream.png").write_bytes(b"earlier result")
    assert dream(tmp_path, weights_path, "--iterations", "3") == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted at iteration 3 of 6" in err
    assert str(tmp_path / "dream_at_iteration_3.png") in err
    assert pixels(tmp_path / "dream_at_iteration_3.png").shape == (24, 32, 3)
    assert (tmp_path / "dream.png").read_bytes() == b"earlier result"


# -- a real dream ---------------------------------------------------------------


@pytest.mark.slow
def test_real_dream_raises_the_objective(tmp_path, shared_dir, weights_path, weights):
    # A 96-pixel crop around the cat's eye, dreamed with the default layers.
    cat = images.load_image(shared_dir / "images" / "chelsea_cat.png").pixels
    crop = cat[60:156, 150:246]
    images.save_image(crop, tmp_path / "cat.png")
    argv = [
        "--weights_root",
        str(weights_path),
        str(tmp_path / "cat.png"),
        str(tmp_path / "dream"),
        "--iterations",
        "6",
        "--octaves",
        "2",
    ]
    assert deep_dream.main(argv) == 0
    result = pixels(tmp_path / "dream.png").astype(np.float32)
    assert result.shape == crop.shape

    layers = deep_dream.parse_layer_weights(deep_dream.DEFAULT_LAYERS)
    model = vgg16.build_feature_model(weights, tuple(layers))
    loss = deep_dream.dream_loss(model, layers, {})

    def objective(image):
        return float(backend.to_numpy(loss(backend.to_device(image[None]))))

    before, after = objective(np.rint(crop)), objective(result)
    assert after > 4 * before, (before, after)
    assert np.abs(result - np.rint(crop)).mean() > 5
