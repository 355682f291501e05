"""Every VGG16 weights format, each written from the real Keras Applications file.

The edge-detection VGG16 in ``shared/weights`` (Keras Applications layout,
TensorFlow kernels) is written here in every other format by that format's own
rules: Theano's flipped channels-first kernels, the Keras 1 ``layer_N`` groups
of the 2016 Caffe conversion, a torchvision state dict whose first layer takes
torchvision's input, and Keras 3's ``save_weights``. Each must give the same
features on a real photo, and the same dream and style transfer, through its
own preprocessing. Then: checksums, damaged files, and ``--download_weights``
against a mirror on 127.0.0.1.
"""

import argparse
import hashlib
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from mirror_server import MirrorServer, without_proxies
from PIL import Image

from common import cli, vgg16, weights_download
from common.download import DownloadError

HED = "weights/vgg16_hed_bsds500_notop.h5"

# What the Caffe VGG16 subtracts from each of R, G, B (in 0..255), and the
# mean and standard deviation torchvision normalises RGB in 0..1 with.
CAFFE_MEAN_RGB = np.array([123.68, 116.779, 103.939])
TORCHVISION_MEAN = np.array([0.485, 0.456, 0.406])
TORCHVISION_STD = np.array([0.229, 0.224, 0.225])

# Where each format is written, and the format its content says it is. The
# names say nothing except where only the name can: the flip.
FILES = {
    "keras-th": "vgg16_weights_th_dim_ordering_th_kernels_notop.h5",
    "keras-th-tf-kernels": "vgg16_weights_th_dim_ordering_tf_kernels_notop.h5",
    "caffe-keras1": "vgg16_weights.h5",
    "keras3": "hed.weights.h5",
    "torchvision": "hed_with_classifier.pth",
    "torchvision-features": "hed_features.pth",
}
FORMAT_OF = {key: key.removesuffix("-features") for key in FILES}

# Zero padding is a different colour in each input space; through 13
# convolutions and 4 poolings that reaches 6 pixels into block5_conv3.
BLOCK5_BORDER = 6


# --- writing the HED network in each format ---------------------------------------


def read_hed(path):
    """name -> (kernel (3, 3, in, out), bias (out,)), float32, read with h5py."""
    arrays = {}
    with h5py.File(path, "r") as file:
        for name in vgg16.CONV_LAYERS:
            # Names are bytes or str, depending on how the file was written.
            kernel_name, bias_name = (
                n.decode() if isinstance(n, bytes) else n
                for n in file[name].attrs["weight_names"]
            )
            layer = file[name]
            arrays[name] = (layer[kernel_name][()], layer[bias_name][()])
    return arrays


def theano_kernel(kernel):
    """(height, width, in, out) as Theano stores it: (out, in, height, width),
    rotated by 180 degrees, because Theano's conv2d is a true convolution."""
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)[:, :, ::-1, ::-1])


def write_keras_channels_first(path, arrays, *, flip):
    """Keras Applications layout (``layer_names``, a group per layer listing its
    ``weight_names``) with channels-first kernels, as Keras 1 saved it."""
    names = ["input_1", *vgg16.LAYERS]
    with h5py.File(path, "w") as file:
        file.attrs["layer_names"] = np.array([name.encode() for name in names])
        for name in names:
            group = file.create_group(name)
            if name not in arrays:
                group.attrs["weight_names"] = np.array([], dtype="S1")
                continue
            kernel, bias = arrays[name]
            stored = theano_kernel(kernel) if flip else kernel.transpose(3, 2, 0, 1)
            group[f"{name}_W"] = stored
            group[f"{name}_b"] = bias
            group.attrs["weight_names"] = np.array(
                [b"%s_W" % name.encode(), b"%s_b" % name.encode()]
            )
    return path


def write_keras1(path, arrays, *, drop_convolutions=0):
    """The 2016 Caffe conversion as Keras 1 saved it: one ``layer_N`` group per
    layer of the Sequential model in order (zero padding before each
    convolution, pooling after each block, then the classifier), ``nb_params``
    on each, ``param_0``/``param_1`` datasets. The dense weights are declared,
    never written: they read as zeros and take no space."""
    layers = []
    for name in vgg16.LAYERS:
        if name.endswith("_pool"):
            layers.append([])  # MaxPooling2D
        elif name in arrays and drop_convolutions <= 0:
            kernel, bias = arrays[name]
            layers += [[], [theano_kernel(kernel), bias]]  # ZeroPadding2D, conv
        else:
            drop_convolutions -= 1
    dense = [(25088, 4096), (4096, 4096), (4096, 1000)]
    layers.append([])  # Flatten
    for index, (inputs, outputs) in enumerate(dense):
        layers.append([(inputs, outputs), (outputs,)])
        if index < 2:
            layers.append([])  # Dropout
    with h5py.File(path, "w") as file:
        file.attrs["nb_layers"] = len(layers)
        for index, params in enumerate(layers):
            group = file.create_group(f"layer_{index}")
            group.attrs["nb_params"] = len(params)
            for number, param in enumerate(params):
                if isinstance(param, tuple):
                    group.create_dataset(f"param_{number}", shape=param, dtype="f4")
                else:
                    group[f"param_{number}"] = param
    return path


def fold_caffe_input(kernel, bias):
    """The first layer for torchvision's input, from the Caffe-convention one.

    The Caffe layer sees ``bgr - caffe_mean`` of pixels in 0..255; torchvision
    feeds ``t = (rgb / 255 - mean) / std``, so ``rgb = 255 * (std * t + mean)``.
    Put in, the layer becomes ``sum K_rgb * 255 * std * t`` plus ``sum K_rgb *
    (255 * mean - caffe_mean)``: the scale goes into the kernel, the constant
    into the bias. Same output on the same pixels (away from the zero padding).
    """
    rgb_kernel = kernel[:, :, ::-1, :].astype(np.float64)  # input channels BGR->RGB
    folded_kernel = rgb_kernel * (255 * TORCHVISION_STD)[None, None, :, None]
    shift = 255 * TORCHVISION_MEAN - CAFFE_MEAN_RGB
    folded_bias = bias + np.einsum("hwio,i->o", rgb_kernel, shift)
    return folded_kernel.astype(np.float32), folded_bias.astype(np.float32)


def torchvision_state(arrays, *, classifier):
    """A torchvision VGG16 state dict: ``features`` is Conv2d, ReLU, ... with a
    MaxPool2d closing each block; kernels (out, in, height, width), unflipped,
    since PyTorch's conv2d is a cross-correlation like Keras'."""
    import torch

    state, index = {}, 0
    for name in vgg16.LAYERS:
        if name.endswith("_pool"):
            index += 1
            continue
        kernel, bias = arrays[name]
        if name == "block1_conv1":
            kernel, bias = fold_caffe_input(kernel, bias)
        state[f"features.{index}.weight"] = torch.from_numpy(
            np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        )
        state[f"features.{index}.bias"] = torch.from_numpy(bias.copy())
        index += 2
    if classifier:
        # The real classifier is (4096, 25088) and up; small stand-ins keep the
        # file small, and the reader only skips them.
        for number, shape in ((0, (8, 16)), (3, (8, 8)), (6, (10, 8))):
            state[f"classifier.{number}.weight"] = torch.zeros(shape)
            state[f"classifier.{number}.bias"] = torch.zeros(shape[:1])
    return state


@pytest.fixture(scope="module")
def hed_path(shared_dir):
    return shared_dir / HED


@pytest.fixture(scope="module")
def hed_arrays(hed_path):
    return read_hed(hed_path)


@pytest.fixture(scope="module")
def written(tmp_path_factory, hed_path, hed_arrays):
    """Every other format of the HED network, written once: key -> path."""
    import torch

    folder = tmp_path_factory.mktemp("formats")
    paths = {key: folder / name for key, name in FILES.items()}
    write_keras_channels_first(paths["keras-th"], hed_arrays, flip=True)
    write_keras_channels_first(paths["keras-th-tf-kernels"], hed_arrays, flip=False)
    write_keras1(paths["caffe-keras1"], hed_arrays)
    for key, classifier in (("torchvision", True), ("torchvision-features", False)):
        torch.save(torchvision_state(hed_arrays, classifier=classifier), paths[key])
    model = vgg16.build_feature_model(vgg16.load_weights(hed_path), ["block5_conv3"])
    model.save_weights(paths["keras3"])
    return paths


# --- recognised by content --------------------------------------------------------


@pytest.mark.parametrize("key", list(FILES))
def test_each_format_is_recognised_by_its_content(written, key, tmp_path):
    assert vgg16.detect_format(written[key]) == FORMAT_OF[key]
    weights = vgg16.load_weights(written[key])
    assert weights.format == FORMAT_OF[key]
    assert weights.description.startswith(vgg16.FORMATS[FORMAT_OF[key]].summary)
    assert weights.description.endswith(f"({FILES[key]})")
    assert "official" not in weights.description
    # A name that says nothing changes nothing, except for the flip, which
    # only the name can tell (Theano kernels are the default).
    renamed = tmp_path / f"renamed{written[key].suffix}"
    renamed.symlink_to(written[key])
    expected = "keras-th" if key == "keras-th-tf-kernels" else FORMAT_OF[key]
    assert vgg16.detect_format(renamed) == expected


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("torchvision", "with the classifier (unused)"),
        ("torchvision-features", "features only"),
        ("caffe-keras1", "with the dense top (unused)"),
        ("keras3", "no top"),
        ("keras-th", "no top"),
    ],
)
def test_descriptions_say_what_is_in_the_file(written, key, words):
    assert f", {words} (" in vgg16.load_weights(written[key]).description


def test_preprocessing_of_each_format(written):
    torchvision = vgg16.load_weights(written["torchvision"]).preprocessing
    assert torchvision.channel_order == "RGB"
    assert torchvision.scale == pytest.approx(1 / 255)
    np.testing.assert_allclose(torchvision.mean, TORCHVISION_MEAN)
    np.testing.assert_allclose(torchvision.std, TORCHVISION_STD)
    for key in ("keras-th", "keras-th-tf-kernels", "caffe-keras1", "keras3"):
        assert vgg16.load_weights(written[key]).preprocessing == (
            vgg16.CAFFE_PREPROCESSING
        )


def test_the_format_option_overrides_content_and_name(written, hed_arrays):
    flipped = vgg16.load_weights(written["keras-th-tf-kernels"], "keras-th")
    unflipped = vgg16.load_weights(written["keras-th"], "keras-th-tf-kernels")
    kernel = hed_arrays["block1_conv1"][0]
    np.testing.assert_array_equal(
        unflipped.layers["block1_conv1"][0], kernel[::-1, ::-1]
    )
    np.testing.assert_array_equal(flipped.layers["block1_conv1"][0], kernel[::-1, ::-1])
    assert not np.array_equal(kernel, kernel[::-1, ::-1])


def test_find_weights_takes_each_format_by_content(written, tmp_path):
    for key in ("torchvision-features", "caffe-keras1", "keras3"):
        folder = tmp_path / key
        folder.mkdir()
        (folder / "a_notes.pth").write_bytes(b"not weights")
        (folder / f"b{written[key].suffix}").symlink_to(written[key])
        assert vgg16.find_weights(folder) == folder / f"b{written[key].suffix}"


# --- the same network in every format ---------------------------------------------


def cat_photo(shared_dir, size=256):
    """The middle of the cat photo: float32 (1, size, size, 3), RGB, 0..255."""
    with Image.open(shared_dir / "images" / "chelsea_cat.png") as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    top, left = ((side - size) // 2 for side in pixels.shape[:2])
    return pixels[None, top : top + size, left : left + size]


def block5_features(weights, photo):
    import keras

    model = vgg16.build_feature_model(weights, ["block5_conv3"])
    return keras.ops.convert_to_numpy(model(photo)["block5_conv3"])[0]


@pytest.fixture(scope="module")
def features_of(shared_dir, hed_path, written):
    """(key, size) -> block5_conv3 features of the cat photo, each computed once;
    "keras-tf" is the shared file itself."""
    cache = {}

    def features(key, size):
        if (key, size) not in cache:
            path = hed_path if key == "keras-tf" else written[key]
            photo = cat_photo(shared_dir, size)
            cache[key, size] = block5_features(vgg16.load_weights(path), photo)
        return cache[key, size]

    return features


@pytest.mark.parametrize(
    ("key", "reference"),
    [
        ("keras-th", "keras-tf"),
        ("keras-th-tf-kernels", "keras-tf"),
        ("caffe-keras1", "keras-tf"),
        ("keras3", "keras-tf"),
        ("torchvision-features", "torchvision"),
    ],
)
def test_same_block5_features_as_a_file_of_the_same_input_space(
    written, hed_path, features_of, key, reference
):
    # The same arrays once read...
    read = vgg16.load_weights(written[key]).layers
    reference_path = hed_path if reference == "keras-tf" else written[reference]
    for name, arrays in vgg16.load_weights(reference_path).layers.items():
        for array, expected_array in zip(read[name], arrays, strict=True):
            np.testing.assert_array_equal(array, expected_array, err_msg=name)

    # ... and the same padding, so equal features everywhere, on a small crop.
    features, expected = features_of(key, 96), features_of(reference, 96)
    assert features.shape == expected.shape == (6, 6, 512)
    scale = np.abs(expected).max()
    assert np.count_nonzero(expected) > 1000
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-5 * scale)


def test_torchvision_gives_the_keras_files_block5_features(features_of):
    # Zero padding is a different colour in each input space: compare away
    # from the border, on a crop large enough to have an inside.
    features, expected = features_of("torchvision", 256), features_of("keras-tf", 256)
    assert features.shape == expected.shape == (16, 16, 512)
    inner = slice(BLOCK5_BORDER, -BLOCK5_BORDER)
    features, expected = features[inner, inner], expected[inner, inner]
    scale = np.abs(expected).max()
    assert np.count_nonzero(expected) > 1000
    np.testing.assert_allclose(features, expected, rtol=0, atol=5e-5 * scale)


def test_first_layer_as_theano_and_torch_compute_it(written):
    """The stored kernels, used the way their own framework uses them (a true
    convolution for Theano, torch's conv2d), give our first layer."""
    import keras
    import torch
    from scipy.signal import convolve2d

    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (1, 9, 11, 3)).astype(np.float32)

    def ours(key):
        model = vgg16.build_feature_model(
            vgg16.load_weights(written[key]), ["block1_conv1"]
        )
        return keras.ops.convert_to_numpy(model(pixels)["block1_conv1"])[0]

    with h5py.File(written["keras-th"], "r") as file:
        kernel = file["block1_conv1/block1_conv1_W"][()]
        bias = file["block1_conv1/block1_conv1_b"][()]
    bgr = (pixels[0] - CAFFE_MEAN_RGB.astype(np.float32))[..., ::-1]
    theano = np.stack(
        [
            sum(convolve2d(bgr[..., i], kernel[o, i], mode="same") for i in range(3))
            + bias[o]
            for o in range(kernel.shape[0])
        ],
        axis=-1,
    )
    np.testing.assert_allclose(ours("keras-th"), np.maximum(theano, 0), atol=1e-3)

    state = torch.load(written["torchvision"], weights_only=True)
    normalised = (pixels[0] / 255 - TORCHVISION_MEAN) / TORCHVISION_STD
    x = torch.from_numpy(normalised.transpose(2, 0, 1)[None].astype(np.float32))
    torch_output = torch.relu(
        torch.nn.functional.conv2d(
            x, state["features.0.weight"], state["features.0.bias"], padding=1
        )
    )
    expected = torch_output[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours("torchvision"), expected, atol=1e-3)


# --- the same pictures from the scripts -------------------------------------------


def small_picture(path, size, seed):
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    Image.fromarray(coarse).resize((size[1], size[0]), Image.BICUBIC).save(path)
    return path


def png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def run_scripts(weights_path, folder):
    """A short dream and a short style transfer with ``weights_path``: the two
    results as float32 (height, width, 3) arrays."""
    import deep_dream
    import neural_style_transfer

    folder.mkdir(parents=True, exist_ok=True)
    content = small_picture(folder / "content.png", (40, 48), 0)
    style = small_picture(folder / "style.png", (32, 32), 1)
    weights = ["--weights_root", str(weights_path)]
    dream = [str(content), str(folder / "dream"), "--layers", "block3_conv1"]
    assert deep_dream.main([*weights, *dream, "--iter", "3", "--octaves", "1"]) == 0
    style_run = [str(content), str(style), str(folder / "style")]
    layers = ["--content_layer", "block3_conv1", "--style_layers"]
    layers.append("block1_conv1,block2_conv1,block3_conv1")
    assert (
        neural_style_transfer.main([*weights, *style_run, *layers, "--iter", "3"]) == 0
    )
    return png(content), png(folder / "dream.png"), png(folder / "style.png")


@pytest.fixture(scope="module")
def reference_pictures(tmp_path_factory, hed_path):
    return run_scripts(hed_path, tmp_path_factory.mktemp("reference"))


# The scripts take every format through the same load_weights and model; the
# runs cover the other input space and the 2016 guide's own file. The other
# formats read to exactly the Keras file's arrays (test above).
@pytest.mark.parametrize("key", ["torchvision", "caffe-keras1"])
def test_same_dream_and_style_transfer_as_the_keras_file(
    written, key, reference_pictures, tmp_path
):
    content, *expected = reference_pictures
    _, *results = run_scripts(written[key], tmp_path)
    for result, reference in zip(results, expected, strict=True):
        change = np.abs(reference - content).mean()
        difference = np.abs(result - reference)
        assert change > 2, "the run left the picture as it was"
        if FORMAT_OF[key] == "torchvision":
            # Its zero padding is under half a grey level away in colour.
            assert difference.max() <= 2 and difference.mean() < 0.02 * change
        else:
            assert difference.max() <= 1


# --- published checksums ----------------------------------------------------------


def digest(path, name):
    return hashlib.new(name, Path(path).read_bytes()).hexdigest()


def test_a_published_keras_checksum_names_the_official_file(monkeypatch, hed_path):
    size = hed_path.stat().st_size
    monkeypatch.setattr(vgg16, "KERAS_PUBLISHED_MD5", {digest(hed_path, "md5"): size})
    description = vgg16.load_weights(hed_path).description
    assert (
        ", no top, the official Keras ImageNet weights (MD5 verified) (" in description
    )
    monkeypatch.setattr(vgg16, "KERAS_PUBLISHED_MD5", {"0" * 32: size})
    assert (
        "its MD5 differs (damaged or modified)"
        in vgg16.load_weights(hed_path).description
    )
    monkeypatch.setattr(vgg16, "KERAS_PUBLISHED_MD5", {digest(hed_path, "md5"): 1})
    assert "MD5" not in vgg16.load_weights(hed_path).description


def test_the_published_keras_checksums_are_the_ones_keras_lists():
    assert vgg16.KERAS_PUBLISHED_MD5 == {
        "6d6bbae143d832006294945121d1f1fc": 58_889_256,
        "64373286793e3c8b2b4e3219cbf3544b": 553_467_096,
    }


def test_torchvision_hash_in_the_name_names_the_official_file(
    monkeypatch, written, tmp_path
):
    prefix = digest(written["torchvision-features"], "sha256")[:8]
    official = tmp_path / f"vgg16-{prefix}.pth"
    official.symlink_to(written["torchvision-features"])
    assert "official" not in vgg16.load_weights(official).description
    monkeypatch.setattr(vgg16, "TORCHVISION_PUBLISHED_PREFIXES", (prefix,))
    description = vgg16.load_weights(official).description
    assert (
        "features only, the official torchvision ImageNet weights (SHA-256"
        in description
    )

    impostor = tmp_path / "vgg16-397923af.pth"
    impostor.symlink_to(written["torchvision-features"])
    monkeypatch.undo()
    description = vgg16.load_weights(impostor).description
    assert "its SHA-256 does not start with 397923af as its name says" in description


# --- wrong and damaged files: one clear line each ---------------------------------


def leave_mark(path):
    Path(path).write_text("code from a weights file ran")


class RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return leave_mark, (str(self.marker),)


def torch_file(path, content, **options):
    import torch

    torch.save(content, path, **options)
    return path


def truncated(path, source, keep=0.5):
    data = Path(source).read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def copy_h5(source_path, path, *, leave_out=(), replace=None):
    """A copy of an HDF5 file without the entries in ``leave_out`` and with the
    datasets in ``replace`` (path inside the file -> array) swapped in."""
    with h5py.File(source_path, "r") as source, h5py.File(path, "w") as copy:
        for key, value in source.attrs.items():
            copy.attrs[key] = value
        for name in source:
            if name not in leave_out:
                source.copy(source[name], copy, name=name)
        for name, array in (replace or {}).items():
            del copy[name]
            copy[name] = array
    return path


def bad_files(written, hed_arrays, folder):
    """name -> (file, format option, words its one-line error must hold)."""
    import torch

    small = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(2)}
    vgg19 = {f"features.{i}.weight": torch.zeros(1, 1, 3, 3) for i in range(16)}
    vgg16_bn = {
        "features.0.weight": torch.zeros(64, 3, 3, 3),
        "features.1.running_mean": torch.zeros(64),
    }
    wrong_kernel = {"block2_conv1/block2_conv1_W": np.zeros((128, 32, 3, 3), "f4")}
    keras3_nan = {"layers/conv2d_3/vars/1": np.full(128, np.nan, "f4")}
    return {
        # Keras Applications, Theano kernels
        "th-truncated": (
            truncated(folder / "th_cut.h5", written["keras-th"]),
            "auto",
            "truncated HDF5 file",
        ),
        "th-wrong-kernel": (
            copy_h5(written["keras-th"], folder / "th_wrong.h5", replace=wrong_kernel),
            "auto",
            "block2_conv1 kernel has shape (128, 32, 3, 3), expected (128, 64, 3, 3) "
            "(channels-first layout: out, in, height, width)",
        ),
        "th-not-hdf5": (
            written["torchvision"],
            "keras-th",
            "not an HDF5 file, so not in the keras-th format",
        ),
        # Keras 1, Caffe conversion
        "keras1-gap": (
            copy_h5(
                written["caffe-keras1"], folder / "gap.h5", leave_out=("layer_20",)
            ),
            "auto",
            "nb_layers says 37 layers, but layer_20 is missing",
        ),
        "keras1-twelve": (
            write_keras1(folder / "twelve.h5", hed_arrays, drop_convolutions=1),
            "auto",
            "12 convolution layers (layer_N groups with a 4-D param_0); VGG16 has 13",
        ),
        "keras1-truncated": (
            truncated(folder / "k1_cut.h5", written["caffe-keras1"]),
            "auto",
            "truncated HDF5 file",
        ),
        "keras1-not-keras1": (
            written["keras3"],
            "caffe-keras1",
            "no nb_layers attribute; not a Keras 1",
        ),
        # Keras 3
        "keras3-truncated": (
            truncated(folder / "cut.weights.h5", written["keras3"]),
            "auto",
            "truncated HDF5 file",
        ),
        "keras3-nan": (
            copy_h5(written["keras3"], folder / "nan.weights.h5", replace=keras3_nan),
            "auto",
            "block2_conv2 holds NaN or infinite values",
        ),
        "keras3-not-keras3": (
            written["keras-th"],
            "keras3",
            "no layers/<name>/vars groups; not a Keras 3",
        ),
        # torchvision
        "torch-truncated": (
            truncated(folder / "cut.pth", written["torchvision"]),
            "auto",
            "damaged PyTorch file",
        ),
        "torch-other-network": (
            torch_file(folder / "small.pth", small),
            "auto",
            "a PyTorch file of another network (keys conv1.weight, fc.bias), not VGG16",
        ),
        "torch-legacy-other-network": (
            torch_file(folder / "old.pt", small, _use_new_zipfile_serialization=False),
            "auto",
            "another network (keys conv1.weight",
        ),
        "torch-vgg19": (
            torch_file(folder / "vgg19.pth", vgg19),
            "torchvision",
            "16 convolutions under features.*; VGG16 has 13",
        ),
        "torch-vgg16-bn": (
            torch_file(folder / "bn.pth", vgg16_bn),
            "auto",
            "batch normalisation (vgg16_bn)",
        ),
        "torch-tensor": (
            torch_file(folder / "tensor.pth", torch.zeros(3)),
            "auto",
            "a PyTorch file holding a Tensor, not a state dict",
        ),
        "torch-not-torch": (
            written["keras3"],
            "torchvision",
            "not a PyTorch file, so not in the torchvision",
        ),
    }


@pytest.fixture(scope="module")
def bad(written, hed_arrays, tmp_path_factory):
    return bad_files(written, hed_arrays, tmp_path_factory.mktemp("bad"))


BAD_FILES = (
    "th-truncated",
    "th-wrong-kernel",
    "th-not-hdf5",
    "keras1-gap",
    "keras1-twelve",
    "keras1-truncated",
    "keras1-not-keras1",
    "keras3-truncated",
    "keras3-nan",
    "keras3-not-keras3",
    "torch-truncated",
    "torch-other-network",
    "torch-legacy-other-network",
    "torch-vgg19",
    "torch-vgg16-bn",
    "torch-tensor",
    "torch-not-torch",
)


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_wrong_or_damaged_file_gives_one_clear_line(bad, case):
    path, weights_format, words = bad[case]
    with pytest.raises(vgg16.WeightsError) as info:
        vgg16.load_weights(path, weights_format)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert words in message
    assert "\n" not in message


def test_every_bad_file_is_tried(bad):
    assert sorted(bad) == sorted(BAD_FILES)


def test_a_pth_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker.txt"
    path = torch_file(
        tmp_path / "trap.pth", {"features.0.weight": RunsCodeWhenUnpickled(marker)}
    )
    for call in (vgg16.detect_format, vgg16.load_weights):
        with pytest.raises(vgg16.WeightsError) as info:
            call(path)
        message = str(info.value)
        assert "holds Python objects (" in message and "leave_mark" in message
        assert "torch.load(weights_only=True)" in message and "state_dict()" in message
        assert "\n" not in message
    assert not marker.exists()


def test_archives_that_are_not_pytorch_files(tmp_path):
    keras_archive = tmp_path / "vgg16.keras"
    with zipfile.ZipFile(keras_archive, "w") as archive:
        archive.writestr("config.json", "{}")
        archive.writestr("model.weights.h5", b"")
    with pytest.raises(
        vgg16.WeightsError, match=r"vgg16.keras: a Keras model archive \(.keras\); give"
    ):
        vgg16.load_weights(keras_archive)
    other = tmp_path / "photos.pth"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("cat.txt", "meow")
    with pytest.raises(
        vgg16.WeightsError, match="photos.pth: a zip archive, not a PyTorch file"
    ):
        vgg16.load_weights(other)


def test_a_file_of_no_known_kind(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("weights, honestly")
    with pytest.raises(
        vgg16.WeightsError, match=r"notes.pth: not an HDF5 file \(nor a PyTorch one\)"
    ):
        vgg16.detect_format(path)


# --- --download_weights, against a mirror on 127.0.0.1 ----------------------------


@pytest.fixture(autouse=True)
def no_real_mirror(monkeypatch):
    """Nothing in this module may reach the real download URL: its default points
    at a port on 127.0.0.1 where nothing listens, unless a test sets a mirror."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{weights_download.FILE_NAME}"
    monkeypatch.setattr(weights_download, "URLS", (url,))
    without_proxies(monkeypatch)


@pytest.fixture
def mirror(hed_path):
    name = weights_download.FILE_NAME
    data = hed_path.read_bytes()
    with MirrorServer() as server:
        server.serve(f"/good/{name}", data)
        server.fail(f"/gone/{name}", 404)
        server.truncate(f"/short/{name}", data[:1000], len(data))
        yield server


def test_download_verifies_the_md5_and_reports_progress(mirror, hed_path, tmp_path):
    name = weights_download.FILE_NAME
    calls, notes = [], []
    path = weights_download.download_keras_notop(
        tmp_path / "weights",
        urls=[mirror.url(f"/gone/{name}"), mirror.url(f"/good/{name}")],
        md5=digest(hed_path, "md5"),
        progress=lambda done, total: calls.append((done, total)),
        notes=notes,
    )
    size = hed_path.stat().st_size
    assert path == tmp_path / "weights" / name
    assert path.read_bytes() == hed_path.read_bytes()
    assert calls[-1] == (size, size) and calls[0] == (0, size)
    assert "HTTP 404" in notes[0] and notes[-1].endswith(
        f"from {mirror.url(f'/good/{name}')}"
    )
    assert sorted(p.name for p in path.parent.iterdir()) == [name]


def test_download_refuses_a_file_that_is_not_the_published_one(
    mirror, hed_path, tmp_path
):
    name = weights_download.FILE_NAME
    urls = [mirror.url(f"/short/{name}"), mirror.url(f"/good/{name}")]
    with pytest.raises(DownloadError) as info:
        weights_download.download_keras_notop(tmp_path, urls=urls)
    message = str(info.value)
    assert f"could not download {name}: all 2 mirrors failed" in message
    assert "short file: 1000 of" in message
    assert f"MD5 mismatch (got {digest(hed_path, 'md5')}" in message
    assert "expected 6d6bbae143d832006294945121d1f1fc" in message
    assert list(tmp_path.iterdir()) == []


def test_download_refuses_a_file_that_is_not_vgg16(tmp_path):
    not_vgg = tmp_path / "served.h5"
    with h5py.File(not_vgg, "w") as file:
        file["x"] = np.zeros(3)
    folder = tmp_path / "weights"
    with MirrorServer() as server:
        server.serve("/other.h5", not_vgg.read_bytes())
        with pytest.raises(
            DownloadError,
            match="content check failed: not the Keras VGG16 file: no 'layer_names'",
        ):
            weights_download.download_keras_notop(
                folder, urls=[server.url("/other.h5")], md5=digest(not_vgg, "md5")
            )
    assert not folder.exists() or list(folder.iterdir()) == []


def test_a_verified_file_already_there_is_kept(mirror, hed_path, tmp_path):
    destination = tmp_path / weights_download.FILE_NAME
    destination.write_bytes(hed_path.read_bytes())
    notes = []
    path = weights_download.download_keras_notop(
        tmp_path, urls=[mirror.url("/gone/x")], md5=digest(hed_path, "md5"), notes=notes
    )
    assert path == destination and mirror.requests == []
    assert notes == [f"{destination} is already there (MD5 verified)"]


def options(*argv):
    parser = argparse.ArgumentParser()
    cli.add_common_arguments(parser, max_size=64)
    return parser.parse_args(list(argv))


def test_resolve_weights_downloads_when_asked_then_finds_the_file(
    monkeypatch, mirror, hed_path, tmp_path
):
    name = weights_download.FILE_NAME
    monkeypatch.setattr(weights_download, "URLS", (mirror.url(f"/good/{name}"),))
    monkeypatch.setattr(weights_download, "MD5", digest(hed_path, "md5"))
    folder = tmp_path / "my weights"
    with pytest.raises(vgg16.WeightsError, match="no such weights file or folder"):
        cli.resolve_weights(options("--weights_root", str(folder)))
    folder.mkdir()
    with pytest.raises(vgg16.NoWeightsFound, match="; or add --download_weights$"):
        cli.resolve_weights(options("--weights_root", str(folder)))
    assert mirror.requests == []

    seen = []
    args = options("--weights_root", str(folder), "--download_weights")
    path = cli.resolve_weights(args, progress=lambda *done: seen.append(done))
    assert path == folder / name and seen
    assert vgg16.load_weights(path).format == "keras-tf"
    assert len(mirror.requests) == 1


def test_download_into_a_file_is_refused(hed_path, tmp_path):
    with pytest.raises(
        DownloadError, match="is a file; weights are downloaded into a folder"
    ):
        cli.resolve_weights(
            options("--weights_root", str(hed_path), "--download_weights")
        )
