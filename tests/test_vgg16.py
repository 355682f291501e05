"""The VGG16 model, its weights files and preprocessing (common/vgg16.py)."""

import h5py
import numpy as np
import pytest
from PIL import Image

from common import vgg16

HED = "weights/vgg16_hed_bsds500_notop.h5"
NOTOP, FULL = vgg16.PREFERRED_FILES


def write_keras_h5(path, layers=vgg16.CONV_LAYERS, shapes=None, nested=False):
    """A Keras-Applications-layout file; datasets are never written, so they
    read as zeros and cost no disk space."""
    shapes = shapes or {}
    names = ["input_1", *layers]
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = np.array([name.encode() for name in names])
        for name in names:
            group = file.create_group(name)
            if name not in vgg16.KERNEL_SHAPES and name not in shapes:
                group.attrs["weight_names"] = np.array([], dtype="S1")
                continue
            kernel_shape = shapes.get(name, vgg16.KERNEL_SHAPES.get(name))
            if nested:
                weight_names = [f"{name}/kernel:0", f"{name}/bias:0"]
            else:
                weight_names = [f"{name}_W_1:0", f"{name}_b_1:0"]
            group.create_dataset(weight_names[0], shape=kernel_shape, dtype="f4")
            group.create_dataset(weight_names[1], shape=kernel_shape[-1:], dtype="f4")
            group.attrs["weight_names"] = np.array([n.encode() for n in weight_names])
    return path


def cat_photo(shared_dir, size=128):
    """The real cat photo, downscaled: float32 (1, height, width, 3), RGB, 0..255."""
    with Image.open(shared_dir / "images" / "chelsea_cat.png") as image:
        image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.float32)[None]


@pytest.fixture(scope="module")
def hed_weights(shared_dir):
    return vgg16.load_weights(shared_dir / HED)


@pytest.fixture(scope="module")
def keras_reference(shared_dir):
    import keras

    return keras.applications.VGG16(include_top=False, weights=str(shared_dir / HED))


# --- the network --------------------------------------------------------------


def test_layer_names_and_order_match_keras_applications(keras_reference):
    names = [layer.name for layer in keras_reference.layers[1:]]
    assert names == list(vgg16.LAYERS)
    assert len(vgg16.CONV_LAYERS) == 13 and len(vgg16.LAYERS) == 18


def test_features_equal_keras_applications_on_a_real_photo(
    shared_dir, hed_weights, keras_reference
):
    import keras

    layers = ["block5_conv3", "block1_conv2"]
    image = cat_photo(shared_dir)
    ours = vgg16.build_feature_model(hed_weights, layers)(image)

    reference = keras.Model(
        keras_reference.input,
        [keras_reference.get_layer(name).output for name in layers],
    )
    preprocessed = keras.applications.vgg16.preprocess_input(image.copy())
    theirs = reference(preprocessed)
    assert sorted(ours) == sorted(layers)
    for name, b in zip(layers, theirs, strict=True):
        a, b = keras.ops.convert_to_numpy(ours[name]), keras.ops.convert_to_numpy(b)
        assert a.shape == b.shape, name
        assert np.abs(b).max() > 0, name
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())


def test_outputs_are_by_name_and_only_needed_layers_are_built():
    import keras

    model = vgg16.build_feature_model(None, ["block2_conv1", "block1_conv1"])
    outputs = model(np.zeros((1, 8, 8, 3), "float32"))
    shapes = {name: tuple(keras.ops.shape(value)) for name, value in outputs.items()}
    assert shapes == {"block2_conv1": (1, 4, 4, 128), "block1_conv1": (1, 8, 8, 64)}
    single = vgg16.build_feature_model(None, "block1_conv1")
    assert list(single(np.zeros((1, 2, 2, 3), "float32"))) == ["block1_conv1"]
    names = [layer.name for layer in model.layers]
    assert "block2_conv1" in names and "block2_conv2" not in names


def test_all_weights_are_frozen(hed_weights):
    model = vgg16.build_feature_model(hed_weights, ["block5_conv3"])
    assert model.trainable_weights == []
    assert len(model.non_trainable_weights) == 26


def test_weights_are_the_files(hed_weights):
    model = vgg16.build_feature_model(hed_weights, ["block3_conv2"])
    kernel, bias = model.get_layer("block3_conv2").get_weights()
    np.testing.assert_array_equal(kernel, hed_weights.layers["block3_conv2"][0])
    np.testing.assert_array_equal(bias, hed_weights.layers["block3_conv2"][1])


def test_avg_pooling_differs_from_max(shared_dir, hed_weights):
    import keras

    image = cat_photo(shared_dir, size=32)
    features = {
        pooling: keras.ops.convert_to_numpy(
            vgg16.build_feature_model(hed_weights, ["block2_conv1"], pooling=pooling)(
                image
            )["block2_conv1"]
        )
        for pooling in vgg16.POOLINGS
    }
    assert features["avg"].shape == features["max"].shape
    assert not np.allclose(features["avg"], features["max"])


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be one of max, avg"):
        vgg16.build_feature_model(None, ["block1_conv1"], pooling="min")


@pytest.mark.parametrize(
    ("layer", "size"),
    [
        ("block1_conv1", 1),
        ("block1_pool", 2),
        ("block2_conv2", 2),
        ("block3_conv1", 4),
        ("block4_pool", 16),
        ("block5_conv3", 16),
        ("block5_pool", 32),
    ],
)
def test_min_input_size(layer, size):
    assert vgg16.min_input_size(layer) == size


@pytest.mark.parametrize("layer", ["block4_pool", "block5_conv3", "block5_pool"])
def test_min_input_size_gives_a_one_by_one_output(layer):
    import keras

    side = vgg16.min_input_size(layer)
    model = vgg16.build_feature_model(None, [layer])
    output = model(np.zeros((1, side, side, 3), "float32"))[layer]
    assert tuple(keras.ops.shape(output))[1:3] == (1, 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda: vgg16.min_input_size("block6_conv1"),
        lambda: vgg16.check_layers(["block1_conv1", "block6_conv1"]),
        lambda: vgg16.build_feature_model(None, ["block6_conv1"]),
    ],
)
def test_unknown_layer_lists_the_valid_ones(call):
    with pytest.raises(ValueError, match="unknown VGG16 layer 'block6_conv1'") as info:
        call()
    assert "valid layers: block1_conv1, block1_conv2, block1_pool" in str(info.value)
    assert "block5_pool" in str(info.value)


# --- preprocessing ------------------------------------------------------------


def test_preprocess_deprocess_round_trip():
    pixels = np.random.default_rng(0).uniform(0, 255, (5, 7, 3)).astype("float32")
    x = vgg16.CAFFE_PREPROCESSING.preprocess(pixels)
    assert x.dtype == np.float32
    np.testing.assert_allclose(
        vgg16.CAFFE_PREPROCESSING.deprocess(x), pixels, rtol=0, atol=1e-4
    )
    # A non-trivial scale, std and order round-trips too.
    other = vgg16.Preprocessing(
        "RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.2, 0.3)
    )
    np.testing.assert_allclose(
        other.deprocess(other.preprocess(pixels)), pixels, rtol=0, atol=1e-4
    )


def test_caffe_preprocessing_matches_keras_applications():
    import keras

    pixels = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    expected = keras.applications.vgg16.preprocess_input(pixels.copy())
    np.testing.assert_array_equal(
        vgg16.CAFFE_PREPROCESSING.preprocess(pixels), expected
    )


def test_preprocessing_layer_equals_numpy_and_survives_its_config():
    import keras

    preprocessing = vgg16.Preprocessing(
        "RGB", 1 / 255, (0.485, 0.456, 0.406), (0.2,) * 3
    )
    layer = vgg16.preprocessing_layer(preprocessing)
    copy = type(layer).from_config(layer.get_config())
    pixels = np.random.default_rng(2).uniform(0, 255, (1, 3, 5, 3)).astype("float32")
    expected = preprocessing.preprocess(pixels)
    for candidate in (layer, copy):
        result = keras.ops.convert_to_numpy(candidate(pixels))
        np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


# --- files --------------------------------------------------------------------


def test_hed_file_is_detected_by_content(shared_dir, hed_weights):
    assert vgg16.detect_format(shared_dir / HED) == "keras-tf"
    assert hed_weights.format == "keras-tf"
    assert hed_weights.description == (
        "Keras Applications VGG16, TensorFlow kernels, no top "
        "(vgg16_hed_bsds500_notop.h5)"
    )
    assert set(hed_weights.layers) == set(vgg16.CONV_LAYERS)
    kernel, bias = hed_weights.layers["block1_conv1"]
    assert kernel.shape == (3, 3, 3, 64) and kernel.dtype == np.float32
    assert bias.shape == (64,)
    assert hed_weights.preprocessing == vgg16.CAFFE_PREPROCESSING


def test_file_with_top_and_nested_weight_paths_loads(tmp_path):
    path = write_keras_h5(
        tmp_path / "saved.h5",
        layers=[*vgg16.LAYERS, "flatten", "fc1", "fc2", "predictions"],
        shapes={"fc1": (25088, 4)},
        nested=True,
    )
    weights = vgg16.load_weights(path, "keras-tf")
    assert "with the dense top (unused)" in weights.description
    assert set(weights.layers) == set(vgg16.CONV_LAYERS)


def test_weights_inside_a_whole_model_save_load(tmp_path):
    inner = write_keras_h5(tmp_path / "weights.h5")
    path = tmp_path / "model.h5"
    with h5py.File(path, "w") as file, h5py.File(inner, "r") as weights:
        file.attrs["model_config"] = "{}"
        weights.copy(weights["/"], file, name="model_weights")
    assert vgg16.detect_format(path) == "keras-tf"
    assert set(vgg16.load_weights(path).layers) == set(vgg16.CONV_LAYERS)


def test_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not weights")
    with pytest.raises(vgg16.WeightsError, match="notes.h5: not an HDF5 file"):
        vgg16.load_weights(path)


def test_truncated(tmp_path, shared_dir):
    path = tmp_path / "cut.h5"
    path.write_bytes((shared_dir / HED).read_bytes()[:100_000])
    with pytest.raises(
        vgg16.WeightsError, match=r"cut.h5: truncated HDF5 file"
    ) as info:
        vgg16.load_weights(path)
    assert "100,000 of" in str(info.value) and "download it again" in str(info.value)


def test_missing_layer(tmp_path):
    layers = [name for name in vgg16.LAYERS if name != "block1_conv2"]
    path = write_keras_h5(tmp_path / "short.h5", layers=layers)
    with pytest.raises(
        vgg16.WeightsError, match="short.h5: missing layer block1_conv2"
    ):
        vgg16.load_weights(path)


def test_kernel_layout_mismatch(tmp_path):
    path = write_keras_h5(
        tmp_path / "swapped.h5", shapes={"block1_conv1": (3, 3, 64, 3)}
    )
    with pytest.raises(
        vgg16.WeightsError,
        match=r"swapped.h5: block1_conv1 kernel has shape \(3, 3, 64, 3\), "
        r"expected \(3, 3, 3, 64\)",
    ):
        vgg16.load_weights(path)


def test_another_network(tmp_path):
    layers = ["conv1_pad", "conv1_conv", "conv1_bn", "conv1_relu", "pool1_pad"]
    shapes = {"conv1_conv": (7, 7, 3, 64)}
    path = write_keras_h5(tmp_path / "resnet50.h5", layers=layers, shapes=shapes)
    message = "resnet50.h5: a Keras weights file of another network .*not VGG16"
    with pytest.raises(vgg16.WeightsError, match=message):
        vgg16.load_weights(path)
    with pytest.raises(vgg16.WeightsError, match="missing layer block1_conv1"):
        vgg16.load_weights(path, weights_format="keras-tf")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(vgg16.WeightsError, match="absent.h5: no such weights file"):
        vgg16.load_weights(tmp_path / "absent.h5")
    with pytest.raises(vgg16.WeightsError, match="is a folder; expected a VGG16"):
        vgg16.load_weights(tmp_path)


def test_unknown_format_name(shared_dir):
    with pytest.raises(ValueError, match="unknown weights format 'caffe'; valid: auto"):
        vgg16.load_weights(shared_dir / HED, weights_format="caffe")


def test_errors_are_one_line(tmp_path):
    path = write_keras_h5(
        tmp_path / "swapped.h5", shapes={"block2_conv1": (1, 1, 1, 1)}
    )
    with pytest.raises(vgg16.WeightsError) as info:
        vgg16.load_weights(path)
    assert "\n" not in str(info.value)


# --- finding the file ---------------------------------------------------------


def test_find_weights_prefers_the_notop_file(tmp_path):
    for name in (FULL, "other.h5", NOTOP):
        write_keras_h5(tmp_path / name)
    assert vgg16.find_weights(tmp_path) == tmp_path / NOTOP
    (tmp_path / NOTOP).unlink()
    assert vgg16.find_weights(tmp_path) == tmp_path / FULL


def test_find_weights_takes_any_vgg16_file_by_content(tmp_path):
    (tmp_path / "a_notes.h5").write_text("text")
    write_keras_h5(tmp_path / "b_resnet.h5", layers=["conv1_conv"])
    write_keras_h5(tmp_path / "c_my_vgg.h5")
    write_keras_h5(tmp_path / "d_more_vgg.h5")
    assert vgg16.find_weights(tmp_path) == tmp_path / "c_my_vgg.h5"


def test_find_weights_uses_a_file_as_given(shared_dir):
    assert vgg16.find_weights(shared_dir / HED) == shared_dir / HED


def test_find_weights_in_an_empty_folder_says_where_to_get_them(tmp_path):
    (tmp_path / "README.md").write_text("weights go here")
    with pytest.raises(vgg16.WeightsError) as info:
        vgg16.find_weights(tmp_path)
    message = str(info.value)
    assert message.startswith(f"no VGG16 weights in {tmp_path}: looked for {NOTOP}")
    assert vgg16.KERAS_NOTOP_URL in message and "58,889,256 bytes" in message
    assert vgg16.KERAS_FULL_URL in message and "553,467,096 bytes" in message
    assert "\n" not in message


def test_find_weights_in_a_missing_folder(tmp_path):
    with pytest.raises(vgg16.WeightsError, match="nowhere: no such weights file or"):
        vgg16.find_weights(tmp_path / "nowhere")


def test_default_weights_root_is_beside_the_code():
    assert vgg16.DEFAULT_WEIGHTS_ROOT.name == "weights"
    assert (vgg16.DEFAULT_WEIGHTS_ROOT.parent / "common" / "vgg16.py").is_file()


def test_find_weights_says_why_each_candidate_was_skipped(tmp_path, shared_dir):
    real = shared_dir / "weights" / "vgg16_hed_bsds500_notop.h5"
    (tmp_path / "old_download.h5").write_bytes(real.read_bytes()[:1000])
    (tmp_path / "notes.pth").write_text("not weights")
    with pytest.raises(vgg16.NoWeightsFound) as raised:
        vgg16.find_weights(tmp_path)
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert f"(skipped {tmp_path / 'notes.pth'}: not an HDF5 file" in message
    assert f"{tmp_path / 'old_download.h5'}: truncated HDF5 file" in message
