"""VGG16 gradient speed: our Keras model against the same layers in plain PyTorch.

One step is what DeepDream and style transfer do per iteration: the forward
pass of one RGB image through VGG16 up to ``--layer`` (block5_conv3: all 13
convolutions), a mean-square loss on that layer, and the gradient of the loss
with respect to the image, none for the weights. Ours is
``common.vgg16.build_feature_model`` stepped through
``common.backend.image_gradient_fn`` (including its finiteness check); the
reference is the same convolutions written directly with
``torch.nn.functional``, frozen weights, and channels-last memory layout when
the warm-up shows it is faster here. Both use the same weights file and image,
run in one process, alternating, on the same number of threads, after a
warm-up; each reports the median of ``--repeats`` steps.

The Keras backend is the usual one (``KERAS_BACKEND``, keras.json, torch), so
run it once per backend; under JAX the PyTorch reference still runs in the same
process. The last line ends with ``ratio=R``: our median over the reference's.

usage: KERAS_BACKEND=torch python benchmarks/bench_vgg16.py [--size 512]
       KERAS_BACKEND=jax python benchmarks/bench_vgg16.py [--size 512]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import backend, vgg16  # noqa: E402

HED_WEIGHTS = REPO.parent / "shared" / "weights" / "vgg16_hed_bsds500_notop.h5"


def keras_step(weights, layer):
    """Our step: ``image -> (loss, grad)`` on the device, as the scripts use it."""
    import keras

    model = vgg16.build_feature_model(weights, [layer])

    def loss_fn(image):
        return keras.ops.mean(keras.ops.square(model(image)[layer]))

    return backend.image_gradient_fn(loss_fn)


def torch_reference_step(weights, layer, channels_last, device):
    """The same maths as a careful PyTorch user writes it."""
    import torch
    import torch.nn.functional as functional

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    convolutions = {}
    for name in vgg16.LAYERS[: vgg16.LAYERS.index(layer) + 1]:
        if name in weights.layers:
            kernel, bias = weights.layers[name]
            # (3, 3, in, out) -> (out, in, 3, 3), PyTorch's layout.
            kernel = torch.from_numpy(kernel).permute(3, 2, 0, 1)
            convolutions[name] = (
                kernel.to(device).contiguous(memory_format=memory_format),
                torch.from_numpy(bias).to(device),
            )
    preprocessing = weights.preprocessing
    order = list(preprocessing.channel_indices)
    mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)
    last = vgg16.LAYERS.index(layer)

    def forward(image):  # (1, 3, height, width), RGB, 0..255
        x = (image[:, order] * preprocessing.scale - mean) / std
        x = x.contiguous(memory_format=memory_format)
        for name in vgg16.LAYERS[: last + 1]:
            if name in convolutions:
                x = functional.relu(
                    functional.conv2d(x, *convolutions[name], padding=1)
                )
            else:
                x = functional.max_pool2d(x, 2)
        return x

    def step(image):
        image = image.detach().requires_grad_(True)
        loss = forward(image).square().mean()
        (grad,) = torch.autograd.grad(loss, image)
        return loss.detach(), grad

    return step


def timed(step, image):
    start = time.perf_counter()
    loss, _ = step(image)
    float(loss)  # waits for the device
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=HED_WEIGHTS)
    parser.add_argument("--size", type=int, default=512, help="image side, pixels")
    parser.add_argument("--layer", default="block5_conv3")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    choice = backend.select_backend()
    import keras
    import numpy as np
    import torch

    weights = vgg16.load_weights(args.weights)
    report = backend.device_report()
    if choice.name == "torch":
        device = backend.torch_device()
    else:  # The reference takes the GPU too when this PyTorch build can.
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    print(f"backend {choice.name} ({keras.__version__}), {report.summary()}")
    print(f"weights: {weights.description}")
    print(f"{args.size}x{args.size} image, forward and backward through {args.layer}")

    pixels = np.random.default_rng(0).uniform(0, 255, (1, args.size, args.size, 3))
    pixels = pixels.astype("float32")
    ours = keras_step(weights, args.layer)
    our_image = backend.to_device(pixels)
    reference_image = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(device)

    # Warm-up: compilation, allocator, and the reference's faster memory layout.
    timed(ours, our_image)
    layouts = {}
    for channels_last in (False, True):
        step = torch_reference_step(weights, args.layer, channels_last, device)
        timed(step, reference_image)
        layouts[channels_last] = (timed(step, reference_image), step)
    channels_last = min(layouts, key=lambda key: layouts[key][0])
    reference = layouts[channels_last][1]
    layout = "channels-last" if channels_last else "contiguous (NCHW)"
    print(f"reference: PyTorch on {device}, {layout}; torch threads: {threads}")

    our_times, reference_times = [], []
    for _ in range(args.repeats):
        our_times.append(timed(ours, our_image))
        reference_times.append(timed(reference, reference_image))
    ours_median = statistics.median(our_times)
    reference_median = statistics.median(reference_times)
    print(
        f"ours ({choice.name}): median {ours_median * 1000:.0f} ms over {args.repeats}"
    )
    print(
        f"plain PyTorch:    median {reference_median * 1000:.0f} ms over {args.repeats}"
    )
    print(
        f"{args.layer} at {args.size}x{args.size} on {choice.name}: "
        f"ratio={ours_median / reference_median:.2f}"
    )


if __name__ == "__main__":
    main()
