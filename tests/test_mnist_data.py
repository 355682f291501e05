"""MNIST: IDX and npz parsing, the bundled data, managed and user folders."""

import gzip
import shutil
import struct

import numpy as np
import pytest
from mirror_server import MirrorServer, without_proxies

from common import mnist
from common.mnist import FILES, MnistError, load_mnist, read_idx, read_npz

TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = FILES
FIRST_TRAIN_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
FIRST_TEST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


# ---------------------------------------------------------------- tiny files


def idx_bytes(array, magic=None):
    array = np.asarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x803 if array.ndim == 3 else 0x801
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def tiny_images(count, rows=4, cols=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, rows, cols), dtype=np.uint8)


def tiny_labels(count):
    return (np.arange(count) * 7 % 10).astype(np.uint8)


def write_tiny_set(folder, train=5, test=3, gzipped=True, size=(4, 3)):
    """Four valid, small, non-canonical IDX files; returns their arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        TRAIN_IMAGES: tiny_images(train, *size, seed=1),
        TRAIN_LABELS: tiny_labels(train),
        TEST_IMAGES: tiny_images(test, *size, seed=2),
        TEST_LABELS: tiny_labels(test),
    }
    for name, array in arrays.items():
        write_idx(folder, name, idx_bytes(array), gzipped)
    return arrays


def write_idx(folder, name, data, gzipped):
    if gzipped:
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    else:
        (folder / name).write_bytes(data)


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("kind", ["images", "labels"])
def test_read_idx_gzipped_or_not_whatever_the_name(tmp_path, gzipped, kind):
    array = tiny_images(5) if kind == "images" else tiny_labels(5)
    data = idx_bytes(array)
    # The name says the opposite of the content: detection is by magic bytes.
    path = tmp_path / ("plain.idx" if gzipped else "packed.gz")
    path.write_bytes(gzip.compress(data) if gzipped else data)

    result = read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)
    result[0] = 1  # the arrays are the caller's to change


LABELS = idx_bytes(tiny_labels(6))
IMAGES = idx_bytes(tiny_images(5))
BAD_IDX = {
    "empty": (b"", "too short for an IDX header"),
    "bad magic": (
        b"\x12\x34\x56\x78" + IMAGES[4:],
        "not an IDX file: magic 0x12345678",
    ),
    "float data": (b"\x00\x00\x0d\x03" + IMAGES[4:], "IDX data type 0x0d"),
    "two dimensions": (b"\x00\x00\x08\x02" + IMAGES[4:], "has 2 dimensions"),
    "short header": (IMAGES[:10], "too short for its 3-dimension header"),
    "short": (IMAGES[:-1], "short: shape (5, 4, 3) needs 60 data bytes, it holds 59"),
    "trailing": (IMAGES + b"\x00", "has trailing bytes"),
    "label 10": (idx_bytes([3, 9, 10, 1]), "label 10 at index 2; labels must be 0..9"),
    "no images": (idx_bytes(np.zeros((0, 4, 3))), "is empty: shape (0, 4, 3)"),
}


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("case", BAD_IDX)
def test_read_idx_refuses_bad_files(tmp_path, case, gzipped):
    data, words = BAD_IDX[case]
    path = tmp_path / "bad file"
    path.write_bytes(gzip.compress(data) if gzipped else data)
    with pytest.raises(MnistError) as raised:
        read_idx(path)
    message = str(raised.value)
    assert message.startswith(str(path))
    assert words in message.replace("magic number", "magic")
    assert "\n" not in message


def test_read_idx_refuses_a_truncated_gzip(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(LABELS)[:-12])
    with pytest.raises(
        MnistError, match="is not a readable gzip file: it is truncated"
    ):
        read_idx(path)


def test_read_idx_refuses_a_gzip_with_a_bad_checksum(tmp_path):
    packed = bytearray(gzip.compress(LABELS))
    packed[-8] ^= 0xFF  # the CRC-32 of the content
    path = tmp_path / "labels.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(MnistError, match=f"^{path} is not a readable gzip file"):
        read_idx(path)


# ---------------------------------------------------------------- npz files


def tiny_npz(path, **changes):
    arrays = {
        "x_train": tiny_images(5),
        "y_train": tiny_labels(5),
        "x_test": tiny_images(3),
        "y_test": tiny_labels(3),
    }
    arrays.update(changes)
    np.savez(path, **arrays)
    return arrays


UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return 0


class Trap:
    """Unpickling this object would call _record_unpickling."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_read_npz(tmp_path):
    arrays = tiny_npz(tmp_path / "mnist.npz", y_test=np.array([0, 9, 4]))
    result = read_npz(tmp_path / "mnist.npz")
    assert set(result) == {"x_train", "y_train", "x_test", "y_test"}
    np.testing.assert_array_equal(result["x_train"], arrays["x_train"])
    assert result["y_test"].dtype == np.uint8
    assert result["y_test"].tolist() == [0, 9, 4]


def test_read_npz_refuses_pickled_objects_without_unpickling(tmp_path):
    path = tmp_path / "mnist.npz"
    tiny_npz(path, y_train=np.array([Trap()] * 5, dtype=object))
    with pytest.raises(MnistError, match="allow_pickle=False") as raised:
        read_npz(path)
    assert str(raised.value).startswith(f"cannot read {path} as an npz file")
    assert UNPICKLED == []


BAD_NPZ = {
    "missing key": ({"y_test": None}, "lacks the key(s) y_test"),
    "float images": (
        {"x_test": np.zeros((3, 4, 3), np.float32)},
        "[x_test] is float32 (3, 4, 3); expected uint8 (n, rows, cols)",
    ),
    "label 10": ({"y_train": np.array([1, 2, 10, 3, 4])}, "[y_train] holds label 10"),
    "negative label": ({"y_test": np.array([1, -1, 0])}, "[y_test] holds label -1"),
    "labels as images": ({"y_train": tiny_images(5)}, "expected (n,) integers"),
}


@pytest.mark.parametrize("case", BAD_NPZ)
def test_read_npz_refuses_bad_content(tmp_path, case):
    changes, words = BAD_NPZ[case]
    path = tmp_path / "mnist.npz"
    arrays = tiny_npz(tmp_path / "unused.npz", **changes)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    with pytest.raises(MnistError) as raised:
        read_npz(path)
    assert str(path) in str(raised.value)
    assert words in str(raised.value)


def test_read_npz_refuses_a_file_that_is_not_npz(tmp_path):
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MnistError, match="as an npz file of arrays"):
        read_npz(path)


def test_read_npz_refuses_a_single_npy_array(tmp_path):
    path = tmp_path / "mnist.npz"
    with open(path, "wb") as handle:
        np.save(handle, tiny_images(5))
    with pytest.raises(MnistError, match="holds a single .npy array, not an npz"):
        read_npz(path)


# ---------------------------------------------------------------- the real data


@pytest.fixture(scope="module")
def bundled():
    """The copy beside the code, read once; offline, so nothing is fetched."""
    return load_mnist(mirrors=())


def test_hard_coded_checksums_match_the_list_beside_the_data(shared_dir):
    listed = {}
    for line in (shared_dir / "data/mnist/SHA256SUMS.raw").read_text().splitlines():
        digest, name = line.split()
        listed[name] = digest
    assert FILES == listed


def test_bundled_data_is_canonical_mnist(bundled):
    assert bundled.canonical
    assert bundled.notes == []
    assert bundled.source == str(mnist.DEFAULT_DATA_DIR)
    assert bundled.x_train.shape == (60000, 28, 28)
    assert bundled.y_train.shape == (60000,)
    assert bundled.x_test.shape == (10000, 28, 28)
    assert bundled.y_test.shape == (10000,)
    for array in (bundled.x_train, bundled.y_train, bundled.x_test, bundled.y_test):
        assert array.dtype == np.uint8
    assert bundled.y_train[:10].tolist() == FIRST_TRAIN_LABELS
    assert bundled.y_test[:10].tolist() == FIRST_TEST_LABELS
    assert np.bincount(bundled.y_train).tolist()[:3] == [5923, 6742, 5958]
    assert bundled.x_train.max() == 255


def test_default_folder_is_found_from_the_code_not_the_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert mnist.DEFAULT_DATA_DIR.is_absolute()
    assert (mnist.DEFAULT_DATA_DIR / f"{TEST_LABELS}.gz").is_file()


def save_npz(path, data, **changes):
    arrays = {
        "x_train": data.x_train,
        "y_train": data.y_train,
        "x_test": data.x_test,
        "y_test": data.y_test,
    }
    np.savez(path, **{**arrays, **changes})


def test_real_npz_is_recognised_as_canonical(bundled, tmp_path):
    save_npz(tmp_path / "mnist.npz", bundled)
    data = load_mnist(tmp_path, mirrors=())
    assert data.canonical
    assert data.source == str(tmp_path / "mnist.npz")
    np.testing.assert_array_equal(data.x_test, bundled.x_test)


def test_valid_but_changed_data_is_used_with_a_note(bundled, tmp_path):
    y_test = bundled.y_test.copy()
    y_test[0] = 3
    path = tmp_path / "changed.npz"
    save_npz(path, bundled, y_test=y_test)

    data = load_mnist(path, mirrors=())
    assert not data.canonical
    assert data.y_test[0] == 3
    assert data.notes == [
        f"the data in {path} is not the canonical MNIST (checksums differ for "
        f"{TEST_LABELS}); using it as given"
    ]


# ---------------------------------------------------------------- folders


def test_tiny_user_folder_with_plain_and_gzipped_files(tmp_path):
    arrays = write_tiny_set(tmp_path, gzipped=True)
    (tmp_path / f"{TEST_IMAGES}.gz").unlink()
    write_idx(tmp_path, TEST_IMAGES, idx_bytes(arrays[TEST_IMAGES]), gzipped=False)

    data = load_mnist(tmp_path, mirrors=())
    np.testing.assert_array_equal(data.x_train, arrays[TRAIN_IMAGES])
    np.testing.assert_array_equal(data.y_train, arrays[TRAIN_LABELS])
    np.testing.assert_array_equal(data.x_test, arrays[TEST_IMAGES])
    np.testing.assert_array_equal(data.y_test, arrays[TEST_LABELS])
    assert not data.canonical
    assert "is not the canonical MNIST" in data.notes[0]
    assert all(name in data.notes[0] for name in FILES)


def test_folder_with_only_an_npz_uses_it(tmp_path):
    arrays = tiny_npz(tmp_path / "mnist.npz")
    data = load_mnist(tmp_path, mirrors=())
    assert data.source == str(tmp_path / "mnist.npz")
    np.testing.assert_array_equal(data.y_train, arrays["y_train"])


def test_count_mismatch_names_both_files(tmp_path):
    write_tiny_set(tmp_path)
    write_idx(tmp_path, TEST_LABELS, idx_bytes(tiny_labels(4)), gzipped=True)
    with pytest.raises(MnistError) as raised:
        load_mnist(tmp_path, mirrors=())
    assert str(raised.value) == (
        f"{tmp_path / TEST_IMAGES}.gz has 3 images but "
        f"{tmp_path / TEST_LABELS}.gz has 4 labels"
    )


def test_labels_where_images_belong_is_refused(tmp_path):
    write_tiny_set(tmp_path)
    write_idx(tmp_path, TRAIN_IMAGES, idx_bytes(tiny_labels(5)), gzipped=True)
    with pytest.raises(MnistError, match="train-images-idx3-ubyte.gz holds labels"):
        load_mnist(tmp_path, mirrors=())


def test_train_and_test_images_of_different_sizes_are_refused(tmp_path):
    write_tiny_set(tmp_path)
    write_idx(tmp_path, TEST_IMAGES, idx_bytes(tiny_images(3, rows=5)), gzipped=True)
    with pytest.raises(MnistError, match="has 4x3 images but .* has 5x3 images"):
        load_mnist(tmp_path, mirrors=())


def test_a_file_given_as_folder_is_refused(tmp_path):
    path = tmp_path / "mnist.pkl"
    path.write_bytes(b"anything")
    with pytest.raises(MnistError, match="is a file; expected a folder"):
        load_mnist(path, mirrors=())


def test_missing_npz_is_refused(tmp_path):
    with pytest.raises(MnistError, match="no such npz file"):
        load_mnist(tmp_path / "mnist.npz", mirrors=())


# ---------------------------------------------------------------- downloads


@pytest.fixture
def server(monkeypatch, shared_dir):
    """Mirrors: /good/ has the real files, /gone/ nothing, /impostor/ tiny ones."""
    without_proxies(monkeypatch)
    with MirrorServer() as server:
        server.serve_folder("/good/", shared_dir / "data" / "mnist")
        for name in FILES:
            server.fail(f"/gone/{name}.gz", 404)
            server.hang(f"/hang/{name}.gz")
        impostor = gzip.compress(idx_bytes(tiny_labels(10000)))
        server.serve(f"/impostor/{TEST_LABELS}.gz", impostor)
        yield server


def half_real_folder(folder, shared_dir):
    """Tiny training files and the real test images: cheap to read."""
    write_tiny_set(folder, size=(28, 28))
    shutil.copy(shared_dir / f"data/mnist/{TEST_IMAGES}.gz", folder)
    (folder / f"{TEST_LABELS}.gz").unlink()


def test_missing_file_is_downloaded_into_a_user_folder(server, shared_dir, tmp_path):
    half_real_folder(tmp_path, shared_dir)
    mirrors = (server.url("/gone/"), server.url("/impostor/"), server.url("/good"))
    calls = []

    data = load_mnist(
        tmp_path,
        mirrors=mirrors,
        progress=lambda *call: calls.append(call),
        timeout=0.5,
    )

    assert data.y_test[:10].tolist() == FIRST_TEST_LABELS
    real = (shared_dir / f"data/mnist/{TEST_LABELS}.gz").read_bytes()
    assert (tmp_path / f"{TEST_LABELS}.gz").read_bytes() == real
    assert "HTTP 404" in data.notes[0]
    assert (
        f"content check failed: {TEST_LABELS} decompressed has SHA-256"
        in (data.notes[1])
    )
    assert data.notes[2] == (
        f"downloaded {TEST_LABELS}.gz from {server.url('/good')}/{TEST_LABELS}.gz"
    )
    assert {call[0] for call in calls} == {f"{TEST_LABELS}.gz"}
    assert calls[-1][1:] == (len(real), len(real))
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())


def test_every_mirror_failing_names_files_checksums_and_folder(server, tmp_path):
    folder = tmp_path / "my data"
    mirrors = (server.url("/gone/"), server.url("/hang/"))
    with pytest.raises(MnistError) as raised:
        load_mnist(folder, mirrors=mirrors, timeout=0.5)

    message = str(raised.value)
    assert "\n" not in message
    assert f"missing or corrupt in {folder}" in message
    assert "all 2 mirrors failed" in message
    assert "HTTP 404" in message and "timed out after 0.5 s" in message
    assert f"put these four files, gzipped (.gz) or not, in {folder}: " in message
    for name, digest in FILES.items():
        assert f"{name} (SHA-256 {digest})" in message
    assert list(folder.iterdir()) == []


def test_offline_with_missing_files_says_where_to_put_them(tmp_path):
    with pytest.raises(MnistError) as raised:
        load_mnist(tmp_path, mirrors=())
    message = str(raised.value)
    assert "no mirror to download from" in message
    assert str(tmp_path) in message
    assert all(digest in message for digest in FILES.values())


def test_corrupt_file_in_a_user_folder_is_an_error_and_left_alone(server, tmp_path):
    write_tiny_set(tmp_path)
    corrupt = tmp_path / f"{TRAIN_LABELS}.gz"
    before = corrupt.read_bytes()[:-5]
    corrupt.write_bytes(before)

    with pytest.raises(MnistError) as raised:
        load_mnist(tmp_path, mirrors=(server.url("/good/"),), timeout=0.5)
    assert str(raised.value) == (
        f"{corrupt} is not a readable gzip file: it is truncated"
    )
    assert corrupt.read_bytes() == before
    assert server.requests == []


@pytest.mark.parametrize("gzipped", [True, False])
def test_corrupt_file_in_the_managed_folder_is_fetched_again(
    server, shared_dir, tmp_path, monkeypatch, gzipped
):
    managed = tmp_path / "data" / "mnist"
    half_real_folder(managed, shared_dir)
    bad = idx_bytes(tiny_labels(10000))[:-1]
    write_idx(managed, TEST_LABELS, bad, gzipped)
    monkeypatch.setattr(mnist, "DEFAULT_DATA_DIR", managed)

    data = load_mnist(mirrors=(server.url("/gone/"), server.url("/good/")), timeout=0.5)

    assert data.source == str(managed)
    assert data.y_test[:10].tolist() == FIRST_TEST_LABELS
    real = (shared_dir / f"data/mnist/{TEST_LABELS}.gz").read_bytes()
    assert (managed / f"{TEST_LABELS}.gz").read_bytes() == real
    assert not (managed / TEST_LABELS).exists()
    corrupt_name = f"{TEST_LABELS}.gz" if gzipped else TEST_LABELS
    assert data.notes[0].startswith(f"{managed / corrupt_name} short")
    assert data.notes[0].endswith("; fetching it again")
    assert data.notes[2] == (
        f"downloaded {TEST_LABELS}.gz from {server.url('/good/')}{TEST_LABELS}.gz"
    )
