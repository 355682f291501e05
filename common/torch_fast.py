"""The VGG16 feature model on PyTorch, run in channels-last memory.

Keras 3's torch convolution takes ``(batch, height, width, channels)`` tensors and,
on every call, permutes them to channels-first, copies them to contiguous memory,
copies them again to PyTorch's channels-last memory format (the fast one for
oneDNN on a CPU and for cuDNN's tensor cores), and the backward pass copies the
gradients back the same way. Through VGG16 at 512x512 those copies took about a
third of the time of a forward and backward pass.

:class:`ChannelsLastFeatures` is the model :func:`common.vgg16.build_feature_model`
returns on the torch backend. It is the same Keras functional model, with the same
layers and variables; only its call runs the layers with ``torch.nn.functional``
on one tensor that stays in channels-last memory from the first convolution to
the last. Every kernel and bias is read from its Keras variable at each call, so
there is no second copy of the weights that could drift from the model's.
tests/test_torch_fast.py checks that both paths give the same features and the
same gradients with respect to the image.

Import this module only once Keras runs on the torch backend.
"""

import weakref

import keras
import torch
import torch.nn.functional as functional


@keras.saving.register_keras_serializable(package="common.torch_fast")
class ChannelsLastFeatures(keras.Model):
    """A functional VGG16 feature model whose calls skip Keras's layout copies.

    Built like any functional model, ``ChannelsLastFeatures(inputs, outputs)``,
    from a chain of the layers ``build_feature_model`` makes: its preprocessing
    layer, 'same' convolutions with ReLU, and 2x2 poolings of stride 2. Calling
    it takes and returns what the plain Keras model does (see :func:`features`).
    """

    def call(self, inputs, training=None, mask=None):
        return features(self, inputs)


def features(model, pixels):
    """Run ``model``'s layers in channels-last memory; return its output dict.

    ``pixels: float32 (batch, height, width, 3), RGB, 0..255``, a tensor or an
    array. Returns ``layer name -> float32 (batch, h, w, channels)`` torch
    tensors for the names in ``model.output``, as the Keras path does.
    """
    # The first layer after the input is the preprocessing, run as Keras defines it.
    preprocessing, *layers = (
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    )
    pixels = keras.ops.convert_to_tensor(pixels, dtype="float32")
    # (batch, channels, height, width), kept in channels-last memory throughout.
    x = preprocessing(pixels).permute(0, 3, 1, 2)
    x = x.contiguous(memory_format=torch.channels_last)
    outputs = {}
    for layer in layers:
        x = _run_layer(layer, x)
        if layer.name in model.output:
            # A view, (batch, h, w, channels) and contiguous in that order.
            outputs[layer.name] = x.permute(0, 2, 3, 1)
    return {name: outputs[name] for name in model.output}


def _run_layer(layer, x):
    if isinstance(layer, keras.layers.Conv2D):
        return _convolution(layer, x)
    if isinstance(layer, keras.layers.MaxPooling2D):
        return functional.max_pool2d(x, layer.pool_size, layer.strides)
    if isinstance(layer, keras.layers.AveragePooling2D):
        return functional.avg_pool2d(x, layer.pool_size, layer.strides)
    raise TypeError(f"the channels-last path cannot run layer {layer.name!r}")


def _convolution(layer, x):
    height, width = layer.kernel_size
    if not (
        layer.padding == "same"
        and layer.strides == (1, 1)
        and layer.dilation_rate == (1, 1)
        and height % 2 == 1
        and width % 2 == 1
        and layer.activation is keras.activations.relu
    ):
        raise TypeError(
            f"the channels-last path runs only odd 'same' convolutions of stride 1 "
            f"with ReLU; {layer.name!r} is not one"
        )
    x = functional.conv2d(
        x, _kernel(layer), layer.bias.value, padding=(height // 2, width // 2)
    )
    return functional.relu(x)


# Each convolution's kernel in PyTorch's layout, converted again only when its
# variable changes; converting all 13 at each call took as long as a forward
# pass through VGG16 at 64x64 on a 2-core CPU.
_KERNELS = weakref.WeakKeyDictionary()  # layer -> (variable tensor, version, kernel)


def _kernel(layer):
    """``layer``'s kernel as float32 (out, in, height, width), channels-last memory."""
    variable = layer.kernel.value
    if variable.requires_grad:  # a weight gradient must flow through the layout
        return _pytorch_layout(variable)
    cached = _KERNELS.get(layer)
    # PyTorch counts every in-place write to a tensor, Keras's assign included.
    if cached is None or cached[0] is not variable or cached[1] != variable._version:
        cached = (variable, variable._version, _pytorch_layout(variable))
        _KERNELS[layer] = cached
    return cached[2]


def _pytorch_layout(kernel):
    # Keras keeps kernels as (height, width, in, out); PyTorch wants
    # (out, in, height, width), here in channels-last memory like the input.
    return kernel.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
