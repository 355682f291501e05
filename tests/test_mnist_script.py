"""mnist.py end to end: model specs, the verdict, reports, and every refusal."""

import gzip
import os
import signal
import struct

import numpy as np
import pytest

import mnist
from common import mnist as mnist_data


def write_idx(path, array):
    """Write ``array`` (uint8) as a gzipped IDX file."""
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def real_mnist():
    return mnist_data.load_mnist(mirrors=())


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory, real_mnist):
    """2,400 real training and 600 real test digits, as IDX files."""
    folder = tmp_path_factory.mktemp("small mnist")
    parts = {
        "train-images-idx3-ubyte": real_mnist.x_train[:2400],
        "train-labels-idx1-ubyte": real_mnist.y_train[:2400],
        "t10k-images-idx3-ubyte": real_mnist.x_test[:600],
        "t10k-labels-idx1-ubyte": real_mnist.y_test[:600],
    }
    for name, array in parts.items():
        write_idx(folder / f"{name}.gz", array)
    return folder


def run_main(args, capsys):
    code = mnist.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- model specs ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("mlp", mnist.ModelSpec("mlp")),
        ("cnn", mnist.ModelSpec("cnn")),
        ("custom_mlp:3,100,0.1,0.25", mnist.ModelSpec("custom_mlp", 3, 100, 0.1, 0.25)),
    ],
)
def test_model_specs_parse(text, expected):
    assert mnist.parse_model_spec(text) == expected


@pytest.mark.parametrize(
    "spec, words",
    [
        ("resnet", "unknown model 'resnet'"),
        ("custom_mlp:2,800", "malformed model"),
        ("custom_mlp:2,wide,0.2,0.5", "malformed model"),
        ("custom_mlp:2,800,0.2,1.5", "dropout rates must be in [0, 1)"),
        ("custom_mlp:-1,800,0.2,0.5", "DEPTH must be >= 0"),
    ],
)
def test_malformed_spec_is_a_one_line_usage_error(spec, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist.main([spec])
    assert exit_info.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("mnist.py: error: argument MODEL: ")
    assert words in last_line


@pytest.mark.parametrize("epochs", ["0", "-1", "two"])
def test_bad_epoch_count_is_a_usage_error(epochs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(["mlp", epochs])
    assert exit_info.value.code == 2


def test_models_have_the_lasagne_architectures():
    mlp = mnist.build_model(mnist.ModelSpec("mlp"))
    # 784*800+800 + 800*800+800 + 800*10+10
    assert mlp.count_params() == 1_276_810
    cnn = mnist.build_model(mnist.ModelSpec("cnn"))
    # conv 5*5*1*32+32, conv 5*5*32*32+32, dense 512*256+256, dense 256*10+10
    assert cnn.count_params() == 832 + 25_632 + 131_328 + 2_570
    custom = mnist.build_model(mnist.parse_model_spec("custom_mlp:1,50,0.0,0.0"))
    assert custom.count_params() == 784 * 50 + 50 + 50 * 10 + 10


def test_evaluate_matches_keras_evaluate(real_mnist):
    """Loss and accuracy from predictions equal Keras's compiled metrics."""
    import keras

    model = mnist.build_model(mnist.parse_model_spec("custom_mlp:1,32,0.0,0.0"))
    mnist.compile_model(model, steps=20)
    x, y = mnist.as_inputs(real_mnist.x_train[:600]), real_mnist.y_train[:600]
    mnist.train(model, x, y, None, 1, 64)  # somewhere between chance and perfect
    images, labels = mnist.as_inputs(real_mnist.x_test[:700]), real_mnist.y_test[:700]

    loss, accuracy, predictions = mnist.evaluate(model, images, labels, 256)

    reference = keras.Model(model.input, model.output)
    reference.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    want_loss, want_accuracy = reference.evaluate(images, labels, verbose=0)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert accuracy == pytest.approx(want_accuracy, abs=1e-6)
    assert 0.3 < accuracy < 1.0
    assert predictions.shape == (700,) and set(predictions) <= set(range(10))
    assert np.mean(predictions == labels) == pytest.approx(accuracy)


# --- runs on a small real subset -------------------------------------------------


def test_small_run_passes_and_writes_reports(small_data_dir, tmp_path, capsys):
    report_dir = tmp_path / "report"
    saved = tmp_path / "models" / "mlp.keras"
    code, out, err = run_main(
        [
            "mlp",
            "2",
            "--data_dir",
            small_data_dir,
            "--report_dir",
            report_dir,
            "--save",
            saved,
            "--min_accuracy",
            "60",
        ],
        capsys,
    )
    assert code == 0, out + err
    assert "Device: CPU" in out or "Device: GPU" in out
    assert "Device check: matrix product agrees with NumPy" in out
    assert "Epoch 1 of 2 took" in out and "Epoch 2 of 2 took" in out
    assert "samples per second" in out
    assert "not the canonical MNIST" in out
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("PASS: mlp reached")
    accuracy = float(verdict.split("reached ")[1].split("%")[0])
    assert accuracy >= 60

    for name in ("training_curves.png", "misclassified.png"):
        assert (report_dir / name).stat().st_size > 1000
    import keras

    reloaded = keras.saving.load_model(saved)
    assert reloaded.count_params() == 1_276_810
    assert not [p for p in saved.parent.iterdir() if "partial" in p.name]


def test_same_seed_same_result(small_data_dir, capsys):
    args = ["custom_mlp:1,64,0.1,0.1", "1", "--data_dir", small_data_dir]
    args += ["--min_accuracy", "0", "--seed", "5"]
    first = run_main(args, capsys)[1].strip().splitlines()
    second = run_main(args, capsys)[1].strip().splitlines()
    loss = [line for line in first if "test loss" in line]
    assert loss and loss == [line for line in second if "test loss" in line]


def test_accuracy_below_the_minimum_fails(small_data_dir, capsys):
    code, out, _ = run_main(
        ["mlp", "1", "--data_dir", small_data_dir, "--min_accuracy", "100"], capsys
    )
    assert code == 1
    assert out.strip().splitlines()[-1].startswith("FAIL: below the 100% needed")


def test_chance_level_fails_whatever_the_minimum(small_data_dir, capsys, monkeypatch):
    # A model whose dropout drops everything learns nothing: chance level.
    code, out, _ = run_main(
        [
            "custom_mlp:1,10,0.999,0.999",
            "1",
            "--data_dir",
            small_data_dir,
            "--min_accuracy",
            "0",
        ],
        capsys,
    )
    assert code == 1
    assert "FAIL: chance-level result" in out


def test_ctrl_c_stops_after_the_batch_and_fails(small_data_dir, capsys, monkeypatch):
    def interrupt_after_first_epoch(epoch, epochs, record):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(mnist, "print_epoch", interrupt_after_first_epoch)
    # Whatever handled Ctrl+C before (ignored, under nohup) is put back after.
    before = signal.getsignal(signal.SIGINT)
    code, out, _ = run_main(["mlp", "3", "--data_dir", small_data_dir], capsys)
    assert code == 1
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("FAIL: interrupted; mlp reached")
    assert "1 epoch(s)" in verdict
    assert signal.getsignal(signal.SIGINT) is before


def test_require_gpu_without_a_gpu_fails_and_says_why(capsys):
    from common import backend

    if backend.device_report().is_gpu:
        pytest.skip("this machine has a GPU")
    code, out, _ = run_main(["--require_gpu"], capsys)
    assert code == 1
    assert "FAIL: --require_gpu but no GPU is in use:" in out


def test_out_of_memory_is_one_line_with_a_hint(small_data_dir, capsys, monkeypatch):
    def run_out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(mnist, "train", run_out_of_memory)
    code, _, err = run_main(["mlp", "1", "--data_dir", small_data_dir], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "out of memory" in err and "smaller --batch_size than 64" in err


# --- bad data ------------------------------------------------------------------


def test_empty_data_dir_with_no_reachable_mirror(tmp_path, capsys, monkeypatch):
    # Port 9 on loopback refuses connections: every mirror fails at once.
    monkeypatch.setattr(mnist_data, "MIRRORS", ("http://127.0.0.1:9/",))
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(["mlp", "1", "--data_dir", empty], capsys)
    assert code == 1
    assert err.startswith("mnist.py: error: ")
    assert len(err.strip().splitlines()) == 1
    for name in mnist_data.FILES:
        assert name in err
    assert not [p for p in empty.iterdir() if p.name.startswith(".")]


def test_a_missing_file_is_downloaded_with_a_progress_bar(
    small_data_dir, tmp_path, shared_dir, capsys, monkeypatch
):
    from mirror_server import MirrorServer, without_proxies

    folder = tmp_path / "three of four"
    folder.mkdir()
    for path in small_data_dir.iterdir():
        if not path.name.startswith("t10k-labels"):
            (folder / path.name).write_bytes(path.read_bytes())
    without_proxies(monkeypatch)
    with MirrorServer() as server:
        server.serve_folder("/mnist/", shared_dir / "data" / "mnist")
        monkeypatch.setattr(mnist_data, "MIRRORS", (server.url("/mnist/"),))
        # The real test labels (10,000) do not pair with 600 small test images.
        code, out, err = run_main(["mlp", "1", "--data_dir", folder], capsys)
    assert "Downloading t10k-labels-idx1-ubyte.gz" in err
    assert (folder / "t10k-labels-idx1-ubyte.gz").is_file()
    assert code == 1
    assert "10000" in err.strip().splitlines()[-1]


def test_corrupt_user_file_is_named_and_left_alone(small_data_dir, tmp_path, capsys):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for path in small_data_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    broken = folder / "t10k-labels-idx1-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:-40])
    before = broken.read_bytes()
    code, _, err = run_main(["mlp", "1", "--data_dir", folder], capsys)
    assert code == 1
    assert "t10k-labels-idx1-ubyte" in err
    assert len(err.strip().splitlines()) == 1
    assert broken.read_bytes() == before


@pytest.mark.parametrize(
    "args, words",
    [
        (["--save", "model.h5"], "--save needs a file name ending in .keras"),
        (["--min_accuracy", "150"], "--min_accuracy must be within 0..100"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--backend", "tensorflow"], "invalid choice: 'tensorflow'"),
        (["--seed", str(2**32)], "argument --seed"),
    ],
)
def test_bad_options_are_usage_errors(args, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist.main(args)
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


# --- the real thing --------------------------------------------------------------


@pytest.mark.slow
def test_real_mnist_mlp_one_epoch_passes(capsys):
    code, out, err = run_main(["mlp", "1"], capsys)
    assert code == 0, err
    verdict = out.strip().splitlines()[-1]
    assert verdict.startswith("PASS:")
    assert float(verdict.split("reached ")[1].split("%")[0]) >= 94.0
