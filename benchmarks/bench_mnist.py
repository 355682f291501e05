"""MNIST training speed: mnist.py's training code against a plain PyTorch loop.

Both train the same architecture (Lasagne's ``mlp`` and ``cnn``) with Adam at the
same batch size on the same real MNIST samples, in one process, alternating, on
the same number of threads, after a warm-up run each. Each timed run is one pass
over ``--samples`` training images. Prints samples per second for both and the
median ratio per model; the last line ends with ``ratio=R``, the worse of the two
models (our median time over the plain PyTorch median time). Both follow the
same warm-up and cosine learning-rate schedule. A shared machine's speed can
drift by 10-20% within seconds; many short alternating runs keep the ratio
steadier than a few long ones.

usage: python benchmarks/bench_mnist.py [--samples N] [--repeats K]
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import backend  # noqa: E402


def plain_torch_model(kind):
    """The same network as mnist.build_model, in plain PyTorch (channels-last)."""
    from torch import nn

    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(32 * 4 * 4, 256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(256, 10),
        )
    return nn.Sequential(
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(784, 800),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(800, 800),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(800, 10),
        # Softmax and cross-entropy are fused into the loss below.
    )


def warmup_cosine(steps):
    """The learning-rate factor of mnist.compile_model's schedule, for LambdaLR."""
    warmup = max(1, min(steps // 20, 500))
    decay = max(1, steps - warmup)

    def factor(step):
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        progress = min(step - warmup, decay) / decay
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def plain_torch_epoch(model, optimizer, scheduler, images, labels, batch_size):
    """One shuffled pass, the way a PyTorch user writes it."""
    import torch
    import torch.nn.functional as functional

    model.train()
    order = torch.randperm(len(images))
    for start in range(0, len(images), batch_size):
        batch = order[start : start + batch_size]
        loss = functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return float(loss.detach())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--batch_size", type=int, default=None, help="default: mnist.py's"
    )
    parser.add_argument("--models", default="mlp,cnn")
    args = parser.parse_args(argv)

    choice = backend.select_backend()
    import numpy as np
    import torch

    import mnist
    from common.mnist import load_mnist

    batch_size = args.batch_size or mnist.DEFAULT_BATCH_SIZE

    data = load_mnist()
    x = mnist.as_inputs(data.x_train[: args.samples])
    y = data.y_train[: args.samples]
    x_torch = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    y_torch = torch.from_numpy(y.astype(np.int64))
    print(
        f"backend {choice.name}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.samples} samples per run, "
        f"batch {batch_size}, median of {args.repeats}"
    )

    ratios = {}
    for kind in args.models.split(","):
        spec = mnist.parse_model_spec(kind)
        backend.seed_everything(0)
        ours = mnist.build_model(spec)
        mnist.compile_model(ours, steps=10**6)
        reference = plain_torch_model(kind)
        optimizer = torch.optim.Adam(reference.parameters(), lr=mnist.LEARNING_RATE)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10**6))

        def run_ours(ours=ours):
            mnist.train(ours, x, y, None, 1, batch_size)

        def run_reference(
            reference=reference, optimizer=optimizer, scheduler=scheduler
        ):
            plain_torch_epoch(
                reference, optimizer, scheduler, x_torch, y_torch, batch_size
            )

        times = {"ours": [], "reference": []}
        run_ours()  # warm-up
        run_reference()
        for _ in range(args.repeats):
            for name, function in (("ours", run_ours), ("reference", run_reference)):
                start = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - start)
        ours_median = statistics.median(times["ours"])
        reference_median = statistics.median(times["reference"])
        ratios[kind] = ours_median / reference_median
        print(
            f"{kind}: ours {args.samples / ours_median:,.0f} samples/s "
            f"({ours_median:.3f} s), plain PyTorch "
            f"{args.samples / reference_median:,.0f} samples/s "
            f"({reference_median:.3f} s), ratio {ratios[kind]:.3f}"
        )
    worst = max(ratios, key=ratios.get)
    print(f"worst model {worst} on {choice.name}: ratio={ratios[worst]:.3f}")


if __name__ == "__main__":
    main()
