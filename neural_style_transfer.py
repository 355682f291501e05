"""Neural style transfer: repaint a content image in the style of others.

The method of Gatys, Ecker and Bethge (2015, "A Neural Algorithm of Artistic
Style", arXiv:1508.06576): start from an image and change its pixels so that
VGG16's features at one deep layer match the content image's (content loss),
the Gram matrices of its features at several layers match the style images'
(style loss: which features occur together, wherever they are), and nearby
pixels stay alike (total variation). L-BFGS (through SciPy, as in the paper)
or Adam does the optimising; the gradient with respect to the image is
computed on the device. Several style images blend by weight; --scales works
coarse to fine; --original_colors keeps the content's colours (Gatys et al.
2016, "Preserving Color in Neural Artistic Style Transfer").

usage: python neural_style_transfer.py --weights_root DIR content.png style.png
       [style2.png ...] result_prefix

writes <result_prefix>.png (and <result_prefix>_at_iteration_N.png with
--save_every or when stopped early).
"""

import argparse
import math
import sys

import numpy as np

from common import backend, cli, run, vgg16
from common.images import fit_size, load_image, montage, resize, save_image

PROGRAM = "neural_style_transfer.py"

DEFAULT_MAX_SIZE = 320
DEFAULT_ITERATIONS = 100
DEFAULT_CONTENT_LAYER = "block4_conv2"
DEFAULT_STYLE_LAYERS = (
    "block1_conv1",
    "block2_conv1",
    "block3_conv1",
    "block4_conv1",
    "block5_conv1",
)
OPTIMIZERS = ("lbfgs", "adam")
INITS = ("content", "noise", "style")

# How often (in iterations) the bar's content, style and tv parts are
# recomputed: they cost an extra forward pass, the total comes free.
PARTS_EVERY = 10

# L-BFGS stops when the loss changes by less than this fraction in one
# iteration (SciPy's default); the gradient test is off because the loss scale
# says nothing about how finished a picture is.
LBFGS_FTOL = 2.2e-9
# A loss that changes by less than this fraction over this many iterations has
# stopped moving, and the run says so.
STALL_TOLERANCE = 1e-5
STALL_WINDOW = 10
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8
PART_NAMES = ("content", "style", "tv")
# Pixels high of the --montage sheet: large enough to see strokes, small on disk.
MONTAGE_HEIGHT = 200

# NTSC YIQ from RGB: Y is the luminance that --original_colors styles, I and Q
# the colour it takes from the content image.
RGB_TO_YIQ = np.array(
    [
        [0.299, 0.587, 0.114],
        [0.595716, -0.274453, -0.321263],
        [0.211456, -0.522591, 0.311135],
    ],
    dtype=np.float32,
)
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ).astype(np.float32)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def comma_separated_floats(text):
    """Comma-separated numbers >= 0, e.g. ``0.7,0.3``."""
    return tuple(cli.non_negative_float(part) for part in text.split(",") if part)


def comma_separated_sizes(text):
    """Comma-separated long sides in pixels, increasing, e.g. ``256,512``."""
    sizes = tuple(cli.positive_int(part) for part in text.split(",") if part)
    if not sizes:
        raise argparse.ArgumentTypeError(f"expected sizes like 256,512, got {text!r}")
    if list(sizes) != sorted(sizes):
        raise argparse.ArgumentTypeError(
            f"scales go coarse to fine, so they must increase; got {text}"
        )
    return sizes


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=cli.HelpFormatter
    )
    parser.add_argument("content", help="the image to repaint")
    parser.add_argument("style", nargs="+", help="one or more style images")
    parser.add_argument(
        "result_prefix",
        help="where to write: <result_prefix>.png, or the name itself if it ends "
        "in an image extension (.png, .jpg, .webp, .tif)",
    )
    parser.add_argument(
        "--iter",
        "--iterations",
        dest="iterations",
        type=cli.positive_int,
        default=DEFAULT_ITERATIONS,
        help="optimiser iterations per scale: L-BFGS iterations or Adam steps",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="lbfgs",
        help="L-BFGS (SciPy, one host copy per evaluation) or Adam (all on the device)",
    )
    parser.add_argument(
        "--learning_rate",
        type=cli.positive_float,
        default=2.0,
        help="Adam's step size, in grey levels (0..255)",
    )
    parser.add_argument(
        "--content_weight",
        type=cli.non_negative_float,
        default=1.0,
        help="weight of the content loss (relative squared feature error)",
    )
    parser.add_argument(
        "--style_weight",
        type=cli.non_negative_float,
        default=1000.0,
        help="weight of the style loss (relative squared Gram error, layer mean)",
    )
    parser.add_argument(
        "--tv_weight",
        type=cli.non_negative_float,
        default=10.0,
        help="total variation weight: larger is smoother",
    )
    parser.add_argument(
        "--content_layer",
        type=cli.vgg16_layers,
        default=DEFAULT_CONTENT_LAYER,
        help="the VGG16 layer whose features the result shares with the content",
    )
    parser.add_argument(
        "--style_layers",
        type=cli.vgg16_layers,
        # A string default goes through type= too, and reads well in --help.
        default=", ".join(DEFAULT_STYLE_LAYERS),
        help="comma-separated VGG16 layer names",
    )
    parser.add_argument(
        "--style_blend_weights",
        type=comma_separated_floats,
        default=None,
        help="one weight per style image, comma-separated (equal when not given)",
    )
    parser.add_argument(
        "--style_scale",
        type=cli.positive_float,
        default=1.0,
        help="each style image's long side relative to the result's",
    )
    parser.add_argument(
        "--init",
        choices=INITS,
        default="content",
        help="the starting image: the content image, noise, or the first style",
    )
    parser.add_argument(
        "--init_image",
        default=None,
        help="start from this image instead (e.g. a saved result, to continue)",
    )
    parser.add_argument(
        "--original_colors",
        action="store_true",
        help="keep the content's colours: style only the luminance",
    )
    parser.add_argument(
        "--scales",
        type=comma_separated_sizes,
        default=None,
        help="long sides to work at, coarse to fine, e.g. 256,512 (--iter each; "
        "overrides --max_size)",
    )
    parser.add_argument(
        "--pooling",
        choices=vgg16.POOLINGS,
        default="max",
        help="VGG16's max pooling, or average pooling (smoother, says Gatys et al.)",
    )
    parser.add_argument(
        "--save_every",
        type=cli.non_negative_int,
        default=0,
        help="write <result_prefix>_at_iteration_N.png every N iterations (0: never)",
    )
    parser.add_argument(
        "--montage",
        action="store_true",
        help="also write <result_prefix>_montage.png: content, styles and result",
    )
    cli.add_common_arguments(parser, max_size=DEFAULT_MAX_SIZE)
    return parser


def parse_arguments(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.content_layer) != 1:
        parser.error(
            f"--content_layer takes one layer, got {len(args.content_layer)}: "
            f"{','.join(args.content_layer)}"
        )
    (args.content_layer,) = args.content_layer
    if args.style_blend_weights is None:
        args.style_blend_weights = (1.0,) * len(args.style)
    if len(args.style_blend_weights) != len(args.style):
        parser.error(
            f"--style_blend_weights has {len(args.style_blend_weights)} weights "
            f"for {len(args.style)} style images; give one per style image"
        )
    if sum(args.style_blend_weights) <= 0:
        parser.error("--style_blend_weights are all 0; at least one must be above 0")
    return args


# ---------------------------------------------------------------------------
# Sizes and colours (NumPy, on the host)
# ---------------------------------------------------------------------------


def long_side_size(size, long_side):
    """(height, width) scaled so the long side is ``long_side``; may upscale."""
    height, width = size
    scale = long_side / max(height, width)
    return (max(1, round(height * scale)), max(1, round(width * scale)))


def check_big_enough(size, what, layers):
    """Refuse a (height, width) too small for the deepest of ``layers``."""
    deepest = vgg16.deepest_layer(layers)
    minimum = vgg16.min_input_size(deepest)
    if min(size) < minimum:
        raise ValueError(
            f"{what} is {size[0]}x{size[1]} pixels, too small for {deepest}: "
            f"each side must be at least {minimum} pixels"
        )


def luminance(pixels):
    """float32 (height, width, 3), RGB, 0..255 -> the same, grey: Y in each channel."""
    y = pixels @ RGB_TO_YIQ[0]
    return np.repeat(y[..., None], 3, axis=-1).astype(np.float32)


def match_luminance(style, content):
    """Grey ``style`` with its luminance mean and spread moved to ``content``'s,
    as Gatys et al. (2016) do before luminance-only transfer."""
    style_y, content_y = luminance(style), luminance(content)
    spread = style_y.std() or 1.0
    matched = (style_y - style_y.mean()) * (content_y.std() / spread)
    return np.clip(matched + content_y.mean(), 0.0, 255.0)


def with_colours_of(result, content):
    """``result``'s luminance with ``content``'s I and Q; both RGB 0..255."""
    yiq = content @ RGB_TO_YIQ.T
    yiq[..., 0] = result @ RGB_TO_YIQ[0]
    return np.clip(yiq @ YIQ_TO_RGB.T, 0.0, 255.0)


# ---------------------------------------------------------------------------
# Losses (Keras ops, on the device)
# ---------------------------------------------------------------------------


def gram_matrix(features):
    """``features: float32 (1, height, width, channels)`` -> (channels, channels)
    Gram matrix, divided by height * width * channels.

    Dividing by the number of positions makes it an average, so it does not
    grow with the image; dividing by the channels keeps layers comparable.
    """
    import keras

    _, height, width, channels = keras.ops.shape(features)
    flat = keras.ops.reshape(features, (height * width, channels))
    return keras.ops.matmul(keras.ops.transpose(flat), flat) / (
        height * width * channels
    )


def mean_square(tensor):
    import keras

    return float(backend.to_numpy(keras.ops.mean(keras.ops.square(tensor))))


def content_target(model, layer, content):
    """The content image's features at ``layer`` and their mean square."""
    features = model(backend.to_device(content[None]))[layer]
    # A blank image can give all-zero features; the floor avoids 0 / 0.
    return features, max(mean_square(features), 1e-12)


def style_targets(model, layers, styles, blend_weights):
    """Per layer, the blend of the style images' Gram matrices and its mean square.

    Blending the targets equals blending the style losses: the weighted sum of
    squared distances to several Grams differs from the squared distance to
    their weighted mean only by a constant. Computed once per scale, so the
    style images never pass through the network during optimisation.
    """
    total = sum(blend_weights)
    targets = {}
    for style, weight in zip(styles, blend_weights, strict=True):
        features = model(backend.to_device(style[None]))
        for layer in layers:
            gram = gram_matrix(features[layer]) * (weight / total)
            targets[layer] = gram if layer not in targets else targets[layer] + gram
    return {
        layer: (gram, max(mean_square(gram), 1e-12)) for layer, gram in targets.items()
    }


def total_variation(image):
    """Mean squared difference between neighbouring pixels, in (0..1)^2 units."""
    import keras

    down = image[:, 1:, :, :] - image[:, :-1, :, :]
    right = image[:, :, 1:, :] - image[:, :, :-1, :]
    ops = keras.ops
    return (ops.mean(ops.square(down)) + ops.mean(ops.square(right))) / 255.0**2


def make_loss(model, content_layer, content, style, weights):
    """``(total(image), parts(image))`` for one scale.

    ``content`` is ``(features, mean square)``; ``style`` maps each style layer
    to ``(Gram, mean square)``; ``weights`` is (content, style, tv). Each
    content and style distance is divided by its target's mean square
    (differs from Gatys et al., whose raw sums span orders of magnitude across
    layers and weights files), so every layer counts alike and the default
    weights hold for any image size and any VGG16 file.
    """
    import keras

    ops = keras.ops
    content_features, content_scale = content
    style_layers = list(style)
    content_weight, style_weight, tv_weight = weights

    def parts(image):
        features = model(image)
        content_loss = (
            ops.mean(ops.square(features[content_layer] - content_features))
            / content_scale
        )
        style_loss = 0.0
        for layer in style_layers:
            gram, scale = style[layer]
            distance = ops.mean(ops.square(gram_matrix(features[layer]) - gram))
            style_loss = style_loss + distance / scale
        style_loss = style_loss / len(style_layers)
        return content_loss, style_loss, total_variation(image)

    def total(image):
        content_loss, style_loss, tv_loss = parts(image)
        return (
            content_weight * content_loss
            + style_weight * style_loss
            + tv_weight * tv_loss
        )

    return total, parts


# ---------------------------------------------------------------------------
# Optimisers
# ---------------------------------------------------------------------------


def lbfgs(loss, start, iterations, on_step):
    """Minimise ``loss`` with SciPy's L-BFGS-B, every pixel bounded to 0..255.

    ``start``: float32 (1, height, width, 3), RGB, 0..255, on the host. Each
    evaluation copies the image to the device and the loss and gradient back,
    once each (:func:`common.backend.host_value_and_grad`). ``on_step(pixels,
    device_image, loss)`` is called after every iteration: ``pixels()`` gives
    the image now on the host, ``device_image()`` the image that ``loss`` was
    measured on, on the device (here both are the iteration's result).
    Returns the final image (as ``start``), the number of evaluations, and
    SciPy's words when it stopped before ``iterations``.
    """
    from scipy.optimize import Bounds, minimize

    shape = start.shape
    value_and_grad = backend.host_value_and_grad(loss, shape)
    evaluations = 0

    def counted(x):
        nonlocal evaluations
        evaluations += 1
        return value_and_grad(x)

    def after_iteration(intermediate_result):
        image = intermediate_result.x.reshape(shape).astype(np.float32)
        on_step(
            lambda: image[0],
            lambda: backend.to_device(image),
            float(intermediate_result.fun),
        )

    result = minimize(
        counted,
        start.astype(np.float64).ravel(),
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(0.0, 255.0),
        callback=after_iteration,
        options={"maxiter": iterations, "ftol": LBFGS_FTOL, "gtol": 0.0},
    )
    stopped = None
    if result.nit < iterations:
        stopped = f"L-BFGS ended after {result.nit} iterations ({result.message})"
    return result.x.reshape(shape).astype(np.float32), evaluations, stopped


def adam(loss, start, iterations, learning_rate, on_step):
    """Minimise ``loss`` with Adam; the image, moments and update stay on the device.

    Arguments as :func:`lbfgs` (but ``loss`` is measured before each step),
    plus ``learning_rate`` in grey levels: Adam's
    steps are about that size whatever the loss's scale. After each step the
    image is clipped to 0..255. Only the loss (a scalar) comes to the host per
    step, for the progress bar and the non-finite check.
    """
    import keras

    ops = keras.ops
    step = backend.image_gradient_fn(loss)
    beta1, beta2 = ADAM_BETAS
    image = backend.to_device(start)
    moment1, moment2 = ops.zeros_like(image), ops.zeros_like(image)
    for count in range(1, iterations + 1):
        value, grad = step(image)
        moment1 = beta1 * moment1 + (1.0 - beta1) * grad
        moment2 = beta2 * moment2 + (1.0 - beta2) * ops.square(grad)
        # Bias correction as in Kingma and Ba (2015), folded into the step size.
        step_size = learning_rate * math.sqrt(1.0 - beta2**count) / (1.0 - beta1**count)
        update = step_size * moment1 / (ops.sqrt(moment2) + ADAM_EPSILON)
        previous, image = image, ops.clip(image - update, 0.0, 255.0)
        # The loss is the previous image's, so the parts are computed there too.
        on_step(
            lambda image=image: backend.to_numpy(image)[0],
            lambda previous=previous: previous,
            float(value),
        )
    return backend.to_numpy(image), iterations, None


def stalled(losses):
    """Whether the last :data:`STALL_WINDOW` steps changed the loss by less
    than :data:`STALL_TOLERANCE` of it."""
    if len(losses) <= STALL_WINDOW:
        return False
    earlier, last = losses[-STALL_WINDOW - 1], losses[-1]
    return abs(earlier - last) <= STALL_TOLERANCE * abs(earlier)


# ---------------------------------------------------------------------------
# The program
# ---------------------------------------------------------------------------


def starting_image(args, size, content, styles):
    """The first scale's start: float32 (height, width, 3), RGB, 0..255."""
    if args.init_image is not None:
        loaded = load_image(
            args.init_image, size=size, allow_large=args.allow_large_images
        )
        return loaded.pixels
    if args.init == "noise":
        rng = np.random.default_rng(args.seed)
        return rng.uniform(0.0, 255.0, (*size, 3)).astype(np.float32)
    if args.init == "style":
        return np.clip(resize(styles[0], size), 0.0, 255.0)
    return content


def parameters(args, weights):
    """The run's settings, for the text chunk of every PNG written."""
    settings = {
        "program": PROGRAM,
        "content": str(args.content),
        "style": ", ".join(map(str, args.style)),
        "weights": weights.description,
    }
    for name in (
        "style_blend_weights",
        "iterations",
        "optimizer",
        "content_weight",
        "style_weight",
        "tv_weight",
        "content_layer",
        "style_layers",
        "init",
        "init_image",
        "max_size",
        "scales",
        "style_scale",
        "original_colors",
        "pooling",
        "seed",
    ):
        settings[name] = str(getattr(args, name))
    return settings


def size_text(size):
    return f"{size[0]}x{size[1]}"


def transfer(args, model, content, styles, start, progress):
    """Optimise one scale; returns the result, the evaluations and, when the loss
    stopped moving, a few words on how.

    ``content``, ``styles`` and ``start`` are float32 (height, width, 3), RGB,
    0..255 at this scale. With ``--original_colors`` the network sees only
    their luminance, and every image handed out gets the content's colours.
    """
    colours = content
    if args.original_colors:
        styles = [match_luminance(style, content) for style in styles]
        content, start = luminance(content), luminance(start)

    def coloured(pixels):
        return with_colours_of(pixels, colours) if args.original_colors else pixels

    loss_weights = (args.content_weight, args.style_weight, args.tv_weight)
    loss, parts = make_loss(
        model,
        args.content_layer,
        content_target(model, args.content_layer, content),
        style_targets(model, args.style_layers, styles, args.style_blend_weights),
        loss_weights,
    )

    history = []

    def on_step(pixels, device_image, value):
        history.append(value)
        losses = {"loss": value}
        if (progress.iteration + 1) % PARTS_EVERY == 0:
            values = parts(device_image())
            for name, part, weight in zip(
                PART_NAMES, values, loss_weights, strict=True
            ):
                losses[name] = weight * float(backend.to_numpy(part))
        progress.step(lambda: coloured(pixels()), **losses)

    if args.optimizer == "adam":
        final, evaluations, stopped = adam(
            loss, start[None], args.iterations, args.learning_rate, on_step
        )
    else:
        final, evaluations, stopped = lbfgs(loss, start[None], args.iterations, on_step)
    if stopped is None and stalled(history):
        stopped = f"less than {STALL_TOLERANCE:.0e} of it in {STALL_WINDOW} iterations"
    return coloured(final[0]), evaluations, stopped


@run.script_errors(PROGRAM)
def main(argv=None):
    args = parse_arguments(argv)

    # Backend and device, before anything imports Keras.
    choice = backend.select_backend(args.backend)
    backend.seed_everything(args.seed)
    device = backend.device_report()
    print(
        f"backend: {choice.name} (from {choice.source}), Keras {device.keras_version}"
    )
    for note in choice.notes:
        print(note)
    print(f"device: {device.summary()}")
    if not device.is_gpu:
        print(f"no GPU: {device.why_no_gpu}")

    # Weights (downloaded first with --download_weights).
    notes = []
    with run.DownloadBar("downloading VGG16 weights") as bar:
        weights_path = cli.resolve_weights(args, progress=bar, notes=notes)
    for note in notes:
        print(note)
    weights = vgg16.load_weights(weights_path, args.weights_format)
    print(f"weights: {weights.description}")

    # Images: the content at the largest scale, the styles as they are; the
    # sizes of every scale are decided here so a bad one fails before any work.
    layers = (args.content_layer, *args.style_layers)
    long_sides = args.scales or (args.max_size,)
    content = load_image(
        args.content, max_size=long_sides[-1], allow_large=args.allow_large_images
    )
    styles = [
        load_image(path, allow_large=args.allow_large_images) for path in args.style
    ]
    for note in [*content.notes, *(note for style in styles for note in style.notes)]:
        print(note)
    sizes = [fit_size(content.original_size, side) for side in long_sides]
    if args.scales is None:
        sizes = [content.size]
    style_sizes = []
    for size in sizes:
        check_big_enough(size, f"the result at {max(size)} on the long side", layers)
        side = max(1, round(args.style_scale * max(size)))
        style_sizes.append([long_side_size(style.size, side) for style in styles])
        for style, style_size in zip(styles, style_sizes[-1], strict=True):
            check_big_enough(style_size, f"style image {style.path}", layers)
    output = run.check_writable(run.result_path(args.result_prefix))
    print(
        f"content: {content.path} ({size_text(content.original_size)}); "
        f"result: {' then '.join(map(size_text, sizes))} (height x width)"
    )
    for index, style in enumerate(styles):
        used = " then ".join(size_text(scale[index]) for scale in style_sizes)
        weight = args.style_blend_weights[index] / sum(args.style_blend_weights)
        print(
            f"style: {style.path} ({size_text(style.size)}), used at {used}, "
            f"weight {weight:.3g}"
        )

    # The network: VGG16 up to the deepest layer asked for.
    model = vgg16.build_feature_model(weights, layers, pooling=args.pooling)

    # Optimise, scale by scale; each result, upscaled, starts the next scale.
    progress = run.Run(
        args.result_prefix,
        args.iterations * len(sizes),
        save_every=args.save_every,
        metadata=parameters(args, weights),
    )
    with progress:
        result = None
        for index, (size, style_size) in enumerate(
            zip(sizes, style_sizes, strict=True)
        ):
            content_pixels = resize(content.pixels, size)
            style_pixels = [
                resize(style.pixels, shape)
                for style, shape in zip(styles, style_size, strict=True)
            ]
            if result is None:
                start = starting_image(args, size, content_pixels, style_pixels)
            else:
                start = np.clip(resize(result, size), 0.0, 255.0)
            progress.track(
                lambda start=start: start,
                scale=f"{index + 1}/{len(sizes)} {size_text(size)}",
            )
            with backend.out_of_memory_hint(
                f"at {size_text(size)}", "try a smaller --max_size or --scales"
            ):
                result, evaluations, stopped = transfer(
                    args, model, content_pixels, style_pixels, start, progress
                )
            progress.write(
                f"scale {index + 1}/{len(sizes)} {size_text(size)}: "
                f"{evaluations} loss-and-gradient evaluations"
            )
            if stopped:
                progress.write(f"the loss stopped moving: {stopped}")
        path = progress.finish(result)
    print(f"saved {path}")

    # The montage: content, styles and result at one height.
    if args.montage:
        captions = [f"content: {content.path.name}"]
        captions += [f"style: {style.path.name}" for style in styles]
        captions.append(f"result: {path.name}")
        sheet = montage(
            [content.pixels, *(style.pixels for style in styles), result],
            captions,
            height=MONTAGE_HEIGHT,
        )
        montage_path = output.with_name(f"{output.stem}_montage{output.suffix}")
        print(f"saved {save_image(sheet, montage_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
