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

Four smaller pieces serve mnist.py's training through Keras's ``fit``:
:func:`fuse_adam` (Keras's Adam maths in PyTorch's fused kernel),
:func:`call_layers_directly` (a chain of layers without ``Layer.__call__`` at
every layer), :func:`lean_train_step` (Keras's training step with less
bookkeeping) and :func:`cosine_decay_in_torch` (the learning-rate schedule in a
few torch ops). Each changes one instance, not its class, and is tested against
the plain Keras behaviour.

Import this module only once Keras runs on the torch backend.
"""

import inspect
import math
import weakref

import keras
import torch
import torch.nn.functional as functional
from torch.optim.adam import adam as torch_adam


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
# variable changes: converting all 13 took about a quarter of a second on a
# 2-core CPU, half a forward pass through VGG16 at 64x64.
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


# ---------------------------------------------------------------------------
# Adam in one fused kernel
# ---------------------------------------------------------------------------


def fuse_adam(optimizer):
    """Make a ``keras.optimizers.Adam`` update all its variables in one kernel.

    Keras's torch Adam runs about ten ``torch._foreach`` passes over the
    weights per step, five of them into new temporaries; on a 2-core CPU that
    took three times as long as PyTorch's own Adam for the MNIST mlp. This
    swaps in PyTorch's fused Adam kernel (``torch.optim.adam.adam(...,
    fused=True)``) doing Keras's maths: Keras folds both bias corrections into
    the step size and adds epsilon to the uncorrected ``sqrt(v)``, so the step
    size goes in as the learning rate and the kernel's own bias corrections
    are switched off by an infinite step count. The optimizer stays a Keras
    Adam: its variables, schedule, config and saved form are unchanged.
    Returns ``optimizer``; AMSGrad is refused.
    """
    if optimizer.amsgrad:
        raise ValueError("fuse_adam does not do AMSGrad; use keras's own Adam")

    def fused_update_step(grads, variables, learning_rate):
        # alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t), as in Keras's Adam.
        step = (optimizer.iterations.value + 1).to(variables[0].value.dtype)
        learning_rate = keras.ops.cast(learning_rate, variables[0].dtype)
        beta_1, beta_2 = optimizer.beta_1, optimizer.beta_2
        alpha = learning_rate * torch.sqrt(1 - beta_2**step) / (1 - beta_1**step)
        indices = [optimizer._get_variable_index(variable) for variable in variables]
        no_bias_correction = torch.full((), torch.inf, device=alpha.device)
        torch_adam(
            [variable.value for variable in variables],
            list(grads),
            [optimizer._momentums[index].value for index in indices],
            [optimizer._velocities[index].value for index in indices],
            [],
            [no_bias_correction] * len(variables),
            fused=True,
            amsgrad=False,
            beta1=beta_1,
            beta2=beta_2,
            lr=alpha,
            weight_decay=0.0,
            eps=optimizer.epsilon,
            maximize=False,
        )

    # Keras's torch optimizers call this once per step with every variable.
    optimizer._parallel_update_step = fused_update_step
    return optimizer


# ---------------------------------------------------------------------------
# A chain of layers without Keras's per-call machinery
# ---------------------------------------------------------------------------


def call_layers_directly(model):
    """Make a functional ``model`` that is one chain of layers run it leaner.

    Keras's ``Layer.__call__`` converts, checks and scopes its arguments at
    every call, and each Keras op inside a layer's ``call`` checks its
    arguments again; on PyTorch, which runs eagerly, that took about a fifth of
    a millisecond per layer and step on a 2-core CPU, a fifth of the whole step
    of a narrow MNIST mlp. After this, ``model(x, training=...)`` (and so
    ``fit``, ``evaluate`` and ``predict``) still enters through Keras once,
    then runs the layers in turn with the same variables and random seeds:
    plain ``Dense`` and ``Flatten`` layers as the one or two torch calls they
    amount to, every other layer through its own ``call``. Only this instance
    changes, not its class, so the model saves and loads as a plain Keras
    model. Returns ``model``.
    """
    layers = [
        layer
        for layer in model.layers
        if not isinstance(layer, keras.layers.InputLayer)
    ]
    previous = model.input
    for layer in layers:
        if layer.input is not previous:
            raise ValueError(
                f"call_layers_directly needs one chain of layers; "
                f"{layer.name!r} does not take the previous layer's output"
            )
        previous = layer.output
    if previous is not model.output:
        raise ValueError("call_layers_directly needs the last layer as the output")
    runners = [_direct_runner(layer) for layer in layers]

    def call(inputs, training=None, mask=None):
        x = keras.ops.convert_to_tensor(inputs)
        for run in runners:
            x = run(x, training)
        return x

    model.call = call
    return model


def _direct_runner(layer):
    """``run(x, training)`` doing what ``layer.call`` does, with fewer checks."""
    if type(layer) is keras.layers.Dense and not (
        layer.lora_enabled or layer.quantization_mode
    ):

        def dense(x, training):
            bias = None if layer.bias is None else layer.bias.value
            return layer.activation(functional.linear(x, layer.kernel.value.T, bias))

        return dense
    if type(layer) is keras.layers.Flatten and layer.data_format == "channels_last":
        return lambda x, training: x.flatten(1)
    if "training" in inspect.signature(layer.call).parameters:
        return lambda x, training: layer.call(x, training=training)
    return lambda x, training: layer.call(x)


# ---------------------------------------------------------------------------
# Keras's training step with less bookkeeping
# ---------------------------------------------------------------------------


def lean_train_step(model):
    """Make ``fit`` on a compiled float32 ``model`` run a leaner training step.

    Keras's torch ``train_step`` calls the model through ``Layer.__call__``
    (argument conversion, dtype and name scopes, then ``torch.nn.Module``'s own
    call), collects the trainable weights layer by layer, and sends the loss
    through the compiled-loss machinery (structures, masks, reductions, extra
    layer losses), the loss tracker and every metric's result at every step:
    about a seventh of a MNIST mlp step on a 2-core CPU. This step does the
    same work in the same order through Keras's optimizer and metrics, but
    calls the model's ``call`` directly, collects the trainable variables once
    (call this again after changing what is trainable), adds to the loss
    tracker's sum and count in place, and has two shortcuts: when the model
    was compiled with one loss given by name and has no other losses, the loss
    is that function's batch mean, which is what the compiled loss reduces it
    to; when the loss is the only metric, the step's logs are its running
    mean as a tensor, not a Python number. Only this instance changes, not its
    class. Returns ``model``.
    """
    if model.dtype_policy.name != "float32":
        raise ValueError("lean_train_step needs a float32 model, without autocast")
    takes_training = "training" in inspect.signature(model.call).parameters
    variables = model.trainable_variables
    loss_function = _batch_mean_loss(model)
    # The loss tracker is a keras.metrics.Mean, documented as keeping the two
    # variables below; Mean.update_state takes a dozen Keras ops to add to them.
    total = model._loss_tracker.total.value
    count = model._loss_tracker.count.value
    only_the_loss = all(metric is model._loss_tracker for metric in model.metrics)

    def train_step(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = model.call(x, training=True) if takes_training else model.call(x)
        model.zero_grad()
        if loss_function is not None and sample_weight is None:
            loss = keras.ops.mean(loss_function(y, y_pred))
        else:
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        batch_size = keras.tree.flatten(x)[0].shape[0]
        with torch.no_grad():  # the tracker's running sum and count, in place
            total.add_(loss * batch_size)
            count.add_(batch_size)
        loss = model.optimizer.scale_loss(loss)
        loss.backward()
        with torch.no_grad():
            model.optimizer.apply([v.value.grad for v in variables], variables)
        if only_the_loss:  # its running mean, left on the device
            return {"loss": total / count}
        return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    model.train_step = train_step
    return model


def _batch_mean_loss(model):
    """The loss function whose batch mean is all of ``model``'s loss, or None."""
    if not isinstance(model.loss, str) or model.losses:
        return None
    if model.get_compile_config()["loss_weights"] is not None:
        return None
    if any(layer.activity_regularizer is not None for layer in model.layers):
        return None
    return keras.losses.get(model.loss)


# ---------------------------------------------------------------------------
# A cosine-decay learning rate in torch ops
# ---------------------------------------------------------------------------


def cosine_decay_in_torch(optimizer):
    """Compute ``optimizer``'s ``CosineDecay`` learning rate in a few torch ops.

    Keras's schedule goes through a dozen Keras ops and a ``cond`` at every
    step, about a fiftieth of a MNIST mlp step on a 2-core CPU. This computes
    the same values, warm-up included, from the optimizer's iteration counter
    on its device. The schedule object stays, so the optimizer's config and
    saved form are unchanged. Returns ``optimizer``.
    """
    schedule = optimizer._learning_rate
    if type(schedule) is not keras.optimizers.schedules.CosineDecay:
        raise TypeError(
            f"cosine_decay_in_torch needs a CosineDecay schedule, got {schedule!r}"
        )
    start = schedule.initial_learning_rate
    alpha, decay_steps = schedule.alpha, schedule.decay_steps
    if schedule.warmup_target is None:
        peak, warmup_steps = start, 0
    else:
        peak, warmup_steps = schedule.warmup_target, schedule.warmup_steps

    def learning_rate():
        step = optimizer.iterations.value.to(torch.float32)
        step = torch.clamp(step, max=warmup_steps + decay_steps)
        fraction = (step - warmup_steps) / decay_steps
        cosine = 0.5 * (1.0 + torch.cos(math.pi * fraction))
        decayed = peak * ((1 - alpha) * cosine + alpha)
        if not warmup_steps:
            return decayed
        warming = start + (peak - start) * step / warmup_steps
        return torch.where(step < warmup_steps, warming, decayed)

    # Keras's optimizers read their learning rate through this, once per step.
    optimizer._get_current_learning_rate = learning_rate
    return optimizer
