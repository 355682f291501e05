"""Downloads over a list of local mirrors, each failing in its own way."""

import gzip
import hashlib
import socket

import pytest
from mirror_server import MirrorServer, without_proxies

from common.download import USER_AGENT, DownloadError, download

NAME = "t10k-labels-idx1-ubyte.gz"
TIMEOUT = 0.5  # seconds; the hanging route never answers


@pytest.fixture(scope="module")
def mnist_dir(shared_dir):
    return shared_dir / "data" / "mnist"


@pytest.fixture(scope="module")
def payload(mnist_dir):
    return (mnist_dir / NAME).read_bytes()


@pytest.fixture(scope="module")
def raw_sha256(mnist_dir):
    """SHA-256 of the decompressed file, from the list beside the data."""
    for line in (mnist_dir / "SHA256SUMS.raw").read_text().splitlines():
        digest, name = line.split()
        if name + ".gz" == NAME:
            return digest
    pytest.fail(f"{NAME} is not listed in SHA256SUMS.raw")


@pytest.fixture
def server(monkeypatch, mnist_dir, payload):
    without_proxies(monkeypatch)
    corrupt = bytearray(payload)
    corrupt[len(corrupt) // 2] ^= 0xFF
    html = b"<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>\n"
    with MirrorServer() as server:
        server.serve_folder("/good/", mnist_dir)
        server.fail(f"/not-found/{NAME}", 404)
        server.fail(f"/server-error/{NAME}", 500)
        server.hang(f"/hang/{NAME}")
        server.truncate(f"/short/{NAME}", payload[:1000], len(payload))
        server.serve(f"/html/{NAME}", html, content_type="text/html")
        server.serve(f"/html-as-binary/{NAME}", html)
        server.serve(f"/corrupt/{NAME}", bytes(corrupt))
        server.serve(f"/repacked/{NAME}", gzip.compress(b"something else"))
        yield server


@pytest.fixture
def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{NAME}"


def check_decompressed(expected_sha256):
    def verify(path):
        content = gzip.decompress(path.read_bytes())
        if hashlib.sha256(content).hexdigest() != expected_sha256:
            raise ValueError("decompressed content differs")

    return verify


def leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_good_mirror_gives_the_file_and_sends_the_user_agent(server, payload, tmp_path):
    destination = tmp_path / "new folder" / NAME
    result = download(
        server.url(f"/good/{NAME}"),
        destination,
        sha256=hashlib.sha256(payload).hexdigest(),
        timeout=TIMEOUT,
    )
    assert result == destination
    assert destination.read_bytes() == payload
    assert leftovers(destination.parent) == [NAME]
    (path, headers) = server.requests[0]
    assert path == f"/good/{NAME}"
    assert headers["user-agent"] == USER_AGENT


def test_custom_user_agent_is_sent(server, tmp_path):
    download(
        [server.url(f"/good/{NAME}")],
        tmp_path / NAME,
        user_agent="example-agent/1.0",
        timeout=TIMEOUT,
    )
    assert server.requests[0][1]["user-agent"] == "example-agent/1.0"


FAILURES = {
    "not-found": "HTTP 404",
    "server-error": "HTTP 500",
    "hang": f"timed out after {TIMEOUT:g} s",
    "short": "short file: 1000 of",
    "html": "served an HTML page",
    "html-as-binary": "served an HTML page",
    "corrupt": "SHA-256 mismatch",
    "repacked": "SHA-256 mismatch",
}


@pytest.mark.parametrize("failure", FAILURES)
def test_each_failure_moves_on_to_the_next_mirror(
    server, payload, raw_sha256, tmp_path, failure
):
    bad, good = server.url(f"/{failure}/{NAME}"), server.url(f"/good/{NAME}")
    notes = []
    download(
        [bad, good],
        tmp_path / NAME,
        sha256=hashlib.sha256(payload).hexdigest(),
        verify=check_decompressed(raw_sha256),
        timeout=TIMEOUT,
        notes=notes,
    )
    assert (tmp_path / NAME).read_bytes() == payload
    assert server.paths_requested() == [f"/{failure}/{NAME}", f"/good/{NAME}"]
    assert notes[0].startswith(f"could not download {NAME} from {bad}: ")
    assert FAILURES[failure] in notes[0]
    assert notes[1] == f"downloaded {NAME} from {good}"
    assert leftovers(tmp_path) == [NAME]


def test_connection_refused_moves_on(server, payload, closed_port_url, tmp_path):
    notes = []
    download(
        [closed_port_url, server.url(f"/good/{NAME}")],
        tmp_path / NAME,
        timeout=TIMEOUT,
        notes=notes,
    )
    assert (tmp_path / NAME).read_bytes() == payload
    assert "connection failed" in notes[0]


def test_verify_rejecting_the_content_moves_on(server, payload, raw_sha256, tmp_path):
    notes = []
    download(
        [server.url(f"/repacked/{NAME}"), server.url(f"/good/{NAME}")],
        tmp_path / NAME,
        verify=check_decompressed(raw_sha256),
        timeout=TIMEOUT,
        notes=notes,
    )
    assert (tmp_path / NAME).read_bytes() == payload
    assert "content check failed: decompressed content differs" in notes[0]


def test_md5_is_checked(server, payload, tmp_path):
    url = server.url(f"/good/{NAME}")
    with pytest.raises(DownloadError, match="MD5 mismatch"):
        download(url, tmp_path / NAME, md5="0" * 32, timeout=TIMEOUT)
    download(
        url, tmp_path / NAME, md5=hashlib.md5(payload).hexdigest(), timeout=TIMEOUT
    )
    assert (tmp_path / NAME).read_bytes() == payload


def test_all_mirrors_failing_is_one_line_and_changes_nothing(
    server, payload, closed_port_url, tmp_path
):
    destination = tmp_path / NAME
    destination.write_bytes(b"the file from before")
    urls = [server.url(f"/{failure}/{NAME}") for failure in FAILURES]
    urls += [closed_port_url, f"ftp://127.0.0.1/{NAME}"]

    with pytest.raises(DownloadError) as raised:
        download(
            urls,
            destination,
            sha256=hashlib.sha256(payload).hexdigest(),
            timeout=TIMEOUT,
        )

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"could not download {NAME}: all 10 mirrors failed: ")
    reasons = message.split(": ", 2)[2].split("; ")
    assert len(reasons) == len(urls)
    for reason, url, words in zip(reasons, urls, FAILURES.values(), strict=False):
        assert reason.startswith(f"{url}: ")
        assert words in reason
    assert "connection failed" in reasons[-2]
    assert "unsupported URL scheme 'ftp'" in reasons[-1]
    assert destination.read_bytes() == b"the file from before"
    assert leftovers(tmp_path) == [NAME]


def test_ctrl_c_removes_the_partial_file(server, mnist_dir, tmp_path):
    destination = tmp_path / "t10k-images-idx3-ubyte.gz"
    destination.write_bytes(b"the file from before")

    def interrupt(done, total):
        if done > 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download(
            server.url("/good/t10k-images-idx3-ubyte.gz"),
            destination,
            progress=interrupt,
            timeout=TIMEOUT,
        )
    assert destination.read_bytes() == b"the file from before"
    assert leftovers(tmp_path) == [destination.name]


def test_progress_counts_up_to_the_size(server, mnist_dir, tmp_path):
    size = (mnist_dir / "t10k-images-idx3-ubyte.gz").stat().st_size
    calls = []
    download(
        server.url("/good/t10k-images-idx3-ubyte.gz"),
        tmp_path / "images.gz",
        progress=lambda done, total: calls.append((done, total)),
        timeout=TIMEOUT,
    )
    assert calls[0] == (0, size)
    assert calls[-1] == (size, size)
    assert len(calls) > 2
    done = [call[0] for call in calls]
    assert done == sorted(done)


def test_no_urls_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least one URL"):
        download([], tmp_path / NAME)


def test_a_single_failing_mirror_is_named_as_the_mirror(closed_port_url, tmp_path):
    with pytest.raises(DownloadError) as raised:
        download([closed_port_url], tmp_path / NAME, timeout=2)
    assert str(raised.value).startswith(f"could not download {NAME}: the mirror failed")
