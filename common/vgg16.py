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
    model = keras.Model(
        pixels, {name: outputs[name] for name in output_layers}, name="vgg16_features"
    )

    if weights is not None:
        for name in LAYERS[: last + 1]:
            if name in KERNEL_SHAPES:
                model.get_layer(name).set_weights(list(weights.layers[name]))
    model.trainable = False
    return model


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


@dataclass(frozen=True)
class WeightsFormat:
    """One kind of VGG16 file: how to recognise it, read it, and feed it.

    ``container`` is what :func:`_sniff_container` finds ("hdf5", ...).
    ``matches(content, path)`` looks at the opened content (and, only to break
    a tie content cannot, the name). ``read(content, path)`` returns
    ``(layers, detail)``: the :class:`VGG16Weights` ``layers`` dict and a few
    words for the description, e.g. "no top".
    """

    name: str
    summary: str
    container: str
    matches: object  # (content, path) -> bool
    read: object  # (content, path) -> (layers, detail)
    preprocessing: Preprocessing


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


def _matches_keras_applications(h5file, path):
    group = _keras_weights_group(h5file)
    if group is None:
        return False
    return bool(set(_decoded(group.attrs["layer_names"])) & set(CONV_LAYERS))


def _read_keras_applications_tf(h5file, path):
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
        layers[name] = _checked_conv(kernel, bias, name, path, "TensorFlow")
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
    arrays = []
    for weight_name in weight_names:
        dataset = layer_group.get(weight_name)
        if dataset is None:
            raise WeightsError(f"{path}: layer {name} has no dataset {weight_name!r}")
        try:
            arrays.append(np.asarray(dataset[()], dtype=np.float32))
        except (OSError, ValueError, TypeError) as exc:
            raise WeightsError(
                f"{path}: cannot read {name}/{weight_name}: {_first_line(exc)}"
            ) from exc
    return arrays


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


FORMATS = {
    "keras-tf": WeightsFormat(
        name="keras-tf",
        summary="Keras Applications VGG16, TensorFlow kernels",
        container="hdf5",
        matches=_matches_keras_applications,
        read=_read_keras_applications_tf,
        preprocessing=CAFFE_PREPROCESSING,
    ),
}
WEIGHTS_FORMATS = ("auto", *FORMATS)


# ---------------------------------------------------------------------------
# Detecting and loading
# ---------------------------------------------------------------------------

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _checked_file(path):
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder; expected a VGG16 weights file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    return path


def _sniff_container(path):
    """What kind of container the file is, from its first bytes, or None."""
    with open(path, "rb") as file:
        head = file.read(8)
    # HDF5 allows a user block before the signature, at 512, 1024, 2048, ...
    if head == _HDF5_SIGNATURE:
        return "hdf5"
    import h5py

    return "hdf5" if h5py.is_hdf5(path) else None


class _Opened:
    """Opens a weights file's container and turns open errors into WeightsError."""

    def __init__(self, path, container):
        self.path, self.container = path, container

    def __enter__(self):
        import h5py

        try:
            self.content = h5py.File(self.path, "r")
        except OSError as exc:
            raise WeightsError(f"{self.path}: {_hdf5_open_problem(exc)}") from exc
        return self.content

    def __exit__(self, *exc_info):
        self.content.close()


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


def _describe_unrecognised(content):
    group = _keras_weights_group(content)
    if group is not None:
        names = _decoded(group.attrs["layer_names"])
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        return f"a Keras weights file of another network (layers {shown}), not VGG16"
    entries = sorted(content.keys())
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    return (
        f"an HDF5 file in no known VGG16 layout (top-level entries: {shown or 'none'})"
    )


def detect_format(path):
    """The :data:`FORMATS` key for the file at ``path``, decided by its content."""
    path = _checked_file(path)
    container = _sniff_container(path)
    if container is None:
        raise WeightsError(f"{path}: not an HDF5 file; expected VGG16 weights")
    with _Opened(path, container) as content:
        for weights_format in FORMATS.values():
            if weights_format.container == container and weights_format.matches(
                content, path
            ):
                return weights_format.name
        raise WeightsError(f"{path}: {_describe_unrecognised(content)}")


def load_weights(path, weights_format="auto"):
    """Read the 13 convolution layers of a VGG16 file into a :class:`VGG16Weights`.

    ``weights_format`` is ``"auto"`` (decide by content) or a :data:`FORMATS`
    key, which skips detection. Every problem is a one-line :class:`WeightsError`
    naming the file.
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
            f"{path}: not an {chosen.container.upper()} file, "
            f"so not in the {chosen.name} format"
        )
    with _Opened(path, container) as content:
        layers, detail = chosen.read(content, path)
    return VGG16Weights(
        path=path,
        format=chosen.name,
        description=f"{chosen.summary}, {detail} ({path.name})",
        layers=layers,
        preprocessing=chosen.preprocessing,
    )


def find_weights(weights_root=DEFAULT_WEIGHTS_ROOT):
    """The weights file to use: ``weights_root`` itself, or the best in that folder.

    In a folder, the names in :data:`PREFERRED_FILES` are tried in that order
    (taken as found; a damaged one is reported when loaded, not skipped), then
    any other file ending in one of :data:`CANDIDATE_SUFFIXES`, by name, whose
    content is VGG16 in a known format.
    """
    root = Path(weights_root)
    if root.is_file():
        return root
    if not root.is_dir():
        raise WeightsError(f"{root}: no such weights file or folder")

    for name in PREFERRED_FILES:
        if (root / name).is_file():
            return root / name
    for candidate in sorted(root.iterdir()):
        if candidate.is_file() and candidate.name.lower().endswith(CANDIDATE_SUFFIXES):
            try:
                detect_format(candidate)
            except (WeightsError, OSError):
                continue
            return candidate
    raise WeightsError(
        f"no VGG16 weights in {root}: looked for {', '.join(PREFERRED_FILES)}, "
        f"then any {'/'.join(CANDIDATE_SUFFIXES)} file holding VGG16; download "
        f"{KERAS_NOTOP_URL} (58,889,256 bytes) or {KERAS_FULL_URL} "
        "(553,467,096 bytes) into that folder, or give the path of a weights file"
    )
