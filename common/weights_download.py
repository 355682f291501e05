"""Fetching the official Keras VGG16 weights (no top) into a weights folder.

The file is the Keras Applications ImageNet VGG16 without its dense top,
``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` (58,889,256 bytes). It
is downloaded with :func:`common.download.download`: to a temporary name
beside the destination, checked against the MD5 Keras publishes and read as
VGG16, and only then renamed into place. A file already there with that MD5 is
kept and nothing is fetched. Nothing here prints; progress goes to a callback.
"""

from pathlib import Path

from common import vgg16
from common.download import DownloadError, download

FILE_NAME = vgg16.PREFERRED_FILES[0]
URLS = (vgg16.KERAS_NOTOP_URL,)
MD5 = vgg16.KERAS_NOTOP_MD5


def download_keras_notop(folder, *, urls=None, md5=None, progress=None, notes=None):
    """Make sure ``folder`` holds the verified Keras notop file; return its path.

    ``urls`` and ``md5`` default to :data:`URLS` and :data:`MD5` (looked up at
    call time). ``progress(done_bytes, total_bytes_or_None)`` is called as the
    file arrives. ``notes``, a list, receives one line per thing done (file
    already there, each mirror that failed, where the file came from).
    Raises :class:`common.download.DownloadError` (an ``OSError``) with one
    line when every mirror fails or the folder cannot be written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DownloadError(
            f"{folder}: is a file; weights are downloaded into a folder"
        )
    destination = folder / FILE_NAME
    md5 = md5 or MD5
    notes = [] if notes is None else notes

    if destination.is_file() and vgg16.file_digest(destination, "md5") == md5:
        notes.append(f"{destination} is already there (MD5 verified)")
        return destination
    return download(
        urls or URLS,
        destination,
        md5=md5,
        verify=_check_vgg16,
        progress=progress,
        notes=notes,
    )


def _check_vgg16(path):
    """Refuse (ValueError) a download that is not Keras VGG16 weights."""
    try:
        vgg16.load_weights(path, "keras-tf")
    except vgg16.WeightsError as error:
        # Its temporary name would mean nothing to the user.
        reason = str(error).removeprefix(f"{path}: ")
        raise ValueError(f"not the Keras VGG16 file: {reason}") from None
