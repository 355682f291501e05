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


# --- Adam in one kernel ---------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_fused_adam_takes_the_same_steps_as_keras_adam(schedule):
    import keras
    import torch

    from common import torch_fast

    rng = np.random.default_rng(0)
    shapes = [(30, 20), (20,), (20, 3)]
    start = [rng.standard_normal(shape).astype("float32") for shape in shapes]

    def adam_and_variables():
        variables = [keras.Variable(value) for value in start]
        learning_rate = 3e-3
        if schedule == "cosine":
            learning_rate = keras.optimizers.schedules.CosineDecay(
                1e-3, 50, warmup_target=1e-2, warmup_steps=3, alpha=0.01
            )
        optimizer = keras.optimizers.Adam(learning_rate)
        optimizer.build(variables)
        return optimizer, variables

    keras_adam, expected = adam_and_variables()
    fused_adam, actual = adam_and_variables()
    torch_fast.fuse_adam(fused_adam)
    for step in range(8):
        # A zero gradient on one step, where epsilon's placement matters most.
        scale = 0.0 if step == 2 else 1.0
        grads = [
            scale * rng.standard_normal(shape).astype("float32") for shape in shapes
        ]
        keras_adam.apply([torch.from_numpy(grad) for grad in grads], expected)
        fused_adam.apply([torch.from_numpy(grad) for grad in grads], actual)

    for want, got, first in zip(expected, actual, start, strict=True):
        want, got = backend.to_numpy(want.value), backend.to_numpy(got.value)
        assert np.abs(want - first).max() > 1e-3
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert int(fused_adam.iterations) == 8


def test_fused_adam_refuses_amsgrad():
    import keras

    from common import torch_fast

    with pytest.raises(ValueError, match="does not do AMSGrad"):
        torch_fast.fuse_adam(keras.optimizers.Adam(amsgrad=True))


# --- layers called directly -----------------------------------------------------


@pytest.mark.parametrize("model_name", ["cnn", "custom_mlp:1,16,0.2,0.5"])
def test_direct_layer_calls_give_what_keras_gives(model_name):
    import keras

    import mnist

    model = mnist.build_model(mnist.parse_model_spec(model_name))
    assert "call" in vars(model)  # build_model made the calls direct on torch
    keras_model = keras.Model(model.input, model.output)
    digits = np.random.default_rng(0).uniform(0, 1, (4, 28, 28, 1)).astype("float32")

    direct = backend.to_numpy(model(digits, training=False))
    np.testing.assert_allclose(direct, backend.to_numpy(keras_model(digits)), atol=1e-6)
    assert direct.shape == (4, 10)
    # Training mode reaches the dropout layers.
    assert not np.allclose(backend.to_numpy(model(digits, training=True)), direct)


def test_direct_layer_calls_need_one_chain():
    import keras

    from common import torch_fast

    inputs = keras.Input((4,))
    left, right = keras.layers.Dense(2)(inputs), keras.layers.Dense(2)(inputs)
    model = keras.Model(inputs, keras.layers.Add()([left, right]))
    with pytest.raises(ValueError, match="needs one chain of layers"):
        torch_fast.call_layers_directly(model)


# --- the training step ----------------------------------------------------------


def mnist_model(name):
    import mnist

    return lambda: mnist.build_model(mnist.parse_model_spec(name))


def twin_models(build, **compile_options):
    """Two compiled copies of ``build()`` with the same weights: Keras's training
    step on the first, the lean one on the second."""
    import keras

    from common import torch_fast

    models = []
    for _ in range(2):
        backend.seed_everything(3)
        model = build()
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss="sparse_categorical_crossentropy",
            **compile_options,
        )
        models.append(model)
    torch_fast.lean_train_step(models[1])
    assert "train_step" not in vars(models[0]) and "train_step" in vars(models[1])
    return models


def train_both(models, steps, sample_weight=None):
    """Run ``steps`` training steps on each model from the same random state."""
    rng = np.random.default_rng(0)
    batches = [
        (
            rng.uniform(0, 1, (8, 28, 28, 1)).astype("float32"),
            rng.integers(0, 10, 8),
        )
        for _ in range(steps)
    ]
    logs = []
    for model in models:
        backend.seed_everything(7)  # the same dropout masks for both
        for images, labels in batches:
            data = (backend.to_device(images), backend.to_device(labels))
            if sample_weight is not None:
                data += (backend.to_device(sample_weight),)
            result = model.train_step(data)
        logs.append({name: float(value) for name, value in result.items()})
    return logs


def assert_same_weights(models):
    keras_model, lean_model = models
    for want, got in zip(keras_model.weights, lean_model.weights, strict=True):
        np.testing.assert_allclose(
            backend.to_numpy(got.value), backend.to_numpy(want.value), atol=1e-6
        )


def test_lean_train_step_takes_the_same_steps_as_keras():
    models = twin_models(mnist_model("custom_mlp:2,32,0.2,0.5"), metrics=["accuracy"])
    first = [backend.to_numpy(w.value).copy() for w in models[0].weights]
    keras_logs, lean_logs = train_both(models, steps=4)

    assert keras_logs.keys() == lean_logs.keys() == {"loss", "accuracy"}
    for name in keras_logs:
        assert lean_logs[name] == pytest.approx(keras_logs[name], abs=1e-6)
    assert_same_weights(models)
    moved = [
        np.abs(backend.to_numpy(w.value) - start).max()
        for w, start in zip(models[1].weights, first, strict=True)
    ]
    assert min(moved) > 1e-4  # every weight was trained
    assert int(models[1].optimizer.iterations) == 4


def test_lean_train_step_with_sample_weights_and_regularizers():
    import keras

    from common import torch_fast

    def regularized():
        digits = keras.Input((28, 28, 1))
        x = keras.layers.Flatten()(digits)
        x = keras.layers.Dense(16, "relu", kernel_regularizer="l2")(x)
        x = keras.layers.Dense(10, "softmax", activity_regularizer="l2")(x)
        return keras.Model(digits, x)

    models = twin_models(regularized)
    assert torch_fast._batch_mean_loss(models[1]) is None  # Keras's compute_loss
    weights = np.linspace(0.5, 2.0, 8).astype("float32")
    keras_logs, lean_logs = train_both(models, steps=3, sample_weight=weights)
    assert lean_logs["loss"] == pytest.approx(keras_logs["loss"], abs=1e-6)
    assert_same_weights(models)


def test_lean_train_step_trains_through_fit():
    models = twin_models(mnist_model("cnn"))
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (40, 28, 28, 1)).astype("float32")
    labels = rng.integers(0, 10, 40)
    losses = []
    for model in models:
        backend.seed_everything(11)
        history = model.fit(images, labels, batch_size=16, epochs=2, verbose=0)
        losses.append(history.history["loss"])
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5)
    assert_same_weights(models)


# --- the learning-rate schedule -------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"warmup_target": 1e-2, "warmup_steps": 7, "alpha": 0.01},
        {"alpha": 0.1},  # no warm-up: decays from the initial rate
        {"warmup_target": 1e-2, "warmup_steps": 0},
    ],
)
def test_cosine_decay_in_torch_gives_the_schedules_rates(options):
    import keras

    from common import torch_fast

    schedule = keras.optimizers.schedules.CosineDecay(1e-3, 20, **options)
    optimizer = keras.optimizers.Adam(schedule)
    optimizer.build([keras.Variable(np.zeros(3, "float32"))])
    torch_fast.cosine_decay_in_torch(optimizer)
    rates = []
    for step in range(35):  # warm-up, decay and past the end
        optimizer.iterations.assign(step)
        rate = float(optimizer.learning_rate)
        assert rate == pytest.approx(float(schedule(step)), rel=1e-6, abs=1e-12)
        rates.append(rate)
    assert len(set(rates)) > 20  # the rate really changes along the way
    assert optimizer.get_config()["learning_rate"]["class_name"] == "CosineDecay"


def test_cosine_decay_in_torch_needs_cosine_decay():
    import keras

    from common import torch_fast

    with pytest.raises(TypeError, match="needs a CosineDecay schedule"):
        torch_fast.cosine_decay_in_torch(keras.optimizers.Adam(1e-3))
