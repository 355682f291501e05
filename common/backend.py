"""Backend choice before Keras loads, the device report, and seeding.

Keras fixes its backend when it is first imported and, on that first import,
writes a ``keras.json`` naming TensorFlow. So the scripts call
:func:`select_backend` before anything imports Keras; only the functions below
that need Keras import it, and only after the choice is settled.

The precedence is: ``--backend``, else ``KERAS_BACKEND``, else ``keras.json`` if
it names torch or jax, else torch.
"""

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("torch", "jax")
DEFAULT_BACKEND = "torch"
DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class BackendChoice:
    """The backend the process will use and what decided it."""

    name: str
    source: str  # "--backend", "KERAS_BACKEND", the keras.json path, or "default"
    notes: tuple = ()


def keras_config_path(environ=None):
    """Where Keras reads ``keras.json``: ``$KERAS_HOME`` or ``~/.keras``."""
    environ = os.environ if environ is None else environ
    home = environ.get("KERAS_HOME")
    if home:
        return Path(home) / "keras.json"
    return Path.home() / ".keras" / "keras.json"


def choose_backend(requested=None, environ=None, config_path=None):
    """Decide the backend by the documented precedence; import nothing.

    Raises ``ValueError`` with one line when a backend other than torch or jax
    is asked for explicitly (flag or environment variable).
    """
    environ = os.environ if environ is None else environ
    if requested:
        return BackendChoice(_check_name(requested, "--backend"), "--backend")

    from_env = environ.get("KERAS_BACKEND", "").strip()
    if from_env:
        return BackendChoice(_check_name(from_env, "KERAS_BACKEND"), "KERAS_BACKEND")

    config_path = keras_config_path(environ) if config_path is None else config_path
    configured = _read_configured_backend(Path(config_path))
    if configured in BACKENDS:
        return BackendChoice(configured, str(config_path))
    notes = ()
    if configured:
        notes = (
            f"{config_path} names backend {configured!r}; this project runs on "
            f"torch or jax, so it uses {DEFAULT_BACKEND}",
        )
    return BackendChoice(DEFAULT_BACKEND, "default", notes)


def _check_name(name, where):
    name = name.strip().lower()
    if name == "pytorch":
        name = "torch"
    if name not in BACKENDS:
        not_tensorflow = (
            " (TensorFlow is not supported)" if name == "tensorflow" else ""
        )
        raise ValueError(
            f"{where} asks for backend {name!r}; this project supports "
            f"{' and '.join(BACKENDS)}{not_tensorflow}"
        )
    return name


def _read_configured_backend(path):
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    backend = config.get("backend") if isinstance(config, dict) else None
    return backend.strip().lower() if isinstance(backend, str) else None


def select_backend(requested=None, device="auto"):
    """Settle the backend (and, for ``device='cpu'``, hide the GPU) before Keras.

    Must run before the first ``import keras``. If Keras is already loaded in
    this process (tests, notebooks), the choice must agree with it; a different
    one is a ``RuntimeError`` because Keras cannot switch backends in-process.
    Returns the :class:`BackendChoice`.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    choice = choose_backend(requested)

    if "keras" in sys.modules:
        import keras

        loaded = keras.backend.backend()
        if loaded != choice.name:
            raise RuntimeError(
                f"Keras is already running on {loaded} in this process; "
                f"{choice.name} (from {choice.source}) needs a new process"
            )
        return choice

    os.environ["KERAS_BACKEND"] = choice.name
    if device == "cpu":
        # Both must be set before the backend library initialises its devices.
        os.environ["KERAS_TORCH_DEVICE"] = "cpu"
        os.environ["JAX_PLATFORMS"] = "cpu"
    # JAX would otherwise reserve most of the GPU's memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return choice


# ---------------------------------------------------------------------------
# Device report
# ---------------------------------------------------------------------------


@dataclass
class DeviceReport:
    """What the backend will compute on, in words a user can act on."""

    backend: str
    backend_version: str
    keras_version: str
    kind: str  # "gpu" or "cpu"
    name: str
    details: list = field(default_factory=list)  # e.g. memory, compute capability
    why_no_gpu: str = ""  # empty when kind == "gpu"

    @property
    def is_gpu(self):
        return self.kind == "gpu"

    def summary(self):
        """One line, e.g. ``GPU NVIDIA A100 (80.0 GiB, compute capability 8.0)``."""
        extra = f" ({', '.join(self.details)})" if self.details else ""
        return f"{self.kind.upper()} {self.name}{extra}"


def device_report():
    """Describe the device Keras will use; Keras must be importable now."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        report = _torch_report()
    elif backend == "jax":
        report = _jax_report()
    else:  # Only reachable if Keras was imported before select_backend().
        raise RuntimeError(f"unsupported Keras backend {backend!r}")
    report.keras_version = keras.__version__
    return report


def _cpu_name():
    cores = os.cpu_count() or 1
    return f"{cores} core{'s' if cores != 1 else ''}"


def _torch_report():
    import torch

    report = DeviceReport("torch", torch.__version__, "", "cpu", _cpu_name())
    device = torch_device()
    if device.type == "cuda":
        index = device.index or 0
        props = torch.cuda.get_device_properties(index)
        report.kind, report.name = "gpu", props.name
        report.details = [
            f"{props.total_memory / 2**30:.1f} GiB",
            f"compute capability {props.major}.{props.minor}",
            f"CUDA {torch.version.cuda}",
        ]
    elif device.type == "mps":
        report.kind, report.name = "gpu", "Apple GPU (Metal, mps)"
    else:
        report.why_no_gpu = _torch_why_no_gpu()
    return report


def _torch_why_no_gpu():
    import torch

    if os.environ.get("KERAS_TORCH_DEVICE") == "cpu":
        return "the CPU was asked for (--device cpu)"
    if torch.version.cuda is None and not torch.backends.mps.is_built():
        return (
            f"this PyTorch ({torch.__version__}) is a CPU-only build; install the "
            "CUDA build from PyTorch's package index (see README, GPU set-up)"
        )
    if torch.version.cuda is not None:
        if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
            return "CUDA_VISIBLE_DEVICES hides every GPU"
        return (
            f"PyTorch is built for CUDA {torch.version.cuda} but finds no usable "
            "GPU: no NVIDIA GPU, no driver, or a driver too old for this build "
            "(check nvidia-smi)"
        )
    return "PyTorch is built for Apple's GPU but Metal (mps) is not available"


def torch_device():
    """The ``torch.device`` Keras places tensors on."""
    import torch
    from keras.src.backend.torch.core import get_device

    return torch.device(get_device())


def _jax_report():
    import jax

    report = DeviceReport("jax", jax.__version__, "", "cpu", _cpu_name())
    device = jax.devices()[0]
    if device.platform in ("gpu", "cuda", "rocm", "metal"):
        report.kind, report.name = "gpu", device.device_kind
        stats = _jax_memory_stats(device)
        if stats:
            report.details.append(f"{stats / 2**30:.1f} GiB")
        capability = getattr(device, "compute_capability", None)
        if capability:
            report.details.append(f"compute capability {capability}")
    elif os.environ.get("JAX_PLATFORMS") == "cpu":
        report.why_no_gpu = "the CPU was asked for (--device cpu)"
    else:
        report.why_no_gpu = (
            "this JAX has no GPU plugin or finds no GPU; on Linux with an NVIDIA "
            'GPU install it with pip install -U "jax[cuda12]"'
        )
    return report


def _jax_memory_stats(device):
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def check_device_computes(size=256, seed=0):
    """Multiply two matrices on the device and compare with NumPy on the CPU.

    Returns the largest relative error. A device that is detected but computes
    wrong (a broken driver, a mismatched build) shows up here, before training.
    """
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size)).astype("float32")
    b = rng.standard_normal((size, size)).astype("float32")
    on_device = keras.ops.convert_to_numpy(
        keras.ops.tanh(keras.ops.matmul(keras.ops.array(a), keras.ops.array(b)) / 16)
    )
    on_host = np.tanh((a.astype("float64") @ b.astype("float64")) / 16)
    if not np.all(np.isfinite(on_device)):
        return float("inf")
    return float(np.max(np.abs(on_device - on_host)) / np.max(np.abs(on_host)))


def seed_everything(seed):
    """Seed Python, NumPy and the backend so a run can be repeated."""
    import keras

    keras.utils.set_random_seed(int(seed))


# ---------------------------------------------------------------------------
# Loss and gradient with respect to the image, on the device
# ---------------------------------------------------------------------------

DEFAULT_MEMORY_HINT = "try a smaller --max_size"


class NonFiniteError(FloatingPointError):
    """The loss or its gradient became NaN or infinite."""


class DeviceMemoryError(MemoryError):
    """The device ran out of memory; the message says what to change."""


def to_device(array):
    """A NumPy array as a float32 backend tensor on the Keras device."""
    import keras
    import numpy as np

    return keras.ops.convert_to_tensor(np.asarray(array, dtype=np.float32))


def to_numpy(tensor):
    """A backend tensor as a NumPy array on the host (one device-to-host copy)."""
    import keras

    return keras.ops.convert_to_numpy(tensor)


def image_gradient_fn(loss_fn, *, variables=None, check_finite=True):
    """Compile ``loss_fn`` into ``step(image) -> (loss, grad)`` on the device.

    ``loss_fn(image)`` takes ``image: float32 (1, height, width, 3), RGB,
    0..255`` as a backend tensor and returns a scalar backend tensor. ``step``
    returns the loss (scalar tensor) and its gradient with respect to the image
    only (a tensor shaped like the image); both stay on the device. No gradient
    is computed or stored for any weight: on torch, ``torch.autograd.grad`` is
    taken with respect to the image alone (and frozen Keras weights have
    ``requires_grad`` off); on JAX, ``jax.value_and_grad`` differentiates the
    image argument alone, inside ``jax.jit`` (one compilation per image shape).

    ``variables`` (JAX only; ignored on torch): the Keras variables
    ``loss_fn`` reads, e.g. ``model.variables``. Given, they are passed to the
    compiled function as arguments, which compiles faster; left out, their
    values are folded into the compiled function as constants, which compiles
    slower but ran about a third faster on a CPU.

    With ``check_finite``, a NaN or infinite loss or gradient raises
    :class:`NonFiniteError`. The check costs one scalar copy to the host per
    step: ``loss + 0 * max(|grad|)`` is reduced on the device and is finite
    only when both are, so the whole gradient never leaves the device.
    """
    import keras

    name = keras.backend.backend()
    if name == "torch":
        step = _torch_value_and_grad(loss_fn)
    elif name == "jax":
        step = _jax_value_and_grad(loss_fn, variables)
    else:
        raise RuntimeError(f"unsupported Keras backend {name!r}")

    def checked_step(image):
        loss, grad, health = step(image)
        if check_finite:
            _check_finite(loss, health)
        return loss, grad

    return checked_step


def _health(loss, grad):
    """A scalar that is finite only when ``loss`` and every ``grad`` value are."""
    import keras

    return loss + 0.0 * keras.ops.max(keras.ops.abs(grad))


def _check_finite(loss, health):
    import math

    if math.isfinite(float(health)):
        return
    value = float(loss)
    if math.isfinite(value):
        raise NonFiniteError(
            f"the gradient with respect to the image holds NaN or infinity "
            f"(loss {value:.6g})"
        )
    raise NonFiniteError(f"the loss is {value}; the image or the loss produced it")


def _torch_value_and_grad(loss_fn):
    import keras
    import torch

    def step(image):
        image = keras.ops.convert_to_tensor(image).detach().requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(image)
            (grad,) = torch.autograd.grad(loss, image)
        loss = loss.detach()
        return loss, grad, _health(loss, grad)

    return step


def _jax_value_and_grad(loss_fn, variables):
    import jax
    import keras

    if variables is None:

        def loss_and_health(image):
            loss, grad = jax.value_and_grad(loss_fn)(image)
            return loss, grad, _health(loss, grad)

        compiled = jax.jit(loss_and_health)
        return lambda image: compiled(keras.ops.convert_to_tensor(image))

    variables = list(variables)

    def stateless_loss(values, image):
        with keras.StatelessScope(
            state_mapping=list(zip(variables, values, strict=True))
        ):
            return loss_fn(image)

    def stateless_loss_and_health(values, image):
        loss, grad = jax.value_and_grad(stateless_loss, argnums=1)(values, image)
        return loss, grad, _health(loss, grad)

    compiled = jax.jit(stateless_loss_and_health)

    def step(image):
        values = [variable.value for variable in variables]
        return compiled(values, keras.ops.convert_to_tensor(image))

    return step


def host_value_and_grad(loss_fn, shape, *, variables=None):
    """``loss_fn`` as ``f(x) -> (loss, grad)`` in float64 NumPy, for SciPy's L-BFGS.

    ``x`` is the flattened image, float64 of ``prod(shape)`` values, with
    ``shape`` usually ``(1, height, width, 3)``; ``loss`` is a Python float and
    ``grad`` a flat float64 array. Each call copies the image to the device
    once and the loss and gradient back once; the work between runs on the
    device through :func:`image_gradient_fn`.
    """
    import numpy as np

    shape = tuple(shape)
    step = image_gradient_fn(loss_fn, variables=variables)

    def value_and_grad(x):
        image = to_device(np.reshape(x, shape))
        loss, grad = step(image)
        return float(loss), to_numpy(grad).astype(np.float64).ravel()

    return value_and_grad


# ---------------------------------------------------------------------------
# Out of memory
# ---------------------------------------------------------------------------


def is_out_of_memory(exc):
    """Whether ``exc`` is the backend (or Python) running out of memory."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    # torch.cuda.OutOfMemoryError, and the MPS and CPU allocators' RuntimeError;
    # JAX raises XlaRuntimeError with the gRPC-style RESOURCE_EXHAUSTED status.
    return (
        type(exc).__name__ == "OutOfMemoryError"
        or "RESOURCE_EXHAUSTED" in text
        or "out of memory" in text.lower()
    )


def oom_message(exc, where="", hint=DEFAULT_MEMORY_HINT):
    """One line for an out-of-memory ``exc``, or ``None`` if it is something else.

    ``where`` says what was being done, e.g. ``"at 2048x1536"``.
    """
    if not is_out_of_memory(exc):
        return None
    parts = [f"out of memory on {_device_name()}"]
    if where:
        parts.append(f" {where}")
    if hint:
        parts.append(f"; {hint}")
    return "".join(parts)


@contextlib.contextmanager
def out_of_memory_hint(where="", hint=DEFAULT_MEMORY_HINT):
    """Turn an out-of-memory error inside the block into :class:`DeviceMemoryError`.

    Example: ``with out_of_memory_hint("at 2048x1536", "try a smaller
    --max_size or --tile_size"): ...``. Other errors pass through unchanged.
    """
    try:
        yield
    except DeviceMemoryError:
        raise
    except Exception as exc:
        message = oom_message(exc, where, hint)
        if message is None:
            raise
        raise DeviceMemoryError(message) from exc


def _device_name():
    if "keras" not in sys.modules:
        return "the host"
    import keras

    name = keras.backend.backend()
    if name == "torch":
        return str(torch_device())
    if name == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}:{device.id}"
    return name
