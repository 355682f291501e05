"""Verified, atomic downloads over a list of mirrors.

:func:`download` tries each URL in the order given (callers list HTTPS mirrors
first). The body goes to a hidden temporary file beside the destination; only
once its length, its checksums and the caller's own content check have passed
is it renamed over the destination. Whatever goes wrong with one mirror (an
HTTP error, a TLS or connection failure, a timeout, a short body, an HTML page
where a file was expected, a wrong checksum, content the caller rejects) is
noted in a few words and the next mirror is tried. When all of them fail,
:class:`DownloadError` says so on one line with each mirror's reason, and the
destination is as it was before.

Only the standard library's ``urllib`` is used; nothing downloaded is ever
unpickled. This module prints nothing: progress goes to a callback.
"""

import hashlib
import http.client
import os
import socket
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

USER_AGENT = "deep-learning-examples/0.1 (Python urllib)"
CHUNK_SIZE = 1 << 16
SCHEMES = ("https", "http", "file")

# A body that starts like this is a web page (a login portal, a mirror's
# "not found" page served with status 200), never the binary file we asked for.
HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body")


class DownloadError(OSError):
    """A download failed on every mirror, or the file could not be written."""


class _MirrorFailed(Exception):
    """One mirror did not deliver a good file; the message is the short reason."""


def download(
    urls,
    destination,
    *,
    sha256=None,
    md5=None,
    verify=None,
    progress=None,
    timeout=30.0,
    user_agent=USER_AGENT,
    notes=None,
):
    """Fetch a file from the first mirror that delivers it intact.

    Parameters
    ----------
    urls : str or sequence of str
        Mirrors to try, in order; ``https``, ``http`` and ``file`` URLs.
    destination : path-like
        Where the verified file goes. Its folder is created if needed. An
        existing file there is replaced only by a verified download.
    sha256, md5 : str, optional
        Hex digests of the bytes exactly as downloaded (for a ``.gz``, the
        compressed bytes).
    verify : callable, optional
        ``verify(path)`` is called on the complete temporary file and raises
        ``ValueError`` to reject it, e.g. to check decompressed content.
    progress : callable, optional
        ``progress(done_bytes, total_bytes_or_None)`` after each chunk, starting
        at 0 for every mirror tried.
    timeout : float
        Seconds to wait for the connection and for each read.
    user_agent : str
        The ``User-Agent`` header sent with each request.
    notes : list, optional
        Receives one line per mirror that failed and one naming the URL that
        served the file, for the caller to show.

    Returns the destination as a ``Path``. Raises :class:`DownloadError` when
    every mirror fails or the destination folder cannot be written; the
    message is one line. Ctrl+C (``KeyboardInterrupt``) propagates, after the
    temporary file is removed.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("download() needs at least one URL")
    destination = Path(destination)
    expected = {"sha256": sha256, "md5": md5}

    reasons = []
    for url in urls:
        try:
            _download_one(
                url, destination, expected, verify, progress, timeout, user_agent
            )
        except _MirrorFailed as failure:
            reasons.append(f"{url}: {failure}")
            if notes is not None:
                notes.append(
                    f"could not download {destination.name} from {reasons[-1]}"
                )
            continue
        if notes is not None:
            notes.append(f"downloaded {destination.name} from {url}")
        return destination

    which = f"all {len(urls)} mirrors" if len(urls) > 1 else "the mirror"
    raise DownloadError(
        f"could not download {destination.name}: {which} failed: " + "; ".join(reasons)
    )


def _download_one(url, destination, expected, verify, progress, timeout, user_agent):
    """Download ``url`` to a temporary file, check it, move it into place."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise _MirrorFailed(f"unsupported URL scheme {scheme or 'none'!r}")

    temporary = _create_temporary(destination)
    try:
        with open(temporary, "wb") as out:
            digests = _fetch(url, out, progress, timeout, user_agent)
        _check_digests(digests, expected)
        _check_content(verify, temporary)
        os.replace(temporary, destination)
    except BaseException:
        # Every failure, Ctrl+C included, leaves the destination as it was.
        temporary.unlink(missing_ok=True)
        raise


def _create_temporary(destination):
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(
            prefix=f".{destination.name}.partial-", dir=destination.parent
        )
    except OSError as error:
        raise DownloadError(
            f"cannot write to {destination.parent}: {error.strerror or error}"
        ) from error
    os.close(handle)
    return Path(name)


def _fetch(url, out, progress, timeout, user_agent):
    """Stream ``url`` into ``out``; return the digests of what arrived."""
    digests = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    request = urllib.request.Request(url, headers={"User-Agent": user_agent})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            total = _content_length(response)
            if _content_type(response) == "text/html":
                raise _MirrorFailed("served an HTML page, not the file")
            done = 0
            if progress is not None:
                progress(done, total)
            while chunk := response.read(CHUNK_SIZE):
                if done == 0 and chunk.lstrip()[:14].lower().startswith(HTML_STARTS):
                    raise _MirrorFailed("served an HTML page, not the file")
                _write(out, chunk)
                for digest in digests.values():
                    digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except (DownloadError, _MirrorFailed):
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise _MirrorFailed(_describe(error, timeout)) from error

    # http.client ends a body quietly when the connection closes early.
    if total is not None and done != total:
        raise _MirrorFailed(f"short file: {done} of {total} bytes arrived")
    if done == 0:
        raise _MirrorFailed("empty file")
    return {name: digest.hexdigest() for name, digest in digests.items()}


def _content_length(response):
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _content_type(response):
    value = response.headers.get("Content-Type") or ""
    return value.split(";")[0].strip().lower()


def _write(out, chunk):
    try:
        out.write(chunk)
    except OSError as error:
        raise DownloadError(
            f"cannot write {out.name}: {error.strerror or error}"
        ) from error


def _check_digests(digests, expected):
    for name, label in (("sha256", "SHA-256"), ("md5", "MD5")):
        want = expected[name]
        if want is not None and digests[name] != want.strip().lower():
            raise _MirrorFailed(
                f"{label} mismatch (got {digests[name]}, expected {want.strip()})"
            )


def _check_content(verify, path):
    if verify is None:
        return
    try:
        verify(path)
    except ValueError as error:
        raise _MirrorFailed(f"content check failed: {_one_line(error)}") from error


def _describe(error, timeout):
    """A few words for why one mirror failed."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}".strip()
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        if isinstance(reason, BaseException):
            return _describe(reason, timeout)
        return _one_line(reason)
    if isinstance(error, (TimeoutError, socket.timeout)):
        return f"timed out after {timeout:g} s"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {_one_line(error)}"
    if isinstance(error, ConnectionError):
        return f"connection failed: {error.strerror or type(error).__name__}"
    if isinstance(error, http.client.IncompleteRead):
        return f"short file: connection closed after {len(error.partial)} bytes"
    if isinstance(error, http.client.HTTPException):
        return f"bad HTTP response ({type(error).__name__})"
    return _one_line(error)


def _one_line(value):
    text = str(value) or type(value).__name__
    return " ".join(text.split())
