"""Style transfer speed and memory: one loss-and-gradient evaluation, ours
against plain PyTorch, and the peak memory of whole runs.

Speed. Both sides evaluate the same loss (content on block4_conv2, Gram style
on block1_conv1 ... block5_conv1, total variation, each normalised as in
neural_style_transfer.py) and its gradient with respect to the image, for the
cat at 512 on the long side with The Scream as style, on the real VGG16 weights
in shared/. Each evaluation is what one L-BFGS step asks for: a flat float64
image in, the loss and a flat float64 gradient out. Ours is
``common.backend.host_value_and_grad`` over neural_style_transfer.make_loss;
the reference is the same maths written directly in PyTorch (channels-first
image, frozen weights, ``torch.autograd.grad`` with respect to the image only).
They run in one process, alternating, on the same thread count, after a
warm-up each; the median of ``--repeats`` runs each is reported. The last line
ends with ``ratio=R``: our median over the reference median.

Memory. Each case runs neural_style_transfer.main (2 iterations) in a fresh
Python process and reports that process's peak resident set size
(``resource.getrusage``, so Linux and macOS), and on a CUDA device also
PyTorch's peak allocated device memory. The content is the cat, upscaled in a
temporary folder so that 1024 is reachable.

usage: python benchmarks/bench_style_transfer.py [--size 512] [--repeats 5]
       [--memory_sizes 512,1024] [--backend torch]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import backend  # noqa: E402

SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "vgg16_hed_bsds500_notop.h5"
CONTENT = SHARED / "images" / "chelsea_cat.png"
STYLE = SHARED / "images" / "the_scream.jpg"


# ---------------------------------------------------------------------------
# The plain PyTorch reference
# ---------------------------------------------------------------------------


def plain_torch_vgg(weights, last_layer, memory_format):
    """VGG16's layers up to ``last_layer`` as a list of (name, torch module)."""
    import torch
    from torch import nn

    from common import vgg16

    layers = []
    for name in vgg16.LAYERS[: vgg16.LAYERS.index(last_layer) + 1]:
        if name in vgg16.KERNEL_SHAPES:
            kernel, bias = weights.layers[name]
            conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=1)
            with torch.no_grad():
                # Keras (height, width, in, out) -> PyTorch (out, in, height, width).
                conv.weight.copy_(torch.from_numpy(kernel).permute(3, 2, 0, 1))
                conv.bias.copy_(torch.from_numpy(bias))
            conv.requires_grad_(False)
            conv.to(memory_format=memory_format)
            layers.append((name, nn.Sequential(conv, nn.ReLU())))
        else:
            layers.append((name, nn.MaxPool2d(2, 2)))
    return layers


def plain_torch_loss(
    weights, content, style, content_layer, style_layers, scales, memory_format
):
    """``f(x) -> (loss, grad)`` for L-BFGS, as a PyTorch user would write it.

    ``content`` and ``style`` are float32 (height, width, 3), RGB, 0..255. The
    image being optimised is (1, 3, height, width); the network runs in
    ``memory_format`` (channels-last is often the faster on a CPU).
    """
    import torch

    names = (content_layer, *style_layers)
    from common import vgg16

    layers = plain_torch_vgg(weights, vgg16.deepest_layer(names), memory_format)
    mean_bgr = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    content_weight, style_weight, tv_weight = scales

    def features(image):
        x = image[:, [2, 1, 0]] - mean_bgr  # RGB 0..255 -> Caffe BGR minus means
        x = x.contiguous(memory_format=memory_format)
        found = {}
        for name, layer in layers:
            x = layer(x)
            if name in names:
                found[name] = x
        return found

    def gram(x):
        _, channels, height, width = x.shape
        flat = x.reshape(channels, height * width)
        return flat @ flat.T / (channels * height * width)

    def channels_first(pixels):
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]

    with torch.no_grad():
        content_target = features(channels_first(content))[content_layer]
        content_scale = content_target.square().mean()
        style_features = features(channels_first(style))
        style_targets = {}
        for name in style_layers:
            target = gram(style_features[name])
            style_targets[name] = (target, target.square().mean())

    shape = (1, 3, *content.shape[:2])

    def value_and_grad(x):
        image = torch.from_numpy(x.reshape(shape).astype(np.float32))
        image.requires_grad_(True)
        found = features(image)
        content_loss = (found[content_layer] - content_target).square().mean()
        style_loss = 0.0
        for name in style_layers:
            target, scale = style_targets[name]
            style_loss = (
                style_loss + (gram(found[name]) - target).square().mean() / scale
            )
        down = image[:, :, 1:, :] - image[:, :, :-1, :]
        right = image[:, :, :, 1:] - image[:, :, :, :-1]
        tv_loss = (down.square().mean() + right.square().mean()) / 255.0**2
        loss = (
            content_weight * content_loss / content_scale
            + style_weight * style_loss / len(style_layers)
            + tv_weight * tv_loss
        )
        (grad,) = torch.autograd.grad(loss, image)
        return float(loss.detach()), grad.numpy().astype(np.float64).ravel()

    return value_and_grad, shape


# ---------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------


def ours(weights, content, style, nst):
    """Our L-BFGS evaluation, exactly as neural_style_transfer.lbfgs makes it."""
    from common import vgg16

    layers = (nst.DEFAULT_CONTENT_LAYER, *nst.DEFAULT_STYLE_LAYERS)
    model = vgg16.build_feature_model(weights, layers)
    loss, _ = nst.make_loss(
        model,
        nst.DEFAULT_CONTENT_LAYER,
        nst.content_target(model, nst.DEFAULT_CONTENT_LAYER, content),
        nst.style_targets(model, nst.DEFAULT_STYLE_LAYERS, [style], (1.0,)),
        default_loss_weights(nst),
    )
    return backend.host_value_and_grad(loss, (1, *content.shape))


def default_loss_weights(nst):
    parser = nst.build_parser()
    return tuple(
        parser.get_default(name)
        for name in ("content_weight", "style_weight", "tv_weight")
    )


def seconds(times):
    return " ".join(f"{value:.2f}" for value in times)


def timed(function, argument):
    start = time.perf_counter()
    result = function(argument)
    return time.perf_counter() - start, result


def compare_speed(size, repeats):
    import torch

    import neural_style_transfer as nst
    from common import vgg16
    from common.images import load_image, resize

    weights = vgg16.load_weights(WEIGHTS)
    cat = load_image(CONTENT).pixels
    content = np.clip(resize(cat, nst.long_side_size(cat.shape[:2], size)), 0, 255)
    scream = load_image(STYLE).pixels
    style = np.clip(resize(scream, nst.long_side_size(scream.shape[:2], size)), 0, 255)
    print(
        f"content {content.shape[0]}x{content.shape[1]}, style "
        f"{style.shape[0]}x{style.shape[1]} (height x width)"
    )

    our_step = ours(weights, content, style, nst)
    # The same starting image for both: the content plus a little noise.
    rng = np.random.default_rng(0)
    start = np.clip(content + rng.normal(0, 8, content.shape), 0, 255)
    our_x = start[None].astype(np.float64).ravel()
    reference_x = start.transpose(2, 0, 1)[None].astype(np.float64).ravel()

    # The reference runs in whichever memory layout is faster here.
    layouts = {}
    for memory_format in (torch.channels_last, torch.contiguous_format):
        step, _ = plain_torch_loss(
            weights,
            content,
            style,
            nst.DEFAULT_CONTENT_LAYER,
            nst.DEFAULT_STYLE_LAYERS,
            default_loss_weights(nst),
            memory_format,
        )
        step(reference_x)  # warm-up
        layouts[memory_format] = (timed(step, reference_x)[0], step)
    fastest = min(layouts, key=lambda key: layouts[key][0])
    reference_step = layouts[fastest][1]
    print(f"reference layout: {fastest}")

    # Warm-up (JAX compiles here), and check that both compute the same loss.
    our_loss, our_grad = our_step(our_x)
    reference_loss, reference_grad = reference_step(reference_x)
    our_grad = our_grad.reshape(1, *content.shape).transpose(0, 3, 1, 2).ravel()
    # float32 sums in another order (and max pooling's pick among near-tied
    # inputs) move single gradient values; the norm says whether they agree.
    difference = our_grad - reference_grad
    norm_error = np.linalg.norm(difference) / np.linalg.norm(reference_grad)
    largest_error = np.abs(difference).max() / np.abs(reference_grad).max()
    print(
        f"loss: ours {our_loss:.6g}, reference {reference_loss:.6g}; gradient "
        f"difference {norm_error:.2e} of its norm (largest single difference "
        f"{largest_error:.2e} of the largest value)"
    )
    if abs(our_loss - reference_loss) > 1e-3 * abs(reference_loss):
        raise SystemExit("the two sides compute different losses; fix before timing")

    our_times, reference_times = [], []
    for _ in range(repeats):
        our_times.append(timed(our_step, our_x)[0])
        reference_times.append(timed(reference_step, reference_x)[0])
    ours_median = statistics.median(our_times)
    reference_median = statistics.median(reference_times)
    print(f"threads: {torch.get_num_threads()} (torch), repeats: {repeats}")
    print(f"ours:      median {ours_median:.3f} s ({seconds(our_times)})")
    print(f"reference: median {reference_median:.3f} s ({seconds(reference_times)})")
    return ours_median / reference_median


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------

CHILD = """
import resource, sys
sys.path.insert(0, {repo!r})
import neural_style_transfer
status = neural_style_transfer.main({argv!r})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak_bytes = peak if sys.platform == "darwin" else peak * 1024
device = 0
import keras
if keras.backend.backend() == "torch":
    import torch
    if torch.cuda.is_available():
        device = torch.cuda.max_memory_allocated()
print("PEAK", status, peak_bytes, device)
"""


def measure_memory(size, optimizer, folder, backend_name):
    from common.images import load_image, resize, save_image

    content = folder / f"cat_{size}.png"
    if not content.exists():
        cat = load_image(CONTENT).pixels
        import neural_style_transfer as nst

        save_image(resize(cat, nst.long_side_size(cat.shape[:2], size)), content)
    argv = [
        "--weights_root",
        str(WEIGHTS),
        str(content),
        str(STYLE),
        str(folder / f"out_{size}_{optimizer}"),
        "--max_size",
        str(size),
        "--iter",
        "2",
        "--optimizer",
        optimizer,
        "--backend",
        backend_name,
    ]
    code = CHILD.format(repo=str(REPO), argv=argv)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PEAK")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"memory run failed:\n{done.stderr[-2000:]}")
    _, status, host, device = lines[-1].split()
    return int(host), int(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory_sizes", default="512,1024")
    parser.add_argument("--backend", choices=backend.BACKENDS, default=None)
    args = parser.parse_args(argv)

    choice = backend.select_backend(args.backend)
    report = backend.device_report()
    print(f"backend {choice.name}, device {report.summary()}")

    with tempfile.TemporaryDirectory() as temporary:
        for size in (int(side) for side in args.memory_sizes.split(",") if side):
            for optimizer in ("lbfgs", "adam"):
                host, device = measure_memory(
                    size, optimizer, Path(temporary), choice.name
                )
                extra = f", device peak {device / 2**20:.0f} MiB" if device else ""
                print(
                    f"memory {optimizer} at {size}: peak RSS "
                    f"{host / 2**20:.0f} MiB{extra}"
                )

    ratio = compare_speed(args.size, args.repeats)
    print(f"one loss-and-gradient evaluation at {args.size}: ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
