"""DeepDream step speed against plain PyTorch, and peak memory with and without tiles.

Speed: one gradient-ascent step of deep_dream.py (roll, gradient of the default
layers' objective by tiles, roll back, normalise, move, clip, loss to the host)
at --size x --size, against the same maths written directly in PyTorch: VGG16
up to block5_conv1 from the same weights file, frozen (no weight gradients),
in channels-last or contiguous layout, whichever its warm-up finds faster. Both
run in this process on the torch backend, alternating, on the same threads,
after a warm-up, from the same image and shifts; their first results are
compared, so the reference is known to compute the same thing. The last line
ends with ``ratio=R``: our median step time over the reference's.

Memory (--memory): peak resident memory (the process's ``ru_maxrss``) of one
dream step on a 4096x3072 image with --tile_size 512, and of an untiled step
at a size that fits, each measured in a fresh Python process so one does not
inherit the other's peak. Reported as the peak and as the growth over the
process's peak before the step (weights loaded, model built). POSIX only.

usage: python benchmarks/bench_deep_dream.py [--size 512] [--repeats 5] [--memory]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import backend  # noqa: E402

WEIGHTS = REPO.parent / "shared" / "weights" / "vgg16_hed_bsds500_notop.h5"
STEP = 2.0


# ---------------------------------------------------------------------------
# Our code
# ---------------------------------------------------------------------------


def our_step_function(weights, tile_size):
    """A callable ``(image, shift) -> (image, loss)``: deep_dream.py's step."""
    import deep_dream
    from common.vgg16 import build_feature_model

    layers = deep_dream.parse_layer_weights(deep_dream.DEFAULT_LAYERS)
    model = build_feature_model(weights, tuple(layers))
    gradient_step = deep_dream.gradient_function(
        deep_dream.dream_loss(model, layers, {}), model.variables
    )

    def step(image, shift):
        size = tuple(image.shape[1:3])
        tile = tile_size or max(size)
        tile_shape = (min(tile, size[0]), min(tile, size[1]))
        image, loss = deep_dream.ascent_step(
            gradient_step, image, tile_shape, shift, STEP
        )
        return image, float(loss)

    return step


# ---------------------------------------------------------------------------
# The plain PyTorch reference
# ---------------------------------------------------------------------------


def reference_network(weights, memory_format):
    """VGG16 up to block5_conv1 in torch.nn, frozen; returns (modules, taps)."""
    import torch
    from torch import nn

    from common.vgg16 import LAYERS

    modules, taps = [], {}
    for name in LAYERS[: LAYERS.index("block5_conv1") + 1]:
        if name.endswith("_pool"):
            modules.append(nn.MaxPool2d(2, 2))
            continue
        kernel, bias = weights.layers[name]  # (3, 3, in, out), (out,)
        conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
        conv.weight.data = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous()
        conv.bias.data = torch.from_numpy(bias)
        modules += [conv, nn.ReLU(inplace=True)]
        taps[name] = len(modules) - 1
    network = nn.Sequential(*modules).eval().requires_grad_(False)
    return network.to(memory_format=memory_format), taps


def reference_step_function(weights, memory_format):
    """The same step as deep_dream.py, as a PyTorch user would write it."""
    import torch

    network, taps = reference_network(weights, memory_format)
    # Caffe preprocessing: BGR, minus the ImageNet channel means.
    mean = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    layer_weights = {"block4_conv3": 1.0, "block5_conv1": 0.5}
    wanted = {taps[name]: weight for name, weight in layer_weights.items()}
    last = max(wanted)

    def objective(pixels):  # pixels: (1, 3, height, width), RGB, 0..255
        x = (pixels[:, [2, 1, 0]] - mean).contiguous(memory_format=memory_format)
        loss = 0.0
        for index, module in enumerate(network[: last + 1]):
            x = module(x)
            if index in wanted:
                crop = x[:, :, 1:-1, 1:-1]
                loss = loss + wanted[index] * crop.square().mean()
        return loss

    def step(image, shift):  # image: (1, 3, height, width)
        shifted = torch.roll(image, shift, dims=(2, 3)).requires_grad_(True)
        with torch.enable_grad():
            loss = objective(shifted)
            (grad,) = torch.autograd.grad(loss, shifted)
        grad = torch.roll(grad, (-shift[0], -shift[1]), dims=(2, 3))
        grad = grad / (grad.abs().mean() + 1e-8)
        return (image + STEP * grad).clamp_(0, 255), float(loss.detach())

    return step


# ---------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------


def timed(step, image, shift):
    start = time.perf_counter()
    result, loss = step(image, shift)
    return time.perf_counter() - start, result, loss


def speed(args):
    import numpy as np
    import torch

    from common.vgg16 import load_weights

    weights = load_weights(args.weights)
    ours = our_step_function(weights, tile_size=512)
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 255, (1, args.size, args.size, 3)).astype("float32")
    ours_image = backend.to_device(pixels)
    reference_image = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    shifts = [tuple(int(v) for v in rng.integers(-32, 33, 2)) for _ in range(99)]

    # Warm-up; the reference keeps the faster memory layout.
    _, first_ours, loss_ours = timed(ours, ours_image, shifts[0])
    layouts = {}
    for memory_format in (torch.channels_last, torch.contiguous_format):
        step = reference_step_function(weights, memory_format)
        timed(step, reference_image, shifts[0])
        seconds, first_reference, loss_reference = timed(
            step, reference_image, shifts[0]
        )
        layouts[memory_format] = (seconds, step)
    layout = min(layouts, key=lambda key: layouts[key][0])
    reference = layouts[layout][1]
    difference = np.abs(
        backend.to_numpy(first_ours)[0]
        - first_reference[0].permute(1, 2, 0).detach().numpy()
    ).max()
    print(
        f"same step: loss {loss_ours:.6g} (ours) vs {loss_reference:.6g} "
        f"(reference), largest pixel difference {difference:.3g} grey levels"
    )
    print(f"reference layout: {str(layout).replace('torch.', '')}")

    times = {"ours": [], "reference": []}
    for repeat in range(args.repeats):
        shift = shifts[1 + repeat]
        times["ours"].append(timed(ours, ours_image, shift)[0])
        times["reference"].append(timed(reference, reference_image, shift)[0])
    for name, values in times.items():
        shown = ", ".join(f"{value:.3f}" for value in values)
        print(f"{name}: median {statistics.median(values):.3f} s per step ({shown})")
    ratio = statistics.median(times["ours"]) / statistics.median(times["reference"])
    print(
        f"deep_dream step {args.size}x{args.size}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads: ratio={ratio:.2f}"
    )


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def peak_rss_bytes():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kibibytes, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def memory_child(args):
    """One step at args.memory_child = (height, width, tile); prints JSON."""
    import numpy as np

    from common.vgg16 import load_weights

    height, width, tile = args.memory_child
    step = our_step_function(load_weights(args.weights), tile_size=tile)
    image = backend.to_device(
        np.random.default_rng(0).uniform(0, 255, (1, height, width, 3))
    )
    before = peak_rss_bytes()
    start = time.perf_counter()
    step(image, (5, 7))
    seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "peak": peak_rss_bytes(), "s": seconds}))


def memory(args):
    cases = [(4096, 3072, 512), (1024, 768, 0)]
    for height, width, tile in cases:
        command = [sys.executable, __file__, "--memory_child", str(height)]
        command += [str(width), str(tile), "--weights", str(args.weights)]
        environment = dict(os.environ, KERAS_BACKEND="torch")
        done = subprocess.run(
            command, capture_output=True, text=True, env=environment, check=True
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        tiles = f"tiles of {tile}" if tile else "untiled"
        print(
            f"{height}x{width}, {tiles}: peak {result['peak'] / 2**30:.2f} GiB, "
            f"{(result['peak'] - result['before']) / 2**30:.2f} GiB over the "
            f"{result['before'] / 2**30:.2f} GiB before the step "
            f"(step took {result['s']:.0f} s)"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--memory", action="store_true", help="also measure memory")
    parser.add_argument("--memory_child", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    backend.select_backend("torch")
    if args.memory_child:
        return memory_child(args)
    if args.memory:
        memory(args)
    speed(args)


if __name__ == "__main__":
    main()
