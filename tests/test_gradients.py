"""Loss and gradient with respect to the image on the device (common/backend.py)."""

import numpy as np
import pytest

from common import backend, vgg16

LAYERS = ("block1_conv2", "block2_conv1")
SHAPE = (1, 12, 10, 3)


@pytest.fixture(scope="module")
def model(shared_dir):
    weights = vgg16.load_weights(shared_dir / "weights" / "vgg16_hed_bsds500_notop.h5")
    return vgg16.build_feature_model(weights, LAYERS)


@pytest.fixture(scope="module")
def loss_fn(model):
    import keras

    def loss(image):
        features = model(image)
        deep = keras.ops.mean(keras.ops.square(features["block2_conv1"]))
        shallow = keras.ops.mean(features["block1_conv2"])
        return deep / 1000.0 + shallow

    return loss


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).uniform(0, 255, SHAPE).astype("float32")


def loss_on_host(loss_fn, image):
    return float(backend.to_numpy(loss_fn(backend.to_device(image))))


@pytest.mark.parametrize("pass_variables", [False, True])
def test_gradient_matches_finite_differences(model, loss_fn, image, pass_variables):
    variables = model.variables if pass_variables else None
    step = backend.image_gradient_fn(loss_fn, variables=variables)
    loss, grad = step(backend.to_device(image))
    grad = backend.to_numpy(grad)
    assert grad.shape == SHAPE and np.abs(grad).max() > 0
    assert float(backend.to_numpy(loss)) == pytest.approx(loss_on_host(loss_fn, image))

    rng = np.random.default_rng(1)
    for _ in range(3):
        direction = rng.standard_normal(SHAPE).astype("float32")
        direction /= np.linalg.norm(direction)
        step_size = 0.5  # grey levels
        plus = loss_on_host(loss_fn, image + step_size * direction)
        minus = loss_on_host(loss_fn, image - step_size * direction)
        numeric = (plus - minus) / (2 * step_size)
        analytic = float(np.sum(grad.astype("float64") * direction))
        assert analytic == pytest.approx(numeric, rel=2e-2)


def test_no_weight_gets_a_gradient(model, loss_fn, image, backend_name):
    before = [backend.to_numpy(variable.value) for variable in model.variables]
    step = backend.image_gradient_fn(loss_fn, variables=model.variables)
    step(backend.to_device(image))

    for variable, value in zip(model.variables, before, strict=True):
        np.testing.assert_array_equal(backend.to_numpy(variable.value), value)
    if backend_name == "torch":
        for variable in model.variables:
            assert variable.value.grad is None, variable.path
            assert not variable.value.requires_grad, variable.path


def test_gradient_is_only_for_the_image_and_stays_on_the_device(loss_fn, image):
    import keras

    loss, grad = backend.image_gradient_fn(loss_fn)(backend.to_device(image))
    assert keras.ops.is_tensor(loss) and keras.ops.is_tensor(grad)
    assert tuple(keras.ops.shape(loss)) == ()
    assert tuple(keras.ops.shape(grad)) == SHAPE


def test_host_variant_agrees_with_the_device(loss_fn, image):
    loss, grad = backend.image_gradient_fn(loss_fn)(backend.to_device(image))
    value_and_grad = backend.host_value_and_grad(loss_fn, SHAPE)
    host_loss, host_grad = value_and_grad(image.astype("float64").ravel())

    assert isinstance(host_loss, float)
    assert host_grad.dtype == np.float64 and host_grad.shape == (image.size,)
    assert host_loss == pytest.approx(float(backend.to_numpy(loss)), rel=1e-6)
    np.testing.assert_allclose(
        host_grad.reshape(SHAPE), backend.to_numpy(grad), rtol=1e-5, atol=1e-7
    )


def test_nan_image_stops_the_step(loss_fn, image):
    poisoned = image.copy()
    poisoned[0, 3, 4, 1] = np.nan
    step = backend.image_gradient_fn(loss_fn)
    with pytest.raises(backend.NonFiniteError, match="the loss is nan"):
        step(backend.to_device(poisoned))


def test_infinite_gradient_with_a_finite_loss_is_caught():
    import keras

    def loss(image):  # sqrt has an infinite slope at 0
        return keras.ops.sum(keras.ops.sqrt(image))

    image = np.full((1, 2, 2, 3), 4.0, "float32")
    image[0, 0, 0, 0] = 0.0
    with pytest.raises(
        backend.NonFiniteError, match=r"gradient .* holds NaN or infinity \(loss 22\)"
    ):
        backend.image_gradient_fn(loss)(backend.to_device(image))


def test_check_can_be_turned_off():
    import keras

    def loss(image):
        return keras.ops.sum(image)

    image = np.full((1, 2, 2, 3), np.nan, "float32")
    value, _ = backend.image_gradient_fn(loss, check_finite=False)(
        backend.to_device(image)
    )
    assert np.isnan(backend.to_numpy(value))


# --- out of memory ------------------------------------------------------------


class XlaRuntimeError(RuntimeError):
    """Stands in for JAX's error class, which is matched by its message."""


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError, matched by its name."""


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        OutOfMemoryError("CUDA error: tried to allocate 2.00 GiB"),
        RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"),
        XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1234 bytes."),
    ],
)
def test_out_of_memory_becomes_one_line_with_a_hint(error):
    with pytest.raises(backend.DeviceMemoryError) as info:
        with backend.out_of_memory_hint(
            "at 2048x1536", "try a smaller --max_size or --tile_size"
        ):
            raise error
    message = str(info.value)
    assert message.startswith("out of memory on ")
    assert message.endswith(" at 2048x1536; try a smaller --max_size or --tile_size")
    assert "\n" not in message
    assert info.value.__cause__ is error


def test_other_errors_pass_through():
    with pytest.raises(ValueError, match="not memory"):
        with backend.out_of_memory_hint("at 4x4"):
            raise ValueError("not memory")
    assert backend.oom_message(ValueError("not memory")) is None


def test_memory_message_names_the_device(backend_name):
    message = backend.oom_message(MemoryError(), "at 8x8")
    expected = "cpu" if backend_name == "torch" else "cpu:0"
    assert message == f"out of memory on {expected} at 8x8; try a smaller --max_size"
