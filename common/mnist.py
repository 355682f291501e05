"""The MNIST digits: IDX and npz parsing, validation, finding and fetching.

MNIST (Y. LeCun, C. Cortes, C. J. C. Burges) comes as four IDX files, gzipped
or not. :func:`load_mnist` reads them from a folder, or Keras' ``mnist.npz``,
checks every header and byte count, and compares the SHA-256 of each file's
decompressed bytes with the known ones: compression differs between mirrors,
the decompressed IDX bytes do not. A valid data set that differs from the
canonical one is used as given, with a note saying so.

The project keeps a copy in ``data/mnist`` beside the code, a folder it manages
itself: a missing or corrupt file there is fetched again from the mirrors. A
folder the user names is never changed except to add missing files.

Arrays, all read-write:

- images: uint8 (n, rows, cols), 0..255, 0 is background (28x28 for MNIST)
- labels: uint8 (n,), 0..9
"""

import gzip
import hashlib
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from common.download import DownloadError, download

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "mnist"
NPZ_NAME = "mnist.npz"

# SHA-256 of the decompressed IDX bytes, the same on every mirror.
FILES = {
    "train-images-idx3-ubyte": (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    ),
    "train-labels-idx1-ubyte": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
    ),
    "t10k-images-idx3-ubyte": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
    ),
    "t10k-labels-idx1-ubyte": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
    ),
}
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = FILES

# Base URLs; each serves "<name>.gz". HTTPS first; the original site is last.
MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

NUM_CLASSES = 10
GZIP_MAGIC = b"\x1f\x8b"
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
NPZ_KEYS = {
    "x_train": TRAIN_IMAGES,
    "y_train": TRAIN_LABELS,
    "x_test": TEST_IMAGES,
    "y_test": TEST_LABELS,
}


class MnistError(ValueError):
    """The MNIST data is missing, corrupt or inconsistent; one line naming it."""


@dataclass
class MnistData:
    """The four arrays and where they came from.

    x_train, x_test: uint8 (n, rows, cols), 0..255, 0 is background
    y_train, y_test: uint8 (n,), 0..9
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    canonical: bool  # all four match the known SHA-256
    source: str  # the folder or the npz file read
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- IDX files


def read_idx(path):
    """Read an IDX file of unsigned bytes, gzipped or not.

    Returns images as uint8 (n, rows, cols) or labels as uint8 (n,), 0..9.
    Gzip is recognised by its magic bytes, not the file name. Raises
    :class:`MnistError` naming the file when it is unreadable, has another
    magic number, is short or has trailing bytes, or holds a label above 9.
    """
    return _read_idx(Path(path))[0]


def _read_idx(path, where=None):
    """Return the array and the SHA-256 of the decompressed bytes."""
    where = where or str(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise MnistError(f"cannot read {where}: {error.strerror or error}") from error
    if data[:2] == GZIP_MAGIC:
        data = _gunzip(data, where)
    return _parse_idx(data, where), hashlib.sha256(data).hexdigest()


def _gunzip(data, where):
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        # EOFError is what a truncated download looks like.
        reason = "it is truncated" if isinstance(error, EOFError) else error
        raise MnistError(f"{where} is not a readable gzip file: {reason}") from error


def _parse_idx(data, where):
    if len(data) < 4:
        raise MnistError(f"{where} is too short for an IDX header ({len(data)} bytes)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic >> 16 != 0:
        raise MnistError(
            f"{where} is not an IDX file: magic number 0x{magic:08x}, expected "
            f"0x{IMAGES_MAGIC:08x} (images) or 0x{LABELS_MAGIC:08x} (labels)"
        )
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise MnistError(
            f"{where} holds IDX data type 0x{dtype_code:02x}; expected 0x08 "
            "(unsigned bytes)"
        )
    if ndim not in (1, 3):
        raise MnistError(
            f"{where} has {ndim} dimensions (magic number 0x{magic:08x}); "
            "expected 3 for images or 1 for labels"
        )

    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise MnistError(f"{where} is too short for its {ndim}-dimension header")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    needed = int(np.prod(shape, dtype=np.int64))
    present = len(data) - header_size
    if present != needed:
        what = "short" if present < needed else "has trailing bytes"
        raise MnistError(
            f"{where} {what}: shape {shape} needs {needed} data bytes, "
            f"it holds {present}"
        )
    if 0 in shape:
        raise MnistError(f"{where} is empty: shape {shape}")

    array = np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)
    if ndim == 1:
        _check_labels(array, where)
    return array.copy()


def _check_labels(labels, where):
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        index = int(bad[0])
        raise MnistError(
            f"{where} holds label {int(labels[index])} at index {index}; "
            f"labels must be 0..{NUM_CLASSES - 1}"
        )


def _idx_sha256(array):
    """SHA-256 of ``array`` written as an IDX file, to compare with FILES."""
    magic = IMAGES_MAGIC if array.ndim == 3 else LABELS_MAGIC
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    digest = hashlib.sha256(header)
    digest.update(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------- npz file


def read_npz(path):
    """Read Keras' ``mnist.npz``: keys x_train, y_train, x_test, y_test.

    Returns a dict of those four arrays: images uint8 (n, rows, cols), labels
    uint8 (n,), 0..9 (labels of another integer type are converted). Pickled
    content is refused. Raises :class:`MnistError` naming the file and the key.
    """
    path = Path(path)
    try:
        arrays = _load_npz_arrays(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        if isinstance(error, MnistError):
            raise
        raise MnistError(
            f"cannot read {path} as an npz file of arrays: {_one_line(error)}"
        ) from error

    for key in ("x_train", "x_test"):
        arrays[key] = _check_npz_images(arrays[key], f"{path} [{key}]")
    for key in ("y_train", "y_test"):
        arrays[key] = _check_npz_labels(arrays[key], f"{path} [{key}]")
    return arrays


def _load_npz_arrays(path):
    # The file is opened here so that it is closed even when numpy fails.
    with open(path, "rb") as handle:
        archive = np.load(handle, allow_pickle=False)
        if isinstance(archive, np.ndarray):
            raise MnistError(f"{path} holds a single .npy array, not an npz archive")
        with archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                raise MnistError(
                    f"{path} lacks the key(s) {', '.join(missing)}; expected "
                    f"{', '.join(NPZ_KEYS)}"
                )
            return {key: archive[key] for key in NPZ_KEYS}


def _check_npz_images(images, where):
    if images.dtype != np.uint8 or images.ndim != 3 or 0 in images.shape:
        raise MnistError(
            f"{where} is {images.dtype} {images.shape}; expected uint8 (n, rows, cols)"
        )
    return images


def _check_npz_labels(labels, where):
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise MnistError(
            f"{where} is {labels.dtype} {labels.shape}; expected (n,) integers"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        value = labels.min() if labels.min() < 0 else labels.max()
        raise MnistError(f"{where} holds label {int(value)}; labels must be 0..9")
    return labels.astype(np.uint8)


# ---------------------------------------------------------------- loading


def load_mnist(data_dir=None, *, mirrors=MIRRORS, progress=None, timeout=30.0):
    """Find, check and if needed download MNIST; return :class:`MnistData`.

    Parameters
    ----------
    data_dir : path-like, optional
        None means :data:`DEFAULT_DATA_DIR`, the folder the project manages:
        missing or corrupt files there are downloaded again. Otherwise a
        folder holding the four IDX files (each as ``name`` or ``name.gz``),
        or ``mnist.npz`` if none of them is there, or the path of an npz file.
        Missing files are downloaded into a folder the user names, but a
        corrupt file there is an error and is left untouched.
    mirrors : sequence of str
        Base URLs, each serving ``<name>.gz``; tried in order. Empty: offline.
    progress : callable, optional
        ``progress(filename, done_bytes, total_bytes_or_None)`` while a file
        downloads, ``filename`` being e.g. ``"t10k-labels-idx1-ubyte.gz"``.
    timeout : float
        Seconds to wait for each connection and read.

    Raises :class:`MnistError` (one line) when the data is corrupt or
    inconsistent, or missing and no mirror delivers it; the message names the
    files, their SHA-256 and the folder to put them in.
    """
    managed = data_dir is None
    location = DEFAULT_DATA_DIR if managed else Path(data_dir)

    # An npz file named directly, or the only data in the folder.
    if location.suffix.lower() == ".npz" and not location.is_dir():
        return _load_npz(location)
    if location.exists() and not location.is_dir():
        raise MnistError(
            f"{location} is a file; expected a folder holding the MNIST files "
            "or an .npz file"
        )
    found = {name: _find(location, name) for name in FILES}
    if not any(found.values()) and (location / NPZ_NAME).is_file():
        return _load_npz(location / NPZ_NAME)

    # Read what is there; a corrupt file is fetched again only where we manage.
    notes = []
    arrays, digests = _read_present(found, managed, notes)

    # Fetch what is missing.
    missing = [name for name, path in found.items() if path is None]
    for name in missing:
        arrays[name], digests[name] = _fetch(
            name, location, mirrors, progress, timeout, notes, missing
        )
        _remove_stale(location, name)

    where = {name: path or location / f"{name}.gz" for name, path in found.items()}
    _check_pairs(arrays, where)
    return _mnist_data(arrays, digests, location, notes)


def _read_present(found, managed, notes):
    """Read the files found; forget corrupt ones (in ``found``) if managed."""
    arrays, digests = {}, {}
    for name, path in found.items():
        if path is None:
            continue
        try:
            arrays[name], digests[name] = _read_idx(path)
        except MnistError as error:
            if not managed:
                raise
            notes.append(f"{error}; fetching it again")
            found[name] = None
    return arrays, digests


def _find(folder, name):
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fetch(name, folder, mirrors, progress, timeout, notes, missing):
    """Download ``name.gz`` into ``folder``; return its array and digest."""
    if not mirrors:
        raise MnistError(
            f"{_missing_text(missing, folder)} and no mirror to download from; "
            + _where_to_put(folder)
        )

    checked = {}

    def verify(path):
        # Parsed once here, kept, so the file is not decompressed twice.
        array, digest = _read_idx(path, where=f"{name}.gz")
        if digest != FILES[name]:
            raise MnistError(
                f"{name} decompressed has SHA-256 {digest}, expected {FILES[name]}"
            )
        checked["result"] = array, digest

    urls = [base.rstrip("/") + f"/{name}.gz" for base in mirrors]
    try:
        download(
            urls,
            folder / f"{name}.gz",
            verify=verify,
            progress=None if progress is None else partial(progress, f"{name}.gz"),
            timeout=timeout,
            notes=notes,
        )
    except DownloadError as error:
        raise MnistError(
            f"{_missing_text(missing, folder)}: {error}; " + _where_to_put(folder)
        ) from error
    return checked["result"]


def _remove_stale(folder, name):
    """Drop a corrupt uncompressed copy the fresh ``name.gz`` replaces."""
    stale = folder / name
    if stale.is_file():
        stale.unlink()


def _missing_text(missing, folder):
    return f"MNIST file(s) {', '.join(missing)} missing or corrupt in {folder}"


def _where_to_put(folder):
    listing = ", ".join(f"{name} (SHA-256 {digest})" for name, digest in FILES.items())
    return (
        f"put these four files, gzipped (.gz) or not, in {folder}: {listing}; "
        "the SHA-256 is of the decompressed bytes"
    )


def _check_pairs(arrays, where):
    """Images and labels must pair up; ``where`` maps each name to its source."""
    for images_name, labels_name in (
        (TRAIN_IMAGES, TRAIN_LABELS),
        (TEST_IMAGES, TEST_LABELS),
    ):
        images, labels = arrays[images_name], arrays[labels_name]
        if images.ndim != 3:
            raise MnistError(f"{where[images_name]} holds labels, not images")
        if labels.ndim != 1:
            raise MnistError(f"{where[labels_name]} holds images, not labels")
        if len(images) != len(labels):
            raise MnistError(
                f"{where[images_name]} has {len(images)} images but "
                f"{where[labels_name]} has {len(labels)} labels"
            )
    train_size = "x".join(map(str, arrays[TRAIN_IMAGES].shape[1:]))
    test_size = "x".join(map(str, arrays[TEST_IMAGES].shape[1:]))
    if train_size != test_size:
        raise MnistError(
            f"{where[TRAIN_IMAGES]} has {train_size} images but "
            f"{where[TEST_IMAGES]} has {test_size} images; both must be the same size"
        )


def _mnist_data(arrays, digests, source, notes):
    """The checked arrays as MnistData, with a note if they are not canonical."""
    canonical = all(digests[name] == FILES[name] for name in FILES)
    if not canonical:
        notes.append(_not_canonical_note(source, digests))
    return MnistData(
        x_train=arrays[TRAIN_IMAGES],
        y_train=arrays[TRAIN_LABELS],
        x_test=arrays[TEST_IMAGES],
        y_test=arrays[TEST_LABELS],
        canonical=canonical,
        source=str(source),
        notes=notes,
    )


def _not_canonical_note(location, digests):
    differ = [name for name in FILES if digests[name] != FILES[name]]
    return (
        f"the data in {location} is not the canonical MNIST (checksums differ for "
        f"{', '.join(differ)}); using it as given"
    )


def _load_npz(path):
    if not path.is_file():
        raise MnistError(f"no such npz file: {path}")
    arrays = {NPZ_KEYS[key]: value for key, value in read_npz(path).items()}
    _check_pairs(arrays, {name: f"{path} [{key}]" for key, name in NPZ_KEYS.items()})
    digests = {name: _idx_sha256(array) for name, array in arrays.items()}
    return _mnist_data(arrays, digests, path, [])


def _one_line(value):
    return " ".join(str(value).split()) or type(value).__name__
