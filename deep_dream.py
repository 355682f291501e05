"""DeepDream on the convolution layers of VGG16.

Gradient ascent on the image itself, so that chosen VGG16 layers respond ever
more strongly to it (Mordvintsev, Olah and Tyka, 2015, "Inceptionism: Going
Deeper into Neural Networks"). Each step raises a weighted sum of the mean
squared activations of --layers, ignoring a thin border, and moves the pixels
by --step grey levels on average along the gradient. The image is dreamed from
small to full size in --octaves, putting back at each size the detail lost by
shrinking; every step shifts it randomly (--jitter) and large images are
processed in tiles of one fixed shape (--tile_size), so no seams show and
memory stays bounded. --guide dreams towards the features of another image,
--channels dreams only chosen feature channels, and --zoom_frames feeds each
result back slightly zoomed in, for an animation.

usage: python deep_dream.py --weights_root DIR image.png result_prefix

writes result_prefix.png (a prefix ending in .png, .jpg, ... is used as is).
"""

import argparse
import json
import math
import os
import secrets
import sys
from pathlib import Path

import numpy as np

from common import backend, cli
from common.images import load_image, resize, save_image
from common.run import DownloadBar, Run, check_writable, result_path, script_errors
from common.vgg16 import (
    CONV_LAYERS,
    KERNEL_SHAPES,
    deepest_layer,
    load_weights,
    min_input_size,
)

PROGRAM = "deep_dream.py"
DEFAULT_LAYERS = "block4_conv3:1.0,block5_conv1:0.5"
DEFAULT_OCTAVES = 4
# Long side the dream runs at unless --max_size says otherwise: about two
# minutes with the default settings on a two-core CPU.
DEFAULT_MAX_SIZE = 512
# Feature-map pixels ignored at each edge: zero padding makes them respond to
# the border itself, and the dream would pile up there.
BORDER = 1
# Keeps the step finite when the gradient is zero everywhere.
EPSILON = 1e-8


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def parse_layer_weights(text):
    """``block4_conv3:1.0,block5_conv1`` -> {name: weight}; weight 1 if left out."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition(":")
        name = check_conv_layer(name.strip())
        weights[name] = cli.positive_float(weight) if weight else 1.0
    if not weights:
        raise argparse.ArgumentTypeError("no layer named")
    return weights


def parse_channels(text):
    """``block4_conv3:0,5,9`` -> ("block4_conv3", (0, 5, 9)), checked."""
    name, _, indices = text.partition(":")
    name = check_conv_layer(name.strip())
    count = KERNEL_SHAPES[name][-1]
    try:
        channels = tuple(int(index) for index in indices.split(",") if index.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LAYER:i,j,... with whole numbers, got {text!r}"
        ) from None
    if not channels:
        raise argparse.ArgumentTypeError(
            f"expected LAYER:i,j,... naming channels of {name}, got {text!r}"
        )
    outside = [index for index in channels if not 0 <= index < count]
    if outside:
        raise argparse.ArgumentTypeError(
            f"{name} has {count} channels, 0..{count - 1}; "
            f"got {', '.join(map(str, outside))}"
        )
    return name, tuple(dict.fromkeys(channels))


def check_conv_layer(name):
    if name not in CONV_LAYERS:
        raise argparse.ArgumentTypeError(
            f"unknown convolution layer {name!r}; valid layers: "
            f"{', '.join(CONV_LAYERS)}"
        )
    return name


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=cli.HelpFormatter
    )
    parser.add_argument("image", type=Path, help="the image to dream on")
    parser.add_argument(
        "prefix",
        help="where to write: PREFIX.png, or the name itself if it ends in an "
        "image extension",
    )
    parser.add_argument(
        "--layers",
        type=parse_layer_weights,
        default=DEFAULT_LAYERS,
        help="convolution layers to amplify, LAYER:WEIGHT separated by commas",
    )
    parser.add_argument(
        "--channels",
        type=parse_channels,
        action="append",
        default=[],
        metavar="LAYER:i,j,...",
        help="amplify only these channels of LAYER (repeatable); LAYER joins "
        "--layers with weight 1, and replaces the default --layers",
    )
    parser.add_argument(
        "--iterations",
        "--iter",
        type=cli.positive_int,
        default=10,
        help="gradient steps per octave",
    )
    parser.add_argument(
        "--step",
        type=cli.positive_float,
        default=2.0,
        help="mean change of a pixel per step, in grey levels (0..255)",
    )
    parser.add_argument(
        "--octaves",
        type=cli.positive_int,
        default=None,
        help=f"number of image sizes to dream at, from small to full; when not "
        f"given, {DEFAULT_OCTAVES} or as many as the image and --layers allow",
    )
    parser.add_argument(
        "--octave_scale",
        type=positive_scale,
        default=1.4,
        help="size ratio between one octave and the next",
    )
    parser.add_argument(
        "--max_loss",
        type=cli.non_negative_float,
        default=0.0,
        help="end an octave early once the loss passes this (0: never)",
    )
    parser.add_argument(
        "--jitter",
        type=cli.non_negative_int,
        default=32,
        help="largest random shift of the image per step, in pixels",
    )
    parser.add_argument(
        "--tile_size",
        type=cli.non_negative_int,
        default=512,
        help="compute gradients in tiles of this many pixels square, so memory "
        "stays bounded (0: the whole image at once)",
    )
    parser.add_argument(
        "--save_every",
        type=cli.non_negative_int,
        default=0,
        help="also write PREFIX_at_iteration_N.png every N steps, counted "
        "across octaves and frames (0: never)",
    )
    parser.add_argument(
        "--guide",
        type=Path,
        default=None,
        metavar="IMAGE",
        help="dream towards the features of this image instead of amplifying "
        "whatever is there",
    )
    parser.add_argument(
        "--zoom_frames",
        type=cli.non_negative_int,
        default=0,
        help="dream this many more frames, each from the last one zoomed in by "
        "--zoom; writes PREFIX_frame_NNN.png and PREFIX.gif",
    )
    parser.add_argument(
        "--zoom",
        type=positive_scale,
        default=1.05,
        help="zoom factor between frames",
    )
    cli.add_common_arguments(parser, max_size=DEFAULT_MAX_SIZE)
    return parser


def positive_scale(text):
    """A finite float above 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    # Written so that NaN fails too.
    if not 1 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number above 1, got {text}")
    return value


def objective_layers(layer_weights, channel_choices):
    """The layers to dream and their channels, from --layers and --channels.

    Returns ``(layer_weights, channels)``: {name: weight} and {name: indices}.
    With the default --layers and some --channels, only the channels' layers
    are dreamed; otherwise a --channels layer joins --layers with weight 1.
    """
    channels = {}
    for name, indices in channel_choices:
        channels[name] = tuple(dict.fromkeys(channels.get(name, ()) + indices))
    if not channels:
        return dict(layer_weights), channels
    if layer_weights == parse_layer_weights(DEFAULT_LAYERS):
        layer_weights = {}
    return {**{name: 1.0 for name in channels}, **layer_weights}, channels


# ---------------------------------------------------------------------------
# Octaves
# ---------------------------------------------------------------------------


def octave_shapes(size, octaves, scale):
    """(height, width) of each octave, smallest first, the last one ``size``."""
    height, width = size
    return [
        (max(1, round(height / scale**k)), max(1, round(width / scale**k)))
        for k in reversed(range(octaves))
    ]


def plan_octaves(size, octaves, scale, layer):
    """The octave shapes to dream at, and a note if their count was reduced.

    ``octaves=None`` asks for :data:`DEFAULT_OCTAVES`, reduced to what ``layer``
    (the deepest dreamed) can take; an explicit count that makes an octave
    smaller than that is a ``ValueError`` stating the sizes and the minimum.
    """
    minimum = min_input_size(layer)
    if min(size) < minimum:
        raise ValueError(
            f"the image is {size_text(size)} pixels; {layer} needs at least "
            f"{minimum} on each side"
        )
    wanted = DEFAULT_OCTAVES if octaves is None else octaves
    fitting = max(
        count
        for count in range(1, wanted + 1)
        if min(octave_shapes(size, count, scale)[0]) >= minimum
    )
    shapes = octave_shapes(size, wanted, scale)
    if fitting == wanted:
        return shapes, None
    sizes = ", ".join(map(size_text, shapes))
    if octaves is not None:
        raise ValueError(
            f"--octaves {octaves} with --octave_scale {scale:g} gives octaves of "
            f"{sizes} (height x width), but {layer} needs at least {minimum} "
            f"pixels on each side; use --octaves {fitting} or fewer"
        )
    note = (
        f"{fitting} octaves instead of {wanted}: the smallest would be under the "
        f"{minimum} pixels {layer} needs"
    )
    return octave_shapes(size, fitting, scale), note


def check_tile_size(tile_size, layer):
    """Refuse tiles too small for ``layer`` (0, the whole image, is always fine)."""
    minimum = min_input_size(layer)
    if 0 < tile_size < minimum:
        raise ValueError(
            f"--tile_size {tile_size} is under the {minimum} pixels {layer} needs "
            f"on each side; use --tile_size {minimum} or more, or 0"
        )


def check_guide_size(size, layer):
    minimum = min_input_size(layer)
    if min(size) < minimum:
        raise ValueError(
            f"the guide image is {size_text(size)} pixels; {layer} needs at least "
            f"{minimum} on each side"
        )


def size_text(size):
    return f"{size[0]}x{size[1]}"


# ---------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------


def dream_loss(model, layer_weights, channels, guide_features=None):
    """``loss(image)``: the weighted objective to raise, on backend tensors.

    ``image: float32 (1, height, width, 3), RGB, 0..255``. Per layer the term is
    the mean squared activation, or with ``guide_features`` ({name: (positions,
    channels)}) the mean over positions of the best match with the guide.
    """
    import keras

    def loss(image):
        features = model(image)
        total = 0.0
        for name, weight in layer_weights.items():
            activations = crop_border(select_channels(features[name], channels, name))
            if guide_features is None:
                term = keras.ops.mean(keras.ops.square(activations))
            else:
                term = guided_term(activations, guide_features[name])
            total = total + weight * term
        return total

    return loss


def select_channels(activations, channels, name):
    import keras

    if name not in channels:
        return activations
    return keras.ops.take(activations, list(channels[name]), axis=-1)


def crop_border(activations):
    """Drop :data:`BORDER` feature pixels at each edge, where there is room."""
    height, width = activations.shape[1], activations.shape[2]
    top = BORDER if height > 2 * BORDER else 0
    left = BORDER if width > 2 * BORDER else 0
    return activations[:, top : height - top, left : width - left, :]


def guided_term(activations, guide):
    """Mean over image positions of the best dot product with a guide position.

    As in the DeepDream notebook's guided dream: its gradient at each position
    is the guide's feature vector that position already resembles most.
    Divided by the channel count so it is on the scale of a mean square.
    """
    import keras

    channels = activations.shape[-1]
    flat = keras.ops.reshape(activations, (-1, channels))  # (positions, channels)
    scores = keras.ops.matmul(flat, keras.ops.transpose(guide))
    return keras.ops.mean(keras.ops.max(scores, axis=1)) / channels


def guide_features(model, pixels, layer_weights, channels):
    """{name: float32 (positions, channels)} of the guide image, on the device."""
    import keras

    features = model(backend.to_device(pixels[None]))
    return {
        name: keras.ops.reshape(
            select_channels(features[name], channels, name),
            (-1, len(channels[name]) if name in channels else KERNEL_SHAPES[name][-1]),
        )
        for name in layer_weights
    }


# ---------------------------------------------------------------------------
# Gradient ascent, on the device
# ---------------------------------------------------------------------------


def gradient_function(loss_fn, variables):
    """``step(image) -> (loss, grad)`` on the device; one compilation per shape.

    On JAX the weights are passed to the compiled function as arguments: it
    compiles about twice as fast as with the weights folded in as constants,
    which matters more than the third slower CPU step with one compilation
    per octave (and much more on a GPU, where steps take milliseconds).
    """
    return backend.image_gradient_fn(loss_fn, variables=variables)


def tile_starts(length, tile):
    """Where tiles of ``tile`` pixels start along a side, and where each one's
    own part begins: the last tile is pulled back to end at the edge, and keeps
    only what the one before it did not cover."""
    starts = list(range(0, length - tile, tile)) + [length - tile]
    covered = [0] + [start + tile for start in starts[:-1]]
    return [(start, end - start) for start, end in zip(starts, covered, strict=True)]


def tiled_gradient(gradient_step, image, tile_shape):
    """Loss (mean over tiles) and gradient of the whole image, tile by tile.

    Every tile has ``tile_shape``, so JAX compiles once; only one tile's
    activations are alive at a time, so memory is bounded by the tile size.
    """
    import keras

    height, width = image.shape[1], image.shape[2]
    tile_height, tile_width = tile_shape
    rows, losses = [], []
    for top, keep_top in tile_starts(height, tile_height):
        row = []
        for left, keep_left in tile_starts(width, tile_width):
            tile = image[:, top : top + tile_height, left : left + tile_width, :]
            loss, grad = gradient_step(tile)
            row.append(grad[:, keep_top:, keep_left:, :])
            losses.append(loss)
        rows.append(row[0] if len(row) == 1 else keras.ops.concatenate(row, axis=2))
    grad = rows[0] if len(rows) == 1 else keras.ops.concatenate(rows, axis=1)
    return sum(losses) / len(losses), grad


def ascent_step(gradient_step, image, tile_shape, shift, step):
    """One step: shift, gradient by tiles, shift back, normalise, move, clip."""
    import keras

    # The circular shift moves tile boundaries and the border every step, so
    # neither leaves a mark; it is undone on the gradient.
    shifted = keras.ops.roll(image, shift, axis=(1, 2))
    loss, grad = tiled_gradient(gradient_step, shifted, tile_shape)
    grad = keras.ops.roll(grad, (-shift[0], -shift[1]), axis=(1, 2))
    grad = grad / (keras.ops.mean(keras.ops.abs(grad)) + EPSILON)
    return keras.ops.clip(image + step * grad, 0.0, 255.0), loss


def random_shift(rng, size, tile_shape, jitter):
    """(dy, dx): up to ``jitter`` pixels, plus up to a tile where there are
    several tiles along that side, so tile boundaries fall anywhere."""
    shift = []
    for length, tile in zip(size, tile_shape, strict=True):
        offset = int(rng.integers(-jitter, jitter + 1))
        if length > tile:
            offset += int(rng.integers(0, tile))
        shift.append(offset)
    return tuple(shift)


def dream_octave(pixels, gradient_step, settings, rng, run, label):
    """Dream ``pixels: float32 (height, width, 3), RGB, 0..255`` at its size.

    The image stays on the device for the whole octave; it comes back to the
    host only when ``run`` saves it and at the end.
    """
    size = pixels.shape[:2]
    tile = settings["tile_size"] or max(size)
    tile_shape = (min(tile, size[0]), min(tile, size[1]))
    image = backend.to_device(pixels[None])

    def current():  # the image as it is when called, for saves
        return backend.to_numpy(image)[0]

    run.track(current, octave=label)
    for iteration in range(settings["iterations"]):
        shift = random_shift(rng, size, tile_shape, settings["jitter"])
        image, loss = ascent_step(
            gradient_step, image, tile_shape, shift, settings["step"]
        )
        loss = float(loss)
        run.step(current, loss=loss)
        if settings["max_loss"] and loss > settings["max_loss"]:
            run.skip(settings["iterations"] - iteration - 1)
            break
    return backend.to_numpy(image)[0]


def dream(pixels, shapes, gradient_step, settings, rng, run):
    """All octaves, smallest first, re-injecting the detail lost by shrinking.

    What the dream adds at one octave (the result minus that octave's shrunk
    original) is enlarged and added to the next octave's original, so the
    final image keeps the full-size original's sharpness.
    """
    originals = [np.clip(resize(pixels, shape), 0.0, 255.0) for shape in shapes]
    added = np.zeros_like(originals[0])
    for index, original in enumerate(originals):
        start = np.clip(original + resize(added, original.shape[:2]), 0.0, 255.0)
        label = f"{index + 1}/{len(originals)} {size_text(original.shape[:2])}"
        with backend.out_of_memory_hint(
            f"at {size_text(original.shape[:2])}",
            "try a smaller --tile_size or --max_size",
        ):
            result = dream_octave(start, gradient_step, settings, rng, run, label)
        added = result - original
    return result


# ---------------------------------------------------------------------------
# Zoom frames
# ---------------------------------------------------------------------------


def zoom_in(pixels, factor):
    """The centre 1/``factor`` of the image, enlarged back to its size."""
    height, width = pixels.shape[:2]
    crop_height = max(1, round(height / factor))
    crop_width = max(1, round(width / factor))
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    crop = pixels[top : top + crop_height, left : left + crop_width]
    return np.clip(resize(crop, (height, width)), 0.0, 255.0)


def frame_path(prefix, index, count):
    final = result_path(prefix)
    digits = max(3, len(str(count)))
    return final.with_name(f"{final.stem}_frame_{index:0{digits}d}{final.suffix}")


def save_gif(frames, path, milliseconds=100):
    """``frames``: float32 (height, width, 3), RGB, 0..255 each; written atomically."""
    from PIL import Image

    images = [
        Image.fromarray(np.rint(np.clip(frame, 0, 255)).astype(np.uint8), "RGB")
        for frame in frames
    ]
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            images[0].save(
                file,
                format="GIF",
                save_all=True,
                append_images=images[1:],
                duration=milliseconds,
                loop=0,
            )
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


@script_errors(PROGRAM)
def main(argv=None):
    # Parse the command line, and refuse an unwritable output before any work.
    args = build_parser().parse_args(argv)
    layer_weights, channels = objective_layers(args.layers, args.channels)
    output = check_writable(result_path(args.prefix))

    # Settle the backend before anything imports Keras.
    choice = backend.select_backend(args.backend)
    backend.seed_everything(args.seed)
    device = backend.device_report()
    print(f"backend: {choice.name} (from {choice.source}), {device.summary()}")
    for note in choice.notes:
        print(note)
    if device.why_no_gpu:
        print(f"no GPU: {device.why_no_gpu}")

    # Load the image (and the guide) and plan the octaves.
    loaded = load_image(
        args.image, max_size=args.max_size, allow_large=args.allow_large_images
    )
    for note in loaded.notes:
        print(note)
    if loaded.size != loaded.original_size:
        print(
            f"dreaming at {size_text(loaded.size)} (--max_size {args.max_size}); "
            "pass --max_size 0 for the full size, or a larger --max_size (slower)"
        )
    guide = None
    if args.guide is not None:
        guide = load_image(
            args.guide, max_size=args.max_size, allow_large=args.allow_large_images
        )
        for note in guide.notes:
            print(note)
        check_guide_size(guide.size, deepest_layer(layer_weights))
    check_tile_size(args.tile_size, deepest_layer(layer_weights))
    shapes, note = plan_octaves(
        loaded.size, args.octaves, args.octave_scale, deepest_layer(layer_weights)
    )
    if note:
        print(note)
    print(f"octaves (height x width): {', '.join(map(size_text, shapes))}")
    if args.tile_size and max(shapes[-1]) > args.tile_size:
        print(f"gradients in tiles of at most {args.tile_size} pixels square")

    # Load the weights and build the network up to the deepest dreamed layer.
    from common.vgg16 import build_feature_model

    notes = []
    with DownloadBar("downloading VGG16 weights") as progress:
        weights_path = cli.resolve_weights(args, progress=progress, notes=notes)
    for note in notes:
        print(note)
    weights = load_weights(weights_path, args.weights_format)
    print(f"weights: {weights.description}, from {weights.path}")
    model = build_feature_model(weights, tuple(layer_weights))
    guide_values = None
    if guide is not None:
        guide_values = guide_features(model, guide.pixels, layer_weights, channels)
    gradient_step = gradient_function(
        dream_loss(model, layer_weights, channels, guide_values), model.variables
    )

    # Dream: every octave of the image, then each zoomed frame.
    settings = {
        "iterations": args.iterations,
        "step": args.step,
        "jitter": args.jitter,
        "tile_size": args.tile_size,
        "max_loss": args.max_loss,
    }
    metadata = run_metadata(args, layer_weights, channels, weights, shapes)
    rng = np.random.default_rng(args.seed)
    frame_count = args.zoom_frames + 1
    total_steps = frame_count * len(shapes) * args.iterations
    frames = []
    with Run(
        args.prefix, total_steps, save_every=args.save_every, metadata=metadata
    ) as run:
        pixels = loaded.pixels
        for index in range(frame_count):
            if index:
                pixels = zoom_in(pixels, args.zoom)
            pixels = dream(pixels, shapes, gradient_step, settings, rng, run)
            if args.zoom_frames:
                frames.append(pixels)
                path = frame_path(args.prefix, index, frame_count)
                run.write(f"frame {index + 1}/{frame_count}: {path}")
                save_image(pixels, path, metadata=metadata)

        # Save: the finished image replaces an earlier result only now.
        written = run.finish(pixels)
    print(f"saved {written}")
    if frames:
        gif = save_gif(frames, output.with_suffix(".gif"))
        print(f"saved {gif} ({len(frames)} frames)")
    return 0


def run_metadata(args, layer_weights, channels, weights, shapes):
    """The run's parameters, for the PNG text chunk of every image written."""
    parameters = {
        "image": str(args.image),
        "layers": layer_weights,
        "channels": {name: list(indices) for name, indices in channels.items()},
        "guide": None if args.guide is None else str(args.guide),
        "octaves": [list(shape) for shape in shapes],
        "octave_scale": args.octave_scale,
        "iterations": args.iterations,
        "step": args.step,
        "jitter": args.jitter,
        "tile_size": args.tile_size,
        "max_loss": args.max_loss,
        "zoom_frames": args.zoom_frames,
        "zoom": args.zoom,
        "seed": args.seed,
        "weights": weights.description,
    }
    return {"Software": PROGRAM, "Parameters": json.dumps(parameters)}


if __name__ == "__main__":
    sys.exit(main())
