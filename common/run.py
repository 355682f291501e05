"""What the image optimisers share: result names, progress, saves, early stops.

``deep_dream.py`` and ``neural_style_transfer.py`` both improve one image step
by step. This module holds what they have in common:

- Result names. :func:`result_path` turns the ``<prefix>`` a user types into
  ``<prefix>.png`` (a prefix that already ends in an image extension is used as
  is); :func:`iteration_path` gives ``<prefix>_at_iteration_N.png``.
- :class:`Run`, the companion of an optimisation loop. It counts steps with one
  count across octaves, scales and frames, draws the one progress bar (tqdm)
  with the loss parts the loop hands it, writes ``<prefix>_at_iteration_N.png``
  every ``save_every`` steps, and, used as a context manager, turns Ctrl+C or a
  non-finite loss into a saved image and a :class:`RunStopped` error. The
  finished ``<prefix>.png`` is written only by :meth:`Run.finish`, so an
  interrupted or failed run never replaces an earlier finished result.
- :func:`script_errors`, which wraps a script's ``main`` so that every expected
  failure becomes one line on stderr and a non-zero exit status.

Unlike the rest of ``common/``, this module writes to the terminal: the
progress bar and the lines :meth:`Run.write` prints (through ``tqdm.write``, so
they do not break the bar) are the scripts' progress report, kept in one place.
Images are ``pixels: float32 (height, width, 3), RGB, 0..255`` as everywhere.
"""

import functools
import os
import secrets
import sys
from pathlib import Path

from tqdm import tqdm

from common.backend import NonFiniteError
from common.images import SAVE_FORMATS, folder_error_reason, save_image

IMAGE_EXTENSIONS = tuple(SAVE_FORMATS)  # .png, .jpg, .jpeg, .webp, .tif, .tiff

# Exit statuses of the scripts: 1 for a failure, 130 (128 + SIGINT) for Ctrl+C.
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class RunStopped(RuntimeError):
    """A run ended before its last step; the message says why and what was saved.

    ``exit_code`` is the status the script should exit with; ``saved`` is the
    path of the image kept, or ``None`` when there was none to keep.
    """

    def __init__(self, message, *, exit_code=EXIT_FAILURE, saved=None):
        super().__init__(message)
        self.exit_code = exit_code
        self.saved = saved


# ---------------------------------------------------------------------------
# Result names
# ---------------------------------------------------------------------------


def result_path(prefix):
    """The finished result's path: ``<prefix>.png``, or ``prefix`` itself if it
    already ends in an image extension (``.png``, ``.jpg``, ...; any case).

    A prefix ending in another image format's extension (``.gif``, ``.bmp``,
    ...) is a ``ValueError``: ``dream.gif`` must not quietly become
    ``dream.gif.png``.
    """
    prefix = Path(prefix)
    suffix = prefix.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return prefix
    if suffix in _other_image_extensions():
        raise ValueError(
            f"{prefix}: cannot write {suffix} images; end the name in "
            f"{', '.join(IMAGE_EXTENSIONS)}, or leave the extension off for .png"
        )
    # Not with_suffix: "ninja.dream" means "ninja.dream.png", not "ninja.png".
    return prefix.with_name(prefix.name + ".png")


def _other_image_extensions():
    from PIL import Image

    return set(Image.registered_extensions()) - set(IMAGE_EXTENSIONS)


def iteration_path(prefix, iteration):
    """``<prefix>_at_iteration_N.png``, keeping the extension ``prefix`` names."""
    final = result_path(prefix)
    return final.with_name(f"{final.stem}_at_iteration_{iteration}{final.suffix}")


def check_writable(path):
    """Make sure an image can be written at ``path`` before any long work starts.

    Creates the folder if it is missing, then writes and removes a small probe
    file there. Raises ``OSError`` with one line naming the folder if either
    fails, or if ``path`` is an existing folder.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give a file name or prefix")
    folder = path.parent
    probe = folder / f".{path.name}.{secrets.token_hex(4)}.probe"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "xb"):
            pass
        os.remove(probe)
    except OSError as error:
        reason = folder_error_reason(folder, error)
        raise OSError(f"{path}: cannot write in {folder} ({reason})") from error
    return path


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class Run:
    """Step counting, progress, intermediate saves and early stops for one loop.

    ``prefix``: what the user typed for the output (see :func:`result_path`).
    ``total_steps``: the steps the whole run will take, over every octave, scale
    and frame. ``save_every``: write ``<prefix>_at_iteration_N.png`` every that
    many steps (0: never). ``metadata``: str -> str, the run's parameters for
    the PNG text chunk of every image written. ``quiet``: no progress bar.

    The loop calls :meth:`step` once per optimisation step with a callable that
    returns the current image (so the device-to-host copy happens only when an
    image is saved) and the loss parts to show. Use it in a ``with`` block: a
    ``KeyboardInterrupt`` or :class:`~common.backend.NonFiniteError` inside it
    saves the last image handed to :meth:`step` (or :meth:`track`) as
    ``<prefix>_at_iteration_N.png`` and leaves as :class:`RunStopped`.
    Example::

        with Run("dream", total_steps=60, save_every=10, metadata=params) as run:
            for octave in ...:
                run.track(lambda: to_numpy(image)[0], octave=f"{octave}/{count}")
                for _ in range(iterations):
                    image = ...
                    run.step(lambda: to_numpy(image)[0], loss=float(loss))
            run.finish(to_numpy(image)[0])
    """

    def __init__(
        self, prefix, total_steps, *, save_every=0, metadata=None, quiet=False
    ):
        self.prefix = Path(prefix)
        self.total_steps = int(total_steps)
        self.save_every = int(save_every)
        self.metadata = dict(metadata or {})
        self.iteration = 0
        self.saved = []
        self._current = None
        self._labels = {}
        self._bar = tqdm(
            total=self.total_steps,
            unit="step",
            disable=quiet,
            dynamic_ncols=True,
            file=sys.stderr,
        )

    @property
    def result(self):
        """Where :meth:`finish` writes: ``<prefix>.png`` (see :func:`result_path`)."""
        return result_path(self.prefix)

    def write(self, text):
        """Print a line to stdout above the progress bar without breaking it."""
        tqdm.write(str(text), file=sys.stdout)

    def track(self, current_image, **labels):
        """Say what the current image is without taking a step (e.g. a new octave).

        ``current_image`` is a callable returning ``float32 (height, width, 3),
        RGB, 0..255``; ``labels`` (e.g. ``octave="2/4"``) are shown on the bar
        until changed.
        """
        self._current = current_image
        self._labels.update({key: str(value) for key, value in labels.items()})
        self._show({})

    def step(self, current_image, **losses):
        """Count one finished step; ``current_image`` is the image after it.

        ``losses`` are numbers shown on the bar (e.g. ``loss=12.5``). Saves
        ``<prefix>_at_iteration_N.png`` when ``N`` is a multiple of
        ``save_every`` and not the last step (:meth:`finish` writes that one).
        """
        self._current = current_image
        self.iteration += 1
        self._show(losses)
        self._bar.update(1)
        due = self.save_every and self.iteration % self.save_every == 0
        if due and self.iteration < self.total_steps:
            path = self.save_snapshot(current_image())
            self.write(f"saved {path}")

    def skip(self, steps):
        """Drop ``steps`` planned steps that will not be taken (a stage ended
        early); the bar's total shrinks, the count of steps taken is unchanged."""
        self.total_steps -= int(steps)
        self._bar.total = self.total_steps
        self._bar.refresh()

    def save_snapshot(self, pixels):
        """Write ``pixels`` as ``<prefix>_at_iteration_N.png`` for the current N."""
        path = iteration_path(self.prefix, self.iteration)
        metadata = {**self.metadata, "iteration": str(self.iteration)}
        save_image(pixels, path, metadata=metadata)
        self.saved.append(path)
        return path

    def finish(self, pixels):
        """Close the bar and write the finished result; returns its path."""
        self.close()
        path = save_image(pixels, self.result, metadata=self.metadata)
        self.saved.append(path)
        return path

    def close(self):
        self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self.close()
        if isinstance(error, KeyboardInterrupt):
            saved = self._keep_current()
            raise RunStopped(
                f"interrupted at iteration {self.iteration} of {self.total_steps}; "
                f"{self._kept_words(saved)}",
                exit_code=EXIT_INTERRUPTED,
                saved=saved,
            ) from error
        if isinstance(error, NonFiniteError):
            saved = self._keep_current()
            raise RunStopped(
                f"stopped after iteration {self.iteration} of {self.total_steps}: "
                f"{error}; {self._kept_words(saved, 'the last good image')}",
                saved=saved,
            ) from error
        return False

    def _keep_current(self):
        """Save the image last handed in, or return ``None`` if there is none or
        it cannot be saved (a second failure must not hide the first)."""
        if self._current is None:
            return None
        try:
            return self.save_snapshot(self._current())
        except (ValueError, OSError):
            return None

    def _kept_words(self, saved, what="the current image"):
        if saved is None:
            return f"no image to keep; {self.result} is unchanged"
        return f"{what} is saved as {saved}"

    def _show(self, losses):
        parts = dict(self._labels)
        parts.update({key: f"{float(value):.4g}" for key, value in losses.items()})
        self._bar.set_postfix(parts, refresh=False)


# ---------------------------------------------------------------------------
# Errors to exit statuses
# ---------------------------------------------------------------------------

# What a user's input or machine can cause: bad files and values (ValueError
# covers ImageError and WeightsError), paths (OSError), memory, numbers.
EXPECTED_ERRORS = (ValueError, OSError, MemoryError, FloatingPointError)


def fail(message, program=None, exit_code=EXIT_FAILURE):
    """Print ``<program>: error: <message>`` on stderr; return ``exit_code``."""
    program = program or Path(sys.argv[0]).name
    print(f"{program}: error: {message}", file=sys.stderr)
    return exit_code


def script_errors(program):
    """Decorate a script's ``main`` so expected failures exit with one line.

    :class:`RunStopped` exits with its own status, Ctrl+C outside a run with
    130, and :data:`EXPECTED_ERRORS` with 1; anything else is a bug and keeps
    its traceback. ``main``'s own return value is passed through.
    """

    def decorate(main):
        @functools.wraps(main)
        def wrapped(argv=None):
            try:
                return main(argv)
            except RunStopped as error:
                return fail(error, program, error.exit_code)
            except KeyboardInterrupt:
                return fail("interrupted; nothing saved", program, EXIT_INTERRUPTED)
            except EXPECTED_ERRORS as error:
                return fail(_one_line(error), program)

        return wrapped

    return decorate


def _one_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------
# Download progress
# ---------------------------------------------------------------------------


class DownloadBar:
    """A ``progress(done_bytes, total_bytes_or_None)`` callback for downloads.

    The bar appears with the first call, so nothing is drawn when nothing is
    downloaded, and starts over when the next mirror does. Use it as a context
    manager, or call :meth:`close`.
    """

    def __init__(self, description):
        self.description = description
        self.bar = None

    def __call__(self, done, total):
        if self.bar is None:
            self.bar = tqdm(
                total=total, desc=self.description, unit="B", unit_scale=True
            )
        if done < self.bar.n:  # the next mirror starts over
            self.bar.reset(total=total)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
