"""The channels-last PyTorch path of the VGG16 feature model (common/torch_fast.py).

It must give what the plain Keras path gives, features and gradients with respect
to the image alike, from the same variables.
"""

import numpy as np
import pytest
from PIL import Image

from common import backend, vgg16

LAYERS = ("block1_conv2", "block3_conv1", "block5_conv3")
# Odd sides, so the poolings drop a row and a column on the way down.
SIZE = (37, 45)


@pytest.fixture(autouse=True)
def torch_only(backend_name):
    if backend_name != "torch":
        pytest.skip("the channels-last path is for the torch backend")


@pytest.fixture(scope="module")
def hed_weights(shared_dir):
    return vgg16.load_weights(shared_dir / "weights" / "vgg16_hed_bsds500_notop.h5")


@pytest.fixture(scope="module")
def cat(shared_dir):
    """The real cat photo: float32 (1, 37, 45, 3), RGB, 0..255."""
    with Image.open(shared_dir / "images" / "chelsea_cat.png") as image:
        image = image.convert("RGB").resize(SIZE[::-1], Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.float32)[None]


def keras_path(model):
    """A plain Keras functional model over the very same layers and variables."""
    import keras

    return keras.Model(model.input, model.output)


def features_and_gradient(model, pixels):
    """Each output as NumPy, and the gradient of a loss mixing them, to the image."""
    import keras
    import torch

    image = backend.to_device(pixels).requires_grad_(True)
    features = model(image)
    loss = sum(
        keras.ops.mean(keras.ops.square(value)) / (index + 1)
        for index, value in enumerate(features.values())
    )
    (grad,) = torch.autograd.grad(loss, image)
    return {name: backend.to_numpy(value) for name, value in features.items()}, (
        backend.to_numpy(grad)
    )


@pytest.mark.parametrize("pooling", vgg16.POOLINGS)
def test_same_features_and_gradients_as_keras(hed_weights, cat, pooling):
    from common import torch_fast

    model = vgg16.build_feature_model(hed_weights, LAYERS, pooling=pooling)
    assert isinstance(model, torch_fast.ChannelsLastFeatures)

    fast, fast_grad = features_and_gradient(model, cat)
    slow, slow_grad = features_and_gradient(keras_path(model), cat)
    assert list(fast) == list(slow) == list(LAYERS)
    for name in LAYERS:
        assert fast[name].shape == slow[name].shape, name
        assert np.abs(slow[name]).max() > 0, name
        np.testing.assert_allclose(
            fast[name], slow[name], rtol=0, atol=1e-5 * np.abs(slow[name]).max()
        )
    assert fast_grad.shape == cat.shape and np.abs(slow_grad).max() > 0
    np.testing.assert_allclose(
        fast_grad, slow_grad, rtol=0, atol=1e-5 * np.abs(slow_grad).max()
    )


def test_outputs_are_contiguous_channels_last_views(hed_weights, cat):
    outputs = vgg16.build_feature_model(hed_weights, LAYERS)(cat)
    assert tuple(outputs["block5_conv3"].shape) == (1, 2, 2, 512)
    assert all(value.is_contiguous() for value in outputs.values())


def test_reads_the_keras_variables_at_each_call(cat):
    model = vgg16.build_feature_model(None, ["block2_conv1"])
    before = backend.to_numpy(model(cat)["block2_conv1"])
    layer = model.get_layer("block1_conv2")
    layer.kernel.assign(layer.kernel.numpy() * 2.0)
    after = backend.to_numpy(model(cat)["block2_conv1"])
    expected = backend.to_numpy(keras_path(model)(cat)["block2_conv1"])

    assert not np.allclose(after, before)
    np.testing.assert_allclose(after, expected, rtol=0, atol=1e-5 * np.abs(after).max())


def test_weight_gradients_when_made_trainable(cat):
    import keras
    import torch

    model = vgg16.build_feature_model(None, ["block1_conv2"])
    model(cat)  # a frozen call first, which keeps kernels in PyTorch's layout
    model.trainable = True
    kernel = model.get_layer("block1_conv1").kernel.value
    gradients = []
    for path in (model, keras_path(model)):
        loss = keras.ops.mean(keras.ops.square(path(cat)["block1_conv2"]))
        (gradient,) = torch.autograd.grad(loss, kernel)
        gradients.append(backend.to_numpy(gradient))
    fast, slow = gradients
    assert np.abs(slow).max() > 0
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-5 * np.abs(slow).max())


def test_refuses_layers_it_cannot_run():
    import keras

    from common import torch_fast

    pixels = keras.Input((None, None, 3))
    x = vgg16.preprocessing_layer(vgg16.CAFFE_PREPROCESSING)(pixels)
    strided = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="strided")
    model = torch_fast.ChannelsLastFeatures(pixels, {"strided": strided(x)})
    with pytest.raises(TypeError, match="'strided' is not one"):
        model(np.zeros((1, 8, 8, 3), "float32"))

    dense = keras.layers.Dense(4, name="dense")
    model = torch_fast.ChannelsLastFeatures(pixels, {"dense": dense(x)})
    with pytest.raises(TypeError, match="cannot run layer 'dense'"):
        model(np.zeros((1, 8, 8, 3), "float32"))
