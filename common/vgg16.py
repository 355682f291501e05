"""The VGG16 convolution base in Keras 3, its weights files and their preprocessing.

The network is the convolution part of VGG16 (Simonyan and Zisserman, 2014, "Very
Deep Convolutional Networks for Large-Scale Image Recognition"): five blocks of
3x3 'same' convolutions with ReLU, each followed by a 2x2 pooling of stride 2,
named and ordered exactly like ``keras.applications.VGG16(include_top=False)``.
It takes any image size, channels last.

Every model built here takes the project's one pixel convention,
``image: float32 (batch, height, width, 3), RGB, 0..255``; the preprocessing
that the weights file was trained with (channel order, scale, mean, std) is the
model's first layer. So optimisers work in grey levels whatever file was loaded.

Weights files are recognised by their content (:func:`detect_format`), and each
format is one entry of :data:`FORMATS`: a content test, a reader and the
preprocessing it implies.

This module imports Keras only inside the functions that build models, so it can
be imported (for :data:`FORMATS`, :func:`find_weights`, :func:`load_weights`)
before ``common.backend.select_backend`` has settled the backend.
"""

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# (filters, convolutions) per block, as in the paper's configuration D.
ARCHITECTURE = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def _layer_table():
    layers, kernel_shapes, min_sizes = [], {}, {}
    channels_in = 3
    for block, (filters, convolutions) in enumerate(ARCHITECTURE, start=1):
        for index in range(1, convolutions + 1):
            name = f"block{block}_conv{index}"
            layers.append(name)
            kernel_shapes[name] = (3, 3, channels_in, filters)
            min_sizes[name] = 2 ** (block - 1)
            channels_in = filters
        layers.append(f"block{block}_pool")
        min_sizes[f"block{block}_pool"] = 2**block
    return tuple(layers), kernel_shapes, min_sizes


LAYERS, KERNEL_SHAPES, _MIN_INPUT_SIZES = _layer_table()
CONV_LAYERS = tuple(name for name in LAYERS if "_conv" in name)
POOLINGS = ("max", "avg")

DEFAULT_WEIGHTS_ROOT = Path(__file__).resolve().parents[1] / "weights"

KERAS_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
)
KERAS_FULL_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
)
# The checksums and sizes Keras publishes for those two files.
KERAS_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"
KERAS_NOTOP_SIZE = 58_889_256
KERAS_FULL_MD5 = "64373286793e3c8b2b4e3219cbf3544b"
KERAS_FULL_SIZE = 553_467_096
# File names tried first in a weights folder, best first: the smallest file
# that has everything we need, then the one with the dense top we ignore.
PREFERRED_FILES = (
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
)
# Any other file with one of these endings is used if its content is VGG16.
CANDIDATE_SUFFIXES = (".h5", ".hdf5", ".pth", ".pt")


class WeightsError(ValueError):
    """A weights file that is missing, damaged, or not VGG16 in a known format."""


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def check_layers(names):
    """Return ``names`` as a tuple; ``ValueError`` naming any unknown layer."""
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    if not names:
        raise ValueError(f"no VGG16 layer named; valid layers: {', '.join(LAYERS)}")
    unknown = [name for name in names if name not in _MIN_INPUT_SIZES]
    if unknown:
        raise ValueError(
            f"unknown VGG16 layer {', '.join(map(repr, unknown))}; "
            f"valid layers: {', '.join(LAYERS)}"
        )
    return names


def min_input_size(layer_name):
    """Smallest image side (pixels) for which ``layer_name`` outputs at least 1x1."""
    (name,) = check_layers((layer_name,))
    return _MIN_INPUT_SIZES[name]


def deepest_layer(names):
    """The name among ``names`` that comes last in the network."""
    return max(check_layers(names), key=LAYERS.index)


# ---------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How a weights format wants its input, starting from RGB 0..255 pixels.

    ``x = (pixels[..., order] * scale - mean) / std``, where ``order`` puts the
    channels in ``channel_order`` and ``mean``/``std`` are given per channel of
    the network's input, in units after ``scale``.
    """

    channel_order: str  # "RGB" or "BGR": the network's input channel order
    scale: float  # 1.0 keeps 0..255; 1 / 255 gives 0..1
    mean: tuple  # 3 floats
    std: tuple  # 3 floats

    @property
    def channel_indices(self):
        """Index into RGB of each network input channel, e.g. (2, 1, 0) for BGR."""
        return tuple("RGB".index(channel) for channel in self.channel_order)

    def preprocess(self, pixels):
        """``pixels: float32 (..., 3), RGB, 0..255`` to the network's input space."""
        pixels = np.asarray(pixels, dtype=np.float32)
        ordered = pixels[..., list(self.channel_indices)]
        scale, mean, std = self._constants()
        return (ordered * scale - mean) / std

    def deprocess(self, x):
        """Inverse of :meth:`preprocess`: back to ``float32 (..., 3), RGB, 0..255``."""
        x = np.asarray(x, dtype=np.float32)
        scale, mean, std = self._constants()
        ordered = (x * std + mean) / scale
        inverse = np.argsort(self.channel_indices)
        return ordered[..., list(inverse)]

    def _constants(self):
        return (
            np.float32(self.scale),
            np.asarray(self.mean, dtype=np.float32),
            np.asarray(self.std, dtype=np.float32),
        )


# Caffe's VGG16, and every Keras Applications file converted from it: BGR,
# 0..255, minus the ImageNet channel means, no division.
CAFFE_PREPROCESSING = Preprocessing(
    channel_order="BGR",
    scale=1.0,
    mean=(103.939, 116.779, 123.68),
    std=(1.0, 1.0, 1.0),
)


@functools.cache
def _preprocessing_layer_class():
    """The Keras layer applying a :class:`Preprocessing`, defined on first use."""
    import keras

    @keras.saving.register_keras_serializable(package="common.vgg16")
    class PreprocessingLayer(keras.layers.Layer):
        """Applies a weights format's preprocessing inside the model."""

        def __init__(self, channel_order, scale, mean, std, **kwargs):
            super().__init__(**kwargs)
            self.preprocessing = Preprocessing(
                channel_order, float(scale), tuple(mean), tuple(std)
            )

        def call(self, pixels):
            ordered = keras.ops.take(
                pixels, list(self.preprocessing.channel_indices), axis=-1
            )
            scale, mean, std = (
                keras.ops.convert_to_tensor(constant)
                for constant in self.preprocessing._constants()
            )
            return (ordered * scale - mean) / std

        def compute_output_shape(self, input_shape):
            return input_shape

        def get_config(self):
            config = super().get_config()
            preprocessing = self.preprocessing
            config.update(
                channel_order=preprocessing.channel_order,
                scale=preprocessing.scale,
                mean=list(preprocessing.mean),
                std=list(preprocessing.std),
            )
            return config

    return PreprocessingLayer


def preprocessing_layer(preprocessing, name="preprocessing"):
    """A Keras layer that applies ``preprocessing`` (serialisable, no Lambda)."""
    layer_class = _preprocessing_layer_class()
    return layer_class(
        preprocessing.channel_order,
        preprocessing.scale,
        preprocessing.mean,
        preprocessing.std,
        name=name,
    )


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


@dataclass
class VGG16Weights:
    """The 13 convolution layers of a VGG16 file and how to feed them."""

    path: Path
    format: str  # a key of FORMATS
    description: str  # one line for the scripts to print
    layers: dict  # name -> (kernel float32 (3, 3, in, out), bias float32 (out,))
    preprocessing: Preprocessing


def build_feature_model(weights, output_layers, *, pooling="max"):
    """A Keras model from pixels to the outputs of ``output_layers``.

    Input ``image: float32 (batch, height, width, 3), RGB, 0..255``, any size;
    output a dict ``layer name -> float32 (batch, h, w, channels)``, one entry
    per distinct name. A dict, not a list, because Keras hands back a lone
    output unwrapped, so a list would change type with its length; look the
    features up by name in the order you need. Only the layers up to the
    deepest requested one are built. ``weights`` is a :class:`VGG16Weights`,
    or ``None`` for random weights with Caffe preprocessing (tests).
    ``pooling`` is ``"max"`` as in VGG16 or ``"avg"``, which Gatys et al.
    found gives smoother style transfer. All weights are non-trainable.

    On torch the model is a :class:`common.torch_fast.ChannelsLastFeatures`:
    the same Keras layers and variables, called without Keras's per-layer
    memory-layout copies.
    """
    import keras

    output_layers = check_layers(output_layers)
    if pooling not in POOLINGS:
        raise ValueError(
            f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}"
        )
    preprocessing = CAFFE_PREPROCESSING if weights is None else weights.preprocessing
    last = LAYERS.index(deepest_layer(output_layers))

    pixels = keras.Input((None, None, 3), name="image", dtype="float32")
    x = preprocessing_layer(preprocessing)(pixels)
    outputs = {}
    for name in LAYERS[: last + 1]:
        x = _vgg_layer(keras, name, pooling)(x)
        outputs[name] = x
    model = _feature_model_class(keras)(
        pixels, {name: outputs[name] for name in output_layers}, name="vgg16_features"
    )

    if weights is not None:
        for name in LAYERS[: last + 1]:
            if name in KERNEL_SHAPES:
                model.get_layer(name).set_weights(list(weights.layers[name]))
    model.trainable = False
    return model


def _feature_model_class(keras):
    """``keras.Model``, or on torch its subclass that calls in channels-last memory.

    The subclass (:mod:`common.torch_fast`) runs the same layers and variables
    without the layout copies Keras's torch convolutions make at every call.
    """
    if keras.backend.backend() != "torch":
        return keras.Model
    from common import torch_fast

    return torch_fast.ChannelsLastFeatures


def _vgg_layer(keras, name, pooling):
    if name in KERNEL_SHAPES:
        filters = KERNEL_SHAPES[name][-1]
        return keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu", name=name, trainable=False
        )
    pool = (
        keras.layers.MaxPooling2D if pooling == "max" else keras.layers.AveragePooling2D
    )
    return pool(2, strides=2, name=name)


# ---------------------------------------------------------------------------
# Weights formats
# ---------------------------------------------------------------------------

# torchvision's VGG16: RGB scaled to 0..1, then normalised per channel by the
# ImageNet mean and standard deviation.
TORCHVISION_PREPROCESSING = Preprocessing(
    channel_order="RGB",
    scale=1 / 255,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)

# Published checksums, so that the output can say a file is the official
# ImageNet one. Keras lists the MD5 of each file (digest -> size, so a file of
# any other size is never hashed); torchvision names its files
# <model>-<first 8 hex digits of the SHA-256>.pth.
KERAS_PUBLISHED_MD5 = {
    KERAS_NOTOP_MD5: KERAS_NOTOP_SIZE,
    KERAS_FULL_MD5: KERAS_FULL_SIZE,
}
TORCHVISION_PUBLISHED_PREFIXES = ("397923af",)  # vgg16-397923af.pth
HASH_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class WeightsFormat:
    """One kind of VGG16 file: how to recognise it, read it, and feed it.

    ``container`` is what :func:`_sniff_container` finds ("hdf5" or "torch").
    ``matches(content, path)`` looks at the opened content (an ``h5py.File``,
    or a PyTorch file's ``name -> tensor`` dict) and, only to break a tie
    content cannot, the name. ``read(content, path)`` returns ``(layers,
    detail)``: the :class:`VGG16Weights` ``layers`` dict and a few words for
    the description, e.g. "no top". ``published(path)``, if given, returns
    words naming the file as a published one when its checksum says so, or "".
    """

    name: str
    summary: str
    container: str
    matches: object  # (content, path) -> bool
    read: object  # (content, path) -> (layers, detail)
    preprocessing: Preprocessing
    published: object = None  # path -> str


def _keras_weights_group(h5file):
    """The group holding ``layer_names``: the root, or ``model_weights`` in saves
    of a whole model."""
    if "layer_names" in h5file.attrs:
        return h5file
    group = h5file.get("model_weights")
    if group is not None and "layer_names" in group.attrs:
        return group
    return None


def _decoded(names):
    return [
        name.decode("utf8") if isinstance(name, bytes) else str(name) for name in names
    ]


def _read_dataset(group, key, where, path):
    """One dataset of an HDF5 group as float32, or a one-line WeightsError."""
    dataset = group.get(key)
    if dataset is None:
        raise WeightsError(f"{path}: {where} has no dataset {key!r}")
    try:
        return np.asarray(dataset[()], dtype=np.float32)
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsError(
            f"{path}: cannot read {where}/{key}: {_first_line(exc)}"
        ) from exc


def _checked_conv(kernel, bias, name, path, layout):
    expected = KERNEL_SHAPES[name]
    if kernel.shape != expected:
        raise WeightsError(
            f"{path}: {name} kernel has shape {kernel.shape}, expected {expected} "
            f"({layout} layout: height, width, in, out)"
        )
    if bias.shape != expected[-1:]:
        raise WeightsError(
            f"{path}: {name} bias has shape {bias.shape}, expected {expected[-1:]}"
        )
    if not (np.all(np.isfinite(kernel)) and np.all(np.isfinite(bias))):
        raise WeightsError(f"{path}: {name} holds NaN or infinite values")
    return kernel, bias


def _channels_first_conv(kernel, bias, name, path, *, flipped):
    """A kernel stored (out, in, height, width) as Keras' (height, width, in, out).

    ``flipped``: the file comes from Theano, whose conv2d is a true convolution
    (it rotates the kernel by 180 degrees as it slides), so the kernel is
    rotated back for Keras' cross-correlation. PyTorch's conv2d, like Keras',
    is a cross-correlation: its kernels are not flipped.
    """
    height, width, channels_in, filters = KERNEL_SHAPES[name]
    expected = (filters, channels_in, height, width)
    if kernel.shape != expected:
        raise WeightsError(
            f"{path}: {name} kernel has shape {kernel.shape}, expected {expected} "
            "(channels-first layout: out, in, height, width)"
        )
    if flipped:
        kernel = kernel[:, :, ::-1, ::-1]
    kernel = np.ascontiguousarray(kernel.transpose(2, 3, 1, 0))
    return _checked_conv(kernel, bias, name, path, "converted")


# -- Keras Applications (Keras 1 and 2 save_weights): TensorFlow or Theano ----


def _keras_kernel_layout(h5file):
    """ "tf" for kernels (height, width, in, out), "th" for (out, in, height,
    width), judged on the first VGG16 convolution the file names; None when it
    names none (not VGG16, or not this layout)."""
    group = _keras_weights_group(h5file)
    if group is None:
        return None
    names = set(_decoded(group.attrs["layer_names"]))
    for name in CONV_LAYERS:
        if name not in names or name not in group:
            continue
        weight_names = _decoded(group[name].attrs.get("weight_names", []))
        kernel = group[name].get(weight_names[0]) if weight_names else None
        shape = tuple(getattr(kernel, "shape", ()))
        filters = KERNEL_SHAPES[name][-1]
        is_th = shape[:1] == (filters,) and shape[2:] == (3, 3)
        return "th" if is_th and shape != KERNEL_SHAPES[name] else "tf"
    return None


def _named_tf_kernels(path):
    """Keras' own names say "th_dim_ordering_tf_kernels" for channels-first
    kernels that were not flipped (saved through TensorFlow)."""
    return "tf_kernels" in Path(path).name.lower()


def _matches_keras_tf(h5file, path):
    return _keras_kernel_layout(h5file) == "tf"


def _matches_keras_th(h5file, path):
    return _keras_kernel_layout(h5file) == "th" and not _named_tf_kernels(path)


def _matches_keras_th_tf_kernels(h5file, path):
    return _keras_kernel_layout(h5file) == "th" and _named_tf_kernels(path)


def _read_keras_applications(h5file, path, convert):
    group = _keras_weights_group(h5file)
    if group is None:
        raise WeightsError(
            f"{path}: no 'layer_names' attribute; not a Keras weights file"
        )
    layer_names = _decoded(group.attrs["layer_names"])
    layers = {}
    for name in CONV_LAYERS:
        if name not in layer_names or name not in group:
            raise WeightsError(
                f"{path}: missing layer {name} (it has {', '.join(layer_names)})"
            )
        kernel, bias = _read_layer_arrays(group[name], name, path)
        layers[name] = convert(kernel, bias, name, path)
    detail = "with the dense top (unused)" if "fc1" in layer_names else "no top"
    return layers, detail


def _read_layer_arrays(layer_group, name, path):
    """The kernel and bias a Keras layer group lists in ``weight_names``."""
    weight_names = _decoded(layer_group.attrs.get("weight_names", []))
    if len(weight_names) != 2:
        raise WeightsError(
            f"{path}: layer {name} lists {len(weight_names)} weights "
            f"({', '.join(weight_names) or 'none'}); expected a kernel and a bias"
        )
    return [
        _read_dataset(layer_group, weight_name, f"layer {name}", path)
        for weight_name in weight_names
    ]


def _read_keras_applications_tf(h5file, path):
    def convert(kernel, bias, name, path):
        return _checked_conv(kernel, bias, name, path, "TensorFlow")

    return _read_keras_applications(h5file, path, convert)


def _read_keras_applications_th(h5file, path):
    def convert(kernel, bias, name, path):
        return _channels_first_conv(kernel, bias, name, path, flipped=True)

    return _read_keras_applications(h5file, path, convert)


def _read_keras_applications_th_tf_kernels(h5file, path):
    def convert(kernel, bias, name, path):
        return _channels_first_conv(kernel, bias, name, path, flipped=False)

    return _read_keras_applications(h5file, path, convert)


def _published_keras(path):
    size = Path(path).stat().st_size
    if size not in KERAS_PUBLISHED_MD5.values():
        return ""
    if KERAS_PUBLISHED_MD5.get(file_digest(path, "md5")) == size:
        return ", the official Keras ImageNet weights (MD5 verified)"
    return ", not as Keras published it: its MD5 differs (damaged or modified)"


# -- The 2016 Caffe conversion, saved by Keras 1 (vgg16_weights.h5) ----------


def _matches_keras1(h5file, path):
    return "nb_layers" in h5file.attrs and "layer_0" in h5file


def _read_keras1(h5file, path):
    """Groups layer_0 ... layer_<nb_layers - 1> in network order; the ones with
    a 4-D ``param_0`` are the convolutions (Theano layout), zero padding and
    pooling have no parameters, the dense layers come after."""
    if "nb_layers" not in h5file.attrs:
        raise WeightsError(
            f"{path}: no nb_layers attribute; not a Keras 1 weights file"
        )
    count = int(h5file.attrs["nb_layers"])
    convolutions, dense = [], 0
    for index in range(count):
        group = h5file.get(f"layer_{index}")
        if group is None:
            raise WeightsError(
                f"{path}: nb_layers says {count} layers, but layer_{index} is missing"
            )
        kernel = group.get("param_0") if int(group.attrs.get("nb_params", 0)) else None
        if kernel is None:
            continue
        if len(kernel.shape) == 4:
            convolutions.append(f"layer_{index}")
        else:
            dense += 1
    if len(convolutions) != len(CONV_LAYERS):
        raise WeightsError(
            f"{path}: {len(convolutions)} convolution layers (layer_N groups with "
            f"a 4-D param_0); VGG16 has {len(CONV_LAYERS)}"
        )
    layers = {}
    for name, key in zip(CONV_LAYERS, convolutions, strict=True):
        kernel = _read_dataset(h5file[key], "param_0", key, path)
        bias = _read_dataset(h5file[key], "param_1", key, path)
        layers[name] = _channels_first_conv(kernel, bias, name, path, flipped=True)
    return layers, "with the dense top (unused)" if dense else "no top"


# -- Keras 3 save_weights (.weights.h5) --------------------------------------


def _keras3_layer_groups(h5file):
    """Layer name -> its ``vars`` group in a Keras 3 ``.weights.h5``.

    Keras 3 keeps each layer under ``layers/<class name>[_N]/vars`` and writes
    the layer's own name as the ``name`` attribute of ``vars``; where that is
    missing, the Conv2D groups are taken in their order, as Keras loads them.
    """
    layers = h5file.get("layers")
    if "vars" not in h5file or not hasattr(layers, "items"):
        return {}
    named, unnamed = {}, []
    for key, group in layers.items():
        variables = group.get("vars") if hasattr(group, "get") else None
        if variables is None:
            continue
        if "name" in variables.attrs:
            named[_decoded([variables.attrs["name"]])[0]] = variables
        elif re.fullmatch(r"conv2d(_\d+)?", key):
            order = int(key.rpartition("_")[2]) if "_" in key else 0
            unnamed.append((order, variables))
    if named:
        return named
    # Fewer than 13 leave the last layers out, for the reader to name.
    ordered = [group for _, group in sorted(unnamed, key=lambda item: item[0])]
    return dict(zip(CONV_LAYERS, ordered, strict=False))


def _matches_keras3(h5file, path):
    return bool(set(_keras3_layer_groups(h5file)) & set(CONV_LAYERS))


def _read_keras3(h5file, path):
    groups = _keras3_layer_groups(h5file)
    if not groups:
        raise WeightsError(
            f"{path}: no layers/<name>/vars groups; not a Keras 3 .weights.h5 file"
        )
    layers = {}
    for name in CONV_LAYERS:
        if name not in groups:
            raise WeightsError(
                f"{path}: missing layer {name} (it has {', '.join(groups)})"
            )
        kernel = _read_dataset(groups[name], "0", name, path)
        bias = _read_dataset(groups[name], "1", name, path)
        layers[name] = _checked_conv(kernel, bias, name, path, "Keras 3")
    return layers, "with the dense top (unused)" if "fc1" in groups else "no top"


# -- PyTorch / torchvision state dicts ----------------------------------------


def _torchvision_indices():
    """Index in torchvision's ``features`` of each convolution: each one is
    followed by a ReLU, and each block ends with a max pooling."""
    indices, index = {}, 0
    for name in LAYERS:
        if name in KERNEL_SHAPES:
            indices[name] = index
            index += 2
        else:
            index += 1
    return indices


TORCHVISION_INDICES = _torchvision_indices()


def _matches_torchvision(state, path):
    return isinstance(state, dict) and "features.0.weight" in state


def _read_torchvision(state, path):
    if any(key.endswith("running_mean") for key in state):
        raise WeightsError(
            f"{path}: VGG16 with batch normalisation (vgg16_bn); "
            "only the plain VGG16 is supported"
        )
    convolutions = [
        key
        for key in state
        if re.fullmatch(r"features\.\d+\.weight", key)
        and len(getattr(state[key], "shape", ())) == 4
    ]
    if len(convolutions) != len(CONV_LAYERS):
        raise WeightsError(
            f"{path}: {len(convolutions)} convolutions under features.*; "
            f"VGG16 has {len(CONV_LAYERS)}"
        )
    layers = {}
    for name, index in TORCHVISION_INDICES.items():
        kernel = _tensor(state, f"features.{index}.weight", path)
        bias = _tensor(state, f"features.{index}.bias", path)
        layers[name] = _channels_first_conv(kernel, bias, name, path, flipped=False)
    has_classifier = any(key.startswith("classifier.") for key in state)
    return layers, "with the classifier (unused)" if has_classifier else "features only"


def _tensor(state, key, path):
    import torch

    value = state.get(key)
    if value is None:
        raise WeightsError(f"{path}: missing {key}")
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise WeightsError(f"{path}: {key} is not a floating-point tensor")
    # A copy, so nothing keeps the memory-mapped file open.
    return np.array(value.detach().float().numpy(), dtype=np.float32)


def _published_torchvision(path):
    found = re.search(r"-([0-9a-f]{8,64})\.pth?$", Path(path).name)
    if found is None or found.group(1)[:8] not in TORCHVISION_PUBLISHED_PREFIXES:
        return ""
    if file_digest(path, "sha256").startswith(found.group(1)):
        return ", the official torchvision ImageNet weights (SHA-256 verified)"
    return (
        f", not as torchvision published it: its SHA-256 does not start with "
        f"{found.group(1)} as its name says (damaged or modified)"
    )


FORMATS = {
    "keras-tf": WeightsFormat(
        name="keras-tf",
        summary="Keras Applications VGG16, TensorFlow kernels",
        container="hdf5",
        matches=_matches_keras_tf,
        read=_read_keras_applications_tf,
        preprocessing=CAFFE_PREPROCESSING,
        published=_published_keras,
    ),
    "keras-th": WeightsFormat(
        name="keras-th",
        summary="Keras Applications VGG16, Theano kernels (flipped)",
        container="hdf5",
        matches=_matches_keras_th,
        read=_read_keras_applications_th,
        preprocessing=CAFFE_PREPROCESSING,
    ),
    "keras-th-tf-kernels": WeightsFormat(
        name="keras-th-tf-kernels",
        summary="Keras VGG16, channels-first TensorFlow kernels (not flipped)",
        container="hdf5",
        matches=_matches_keras_th_tf_kernels,
        read=_read_keras_applications_th_tf_kernels,
        preprocessing=CAFFE_PREPROCESSING,
    ),
    "caffe-keras1": WeightsFormat(
        name="caffe-keras1",
        summary="Caffe VGG16 converted for Keras 1 (vgg16_weights.h5 layout)",
        container="hdf5",
        matches=_matches_keras1,
        read=_read_keras1,
        preprocessing=CAFFE_PREPROCESSING,
    ),
    "keras3": WeightsFormat(
        name="keras3",
        summary="Keras 3 VGG16 weights (.weights.h5)",
        container="hdf5",
        matches=_matches_keras3,
        read=_read_keras3,
        preprocessing=CAFFE_PREPROCESSING,
    ),
    "torchvision": WeightsFormat(
        name="torchvision",
        summary="torchvision VGG16 state dict",
        container="torch",
        matches=_matches_torchvision,
        read=_read_torchvision,
        preprocessing=TORCHVISION_PREPROCESSING,
        published=_published_torchvision,
    ),
}
WEIGHTS_FORMATS = ("auto", *FORMATS)


# ---------------------------------------------------------------------------
# Detecting and loading
# ---------------------------------------------------------------------------

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"  # torch.save since PyTorch 1.6, and .keras files
# torch.save before PyTorch 1.6: a pickle (protocol 2) of its magic number.
_TORCH_LEGACY_SIGNATURE = b"\x80\x02\x8a\x0a"
_CONTAINER_WORDS = {"hdf5": "an HDF5 file", "torch": "a PyTorch file"}


def file_digest(path, algorithm):
    """Hex digest (``"md5"``, ``"sha256"``, ...) of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _checked_file(path):
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder; expected a VGG16 weights file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    return path


def _sniff_container(path):
    """What kind of container the file is, from its first bytes: "hdf5",
    "torch", "keras-archive" (a .keras model), "zip" (another zip) or None."""
    with open(path, "rb") as file:
        head = file.read(8)
    if head == _HDF5_SIGNATURE:
        return "hdf5"
    if head.startswith(_ZIP_SIGNATURE):
        return _zip_kind(path)
    if head.startswith(_TORCH_LEGACY_SIGNATURE):
        return "torch"
    # HDF5 allows a user block before the signature, at 512, 1024, 2048, ...
    import h5py

    return "hdf5" if h5py.is_hdf5(path) else None


def _zip_kind(path):
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        # Damaged: torch.load says what is wrong with it.
        return "keras-archive" if path.suffix.lower() == ".keras" else "torch"
    if any(name.endswith("data.pkl") for name in names):
        return "torch"
    return "keras-archive" if "model.weights.h5" in names else "zip"


def _unrecognised_container(path, container):
    if container == "keras-archive":
        return (
            f"{path}: a Keras model archive (.keras); give the weights saved with "
            "model.save_weights('vgg16.weights.h5') instead"
        )
    if container == "zip":
        return f"{path}: a zip archive, not a PyTorch file; expected VGG16 weights"
    return f"{path}: not an HDF5 file (nor a PyTorch one); expected VGG16 weights"


class _Opened:
    """Opens a weights file's container and turns open errors into WeightsError.

    The content is an ``h5py.File``, or for PyTorch files the ``name ->
    tensor`` dict (or whatever else the file holds)."""

    def __init__(self, path, container):
        self.path, self.container = path, container
        self._file = None

    def __enter__(self):
        if self.container == "torch":
            return _load_torch(self.path)
        import h5py

        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise WeightsError(f"{self.path}: {_hdf5_open_problem(exc)}") from exc
        return self._file

    def __exit__(self, *exc_info):
        if self._file is not None:
            self._file.close()


def _load_torch(path):
    """A PyTorch file's state dict, unpickled so that no code from it runs."""
    try:
        import torch
    except ImportError as exc:
        raise WeightsError(
            f"{path}: a PyTorch file; reading it needs the torch package"
        ) from exc

    with open(path, "rb") as file:
        # Memory-mapped where the format allows: nothing is read twice.
        mmap = file.read(4) == _ZIP_SIGNATURE
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch.load raises many kinds for a bad file
        raise WeightsError(f"{path}: {_torch_load_problem(exc)}") from exc
    return _state_dict(content)


def _torch_load_problem(exc):
    message = str(exc)
    if "weights_only" in message or "Weights only load failed" in message:
        found = re.search(r"GLOBAL (\S+)", message)
        what = f" ({found.group(1)})" if found else ""
        return (
            f"holds Python objects{what} that only unpickling with code execution "
            "could rebuild; it is read with torch.load(weights_only=True), so "
            "give a file of the model's state_dict() instead"
        )
    return f"damaged PyTorch file ({_first_line(exc)}); download it again"


def _state_dict(content):
    """The ``name -> tensor`` dict in a loaded PyTorch file, unwrapped from a
    training checkpoint (``{"state_dict": ...}``, ``{"model": ...}``) and from
    ``DataParallel``'s ``module.`` prefix; anything else unchanged."""
    if not isinstance(content, dict):
        return content
    for key in ("state_dict", "model"):
        if isinstance(content.get(key), dict):
            content = content[key]
            break
    keys = [key for key in content if isinstance(key, str)]
    if keys and all(key.startswith("module.") for key in keys):
        return {key.removeprefix("module."): content[key] for key in keys}
    return dict(content)


def _hdf5_open_problem(exc):
    message = str(exc)
    truncated = re.search(r"eof = (\d+).*stored_eof = (\d+)", message)
    if truncated:
        found, expected = (int(group) for group in truncated.groups())
        return (
            f"truncated HDF5 file ({found:,} of {expected:,} bytes); download it again"
        )
    return f"damaged HDF5 file ({_first_line(exc)})"


def _first_line(exc):
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _shown(names, count=6):
    names = [str(name) for name in names]
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _describe_unrecognised(content, container):
    if container == "torch":
        if isinstance(content, dict):
            return (
                f"a PyTorch file of another network (keys {_shown(content)}), not VGG16"
            )
        return f"a PyTorch file holding a {type(content).__name__}, not a state dict"
    group = _keras_weights_group(content)
    if group is not None:
        names = _decoded(group.attrs["layer_names"])
        return (
            f"a Keras weights file of another network (layers {_shown(names)}), "
            "not VGG16"
        )
    return (
        "an HDF5 file in no known VGG16 layout "
        f"(top-level entries: {_shown(sorted(content.keys())) or 'none'})"
    )


def detect_format(path):
    """The :data:`FORMATS` key for the file at ``path``, decided by its content."""
    path = _checked_file(path)
    container = _sniff_container(path)
    if container not in _CONTAINER_WORDS:
        raise WeightsError(_unrecognised_container(path, container))
    with _Opened(path, container) as content:
        for weights_format in FORMATS.values():
            if weights_format.container == container and weights_format.matches(
                content, path
            ):
                return weights_format.name
        raise WeightsError(f"{path}: {_describe_unrecognised(content, container)}")


def load_weights(path, weights_format="auto"):
    """Read the 13 convolution layers of a VGG16 file into a :class:`VGG16Weights`.

    ``weights_format`` is ``"auto"`` (decide by content) or a :data:`FORMATS`
    key, which skips detection. Every problem is a one-line :class:`WeightsError`
    naming the file. A file whose checksum matches a published one is named as
    such in the description (hashing it takes about a second per 500 MB).

    Notes
    -----
    A Keras 3 ``.weights.h5`` holds no preprocessing: it is given Caffe's, like
    every Keras VGG16. One saved from a model built on torchvision weights would
    need torchvision's; load the ``.pth`` itself instead.
    """
    if weights_format not in WEIGHTS_FORMATS:
        raise ValueError(
            f"unknown weights format {weights_format!r}; "
            f"valid: {', '.join(WEIGHTS_FORMATS)}"
        )
    path = _checked_file(path)
    if weights_format == "auto":
        weights_format = detect_format(path)
    chosen = FORMATS[weights_format]

    container = _sniff_container(path)
    if container != chosen.container:
        raise WeightsError(
            f"{path}: not {_CONTAINER_WORDS[chosen.container]}, "
            f"so not in the {chosen.name} format"
        )
    with _Opened(path, container) as content:
        if container == "torch" and not isinstance(content, dict):
            raise WeightsError(f"{path}: {_describe_unrecognised(content, container)}")
        layers, detail = chosen.read(content, path)
    published = chosen.published(path) if chosen.published else ""
    return VGG16Weights(
        path=path,
        format=chosen.name,
        description=f"{chosen.summary}, {detail}{published} ({path.name})",
        layers=layers,
        preprocessing=chosen.preprocessing,
    )


class NoWeightsFound(WeightsError):
    """A folder holds no usable VGG16 weights file."""


def find_weights(weights_root=DEFAULT_WEIGHTS_ROOT):
    """The weights file to use: ``weights_root`` itself, or the best in that folder.

    In a folder, the names in :data:`PREFERRED_FILES` are tried in that order
    (taken as found; a damaged one is reported when loaded, not skipped), then
    any other file ending in one of :data:`CANDIDATE_SUFFIXES`, by name, whose
    content is VGG16 in a known format. :class:`NoWeightsFound` when there is
    none.
    """
    root = Path(weights_root)
    if root.is_file():
        return root
    if not root.is_dir():
        raise WeightsError(f"{root}: no such weights file or folder")

    for name in PREFERRED_FILES:
        if (root / name).is_file():
            return root / name
    skipped = []
    for candidate in sorted(root.iterdir()):
        if candidate.is_file() and candidate.name.lower().endswith(CANDIDATE_SUFFIXES):
            try:
                detect_format(candidate)
            except (WeightsError, OSError) as error:
                skipped.append(_first_line(error))
                continue
            return candidate
    # Say why each candidate was passed over: a damaged download is the usual one.
    why = f" (skipped {'; '.join(skipped)})" if skipped else ""
    raise NoWeightsFound(
        f"no VGG16 weights in {root}{why}: looked for {', '.join(PREFERRED_FILES)}, "
        f"then any {'/'.join(CANDIDATE_SUFFIXES)} file holding VGG16; download "
        f"{KERAS_NOTOP_URL} ({KERAS_NOTOP_SIZE:,} bytes) or {KERAS_FULL_URL} "
        f"({KERAS_FULL_SIZE:,} bytes) into that folder, or give the path of a "
        "weights file"
    )
