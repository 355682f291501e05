"""Backend choice precedence, the device report and the device check."""

import json

import pytest

from common import backend


def write_config(tmp_path, name):
    path = tmp_path / "keras.json"
    path.write_text(json.dumps({"backend": name}))
    return path


def test_flag_beats_environment_and_config(tmp_path):
    config = write_config(tmp_path, "torch")
    choice = backend.choose_backend("jax", {"KERAS_BACKEND": "torch"}, config)
    assert (choice.name, choice.source) == ("jax", "--backend")


def test_environment_beats_config(tmp_path):
    config = write_config(tmp_path, "torch")
    choice = backend.choose_backend(None, {"KERAS_BACKEND": "jax"}, config)
    assert (choice.name, choice.source) == ("jax", "KERAS_BACKEND")


def test_config_naming_jax_is_used(tmp_path):
    config = write_config(tmp_path, "jax")
    choice = backend.choose_backend(None, {}, config)
    assert (choice.name, choice.source) == ("jax", str(config))


def test_config_naming_tensorflow_falls_back_to_torch_with_a_note(tmp_path):
    config = write_config(tmp_path, "tensorflow")
    choice = backend.choose_backend(None, {}, config)
    assert choice.name == "torch"
    assert "tensorflow" in choice.notes[0]


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"backend": 3}'])
def test_unreadable_config_means_default(tmp_path, content):
    path = tmp_path / "keras.json"
    path.write_text(content)
    assert backend.choose_backend(None, {}, path).name == "torch"


def test_keras_home_locates_config(tmp_path):
    write_config(tmp_path, "jax")
    assert backend.choose_backend(None, {"KERAS_HOME": str(tmp_path)}).name == "jax"


@pytest.mark.parametrize("where", ["flag", "env"])
def test_tensorflow_asked_for_explicitly_is_an_error(tmp_path, where):
    flag, env = (
        ("tensorflow", {})
        if where == "flag"
        else (None, {"KERAS_BACKEND": "tensorflow"})
    )
    with pytest.raises(ValueError, match="TensorFlow is not supported"):
        backend.choose_backend(flag, env, tmp_path / "missing.json")


def test_switching_backend_in_process_is_refused(backend_name):
    other = "jax" if backend_name == "torch" else "torch"
    import keras  # noqa: F401  (the backend is loaded from here on)

    with pytest.raises(RuntimeError, match="needs a new process"):
        backend.select_backend(other)
    assert backend.select_backend(backend_name).name == backend_name


def test_device_report_names_the_backend_and_explains_a_missing_gpu(backend_name):
    report = backend.device_report()
    assert report.backend == backend_name
    assert report.kind in ("cpu", "gpu")
    assert report.summary().startswith(report.kind.upper())
    if not report.is_gpu:
        assert report.why_no_gpu


def test_device_computes_like_numpy():
    assert backend.check_device_computes(size=64) < 1e-4


def test_seeding_repeats_random_numbers():
    import keras

    backend.seed_everything(3)
    first = keras.ops.convert_to_numpy(keras.random.normal((4,)))
    backend.seed_everything(3)
    second = keras.ops.convert_to_numpy(keras.random.normal((4,)))
    assert (first == second).all()


def test_an_unknown_backend_is_named_without_blaming_tensorflow(tmp_path):
    with pytest.raises(ValueError) as raised:
        backend.choose_backend(None, {"KERAS_BACKEND": "bogus"}, tmp_path / "none")
    message = str(raised.value)
    assert "KERAS_BACKEND asks for backend 'bogus'" in message
    assert "TensorFlow" not in message
