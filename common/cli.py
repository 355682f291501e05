"""Command-line pieces the image scripts share.

Each ``add_*`` function adds one option to an ``argparse`` parser, with its
one default; the ``type=`` validators turn a bad value into argparse's usual
one-line usage error (exit status 2). Help strings never restate a default:
:class:`HelpFormatter` appends it.

Nothing here imports Keras, so a script can parse its arguments, then call
``common.backend.select_backend(args.backend)``, and only then import Keras
(and build models with ``common.vgg16``).
"""

import argparse
import os
from pathlib import Path

from common.backend import BACKENDS
from common.images import ALLOW_LARGE_FLAG
from common.vgg16 import (
    DEFAULT_WEIGHTS_ROOT,
    WEIGHTS_FORMATS,
    NoWeightsFound,
    check_layers,
    find_weights,
)
from common.weights_download import FILE_NAME, download_keras_notop

# NumPy's legacy seeding, which Keras calls, takes no more than 32 bits.
MAX_SEED = 2**32 - 1


class HelpFormatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Shows each option's default and keeps the module docstring's line breaks.

    A default of None, False or an empty list (an option that is off unless
    given) is left out: the help text says what happens then.
    """

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


class ScriptRelativePath(os.PathLike):
    """A default path beside the scripts: absolute when used, short in ``--help``.

    Pass it through ``Path()`` (or any function taking a path) to use it.
    """

    def __init__(self, path):
        self.path = Path(path)

    def __fspath__(self):
        return os.fspath(self.path)

    def __str__(self):
        return f"{self.path.name}/ beside the scripts"

    def __repr__(self):
        return f"ScriptRelativePath({os.fspath(self.path)!r})"


# ---------------------------------------------------------------------------
# Validators for type=
# ---------------------------------------------------------------------------


def _number(text, convert, kind):
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None


def non_negative_int(text):
    """An int >= 0."""
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def positive_int(text):
    """An int >= 1."""
    value = _number(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def seed(text):
    """An int in 0..2**32 - 1, the range every backend's seeding accepts."""
    value = _number(text, int, "a whole number")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected 0 to {MAX_SEED}, got {value}")
    return value


def positive_float(text):
    """A finite float > 0."""
    value = _number(text, float, "a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def non_negative_float(text):
    """A finite float >= 0."""
    value = _number(text, float, "a number")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected 0 or a number above, got {text}")
    return value


def vgg16_layers(text):
    """Comma-separated VGG16 layer names, e.g. ``block4_conv3,block5_conv1``."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    try:
        return check_layers(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


def add_backend_argument(parser):
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="Keras backend; when not given: KERAS_BACKEND, else keras.json if it "
        "names torch or jax, else torch",
    )


def add_seed_argument(parser):
    parser.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="random seed, for runs that can be repeated",
    )


def add_weights_arguments(parser):
    parser.add_argument(
        "--weights_root",
        type=Path,
        default=ScriptRelativePath(DEFAULT_WEIGHTS_ROOT),
        help="VGG16 weights file, or a folder to look in (see weights/README.md)",
    )
    parser.add_argument(
        "--weights_format",
        choices=WEIGHTS_FORMATS,
        default="auto",
        help="format of the weights file; auto decides by its content",
    )
    parser.add_argument(
        "--download_weights",
        action="store_true",
        help=f"first download the official Keras ImageNet weights ({FILE_NAME}, "
        "59 MB, MD5-checked) into the --weights_root folder, unless already there",
    )


def resolve_weights(args, progress=None, notes=None):
    """The weights file the options name, downloaded first with --download_weights.

    ``args`` needs ``weights_root`` and ``download_weights`` (from
    :func:`add_weights_arguments`). ``progress(done_bytes, total_bytes_or_None)``
    follows a download; ``notes``, a list, receives a line per thing the
    download did. Raises :class:`common.vgg16.WeightsError` (a ``ValueError``)
    or :class:`common.download.DownloadError` (an ``OSError``), one line each.
    """
    root = Path(args.weights_root)
    if args.download_weights:
        download_keras_notop(root, progress=progress, notes=notes)
    try:
        return find_weights(root)
    except NoWeightsFound as error:
        raise NoWeightsFound(f"{error}; or add --download_weights") from None


def add_max_size_argument(parser, default):
    parser.add_argument(
        "--max_size",
        type=non_negative_int,
        default=default,
        help="longest image side in pixels (larger images are scaled down; "
        "0 keeps the original size)",
    )


def add_allow_large_images_argument(parser):
    parser.add_argument(
        ALLOW_LARGE_FLAG,
        action="store_true",
        help="open images past Pillow's decompression-bomb pixel limit",
    )


def add_common_arguments(parser, *, max_size):
    """All the options above; ``max_size`` is the script's own default."""
    add_weights_arguments(parser)
    add_max_size_argument(parser, max_size)
    add_seed_argument(parser)
    add_backend_argument(parser)
    add_allow_large_images_argument(parser)
