"""Result names, progress, saves and early stops shared by the optimisers
(common/run.py)."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from common import run
from common.backend import NonFiniteError


def grey(level, size=(6, 8)):
    return np.full((*size, 3), level, dtype=np.float32)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("ninjadream", "ninjadream.png"),
        ("out/ninja.dream", "out/ninja.dream.png"),
        ("dream.png", "dream.png"),
        ("dream.JPG", "dream.JPG"),
        ("dream.tiff", "dream.tiff"),
        ("dream.webp", "dream.webp"),
        ("dream.v2", "dream.v2.png"),
    ],
)
def test_result_path(prefix, expected):
    assert run.result_path(prefix) == run.Path(expected)


@pytest.mark.parametrize("prefix", ["dream.gif", "out/dream.BMP"])
def test_result_path_refuses_image_formats_it_cannot_write(prefix):
    with pytest.raises(ValueError, match=r"cannot write \.(gif|bmp) images; end the"):
        run.result_path(prefix)


def test_iteration_path_keeps_the_extension():
    assert (
        run.iteration_path("a b/dream", 7).as_posix() == "a b/dream_at_iteration_7.png"
    )
    assert run.iteration_path("dream.jpg", 12).name == "dream_at_iteration_12.jpg"


def test_steps_count_across_stages_and_save_every(tmp_path, capsys):
    prefix = tmp_path / "dream"
    with run.Run(prefix, total_steps=6, save_every=2, metadata={"step": "1.5"}) as r:
        for stage in range(2):
            r.track(lambda stage=stage: grey(10 * stage), stage=f"{stage + 1}/2")
            for index in range(3):
                level = 10 * stage + index + 1
                r.step(lambda level=level: grey(level), loss=level / 3)
        written = r.finish(grey(99))

    assert written == tmp_path / "dream.png"
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == [
        "dream.png",
        "dream_at_iteration_2.png",
        "dream_at_iteration_4.png",
    ]
    # Step 4 is the first of the second stage: level 11.
    with Image.open(tmp_path / "dream_at_iteration_4.png") as image:
        assert np.asarray(image)[0, 0, 0] == 11
        assert image.text == {"step": "1.5", "iteration": "4"}
    with Image.open(written) as image:
        assert image.text == {"step": "1.5"}
    out = capsys.readouterr().out
    assert "saved" in out and "dream_at_iteration_4.png" in out


def test_the_image_is_fetched_only_when_a_save_is_due(tmp_path):
    calls = []

    def current():
        calls.append(1)
        return grey(5)

    with run.Run(tmp_path / "x", total_steps=10, save_every=4, quiet=True) as r:
        for _ in range(10):
            r.step(current, loss=1.0)
    assert len(calls) == 2  # iterations 4 and 8


def test_ctrl_c_saves_the_current_image_and_keeps_the_finished_result(tmp_path):
    finished = tmp_path / "dream.png"
    finished.write_bytes(b"an earlier finished run")

    with pytest.raises(run.RunStopped) as info:
        with run.Run(tmp_path / "dream", total_steps=10, quiet=True) as r:
            for level in range(1, 11):
                if level == 4:
                    raise KeyboardInterrupt
                r.step(lambda level=level: grey(level), loss=level)

    error = info.value
    assert error.exit_code == run.EXIT_INTERRUPTED != 0
    assert error.saved == tmp_path / "dream_at_iteration_3.png"
    assert "interrupted at iteration 3 of 10" in str(error)
    assert str(error.saved) in str(error)
    with Image.open(error.saved) as image:
        assert np.asarray(image)[0, 0, 0] == 3
    assert finished.read_bytes() == b"an earlier finished run"


def test_ctrl_c_before_the_first_image_saves_nothing(tmp_path):
    with pytest.raises(run.RunStopped) as info:
        with run.Run(tmp_path / "dream", total_steps=3, quiet=True):
            raise KeyboardInterrupt
    assert info.value.saved is None
    assert "no image to keep" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_keeps_the_last_good_image(tmp_path):
    with pytest.raises(run.RunStopped) as info:
        with run.Run(tmp_path / "dream", total_steps=5, quiet=True) as r:
            r.step(lambda: grey(7), loss=1.0)
            r.step(lambda: grey(8), loss=2.0)
            raise NonFiniteError("the loss is nan; the image or the loss produced it")

    error = info.value
    assert error.exit_code == run.EXIT_FAILURE
    assert "stopped after iteration 2 of 5" in str(error)
    assert "the loss is nan" in str(error)
    assert "last good image is saved as" in str(error)
    with Image.open(tmp_path / "dream_at_iteration_2.png") as image:
        assert np.asarray(image)[0, 0, 0] == 8
    assert not (tmp_path / "dream.png").exists()


def test_a_non_finite_image_is_not_saved_and_the_first_error_stays(tmp_path):
    with pytest.raises(run.RunStopped) as info:
        with run.Run(tmp_path / "dream", total_steps=5, quiet=True) as r:
            r.step(lambda: grey(np.nan), loss=1.0)
            raise NonFiniteError("the loss is nan")
    assert "the loss is nan" in str(info.value)
    assert "no image to keep" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with run.Run(tmp_path / "dream", total_steps=5, quiet=True) as r:
            r.step(lambda: grey(7), loss=1.0)
            raise ZeroDivisionError
    assert list(tmp_path.iterdir()) == []


def test_check_writable(tmp_path):
    target = tmp_path / "new folder" / "dream.png"
    assert run.check_writable(target) == target
    assert list(target.parent.iterdir()) == []  # the probe is gone

    with pytest.raises(IsADirectoryError, match="is a folder"):
        run.check_writable(tmp_path)


@pytest.mark.parametrize("below", ["", "deeper/"])
def test_check_writable_names_a_file_in_the_way(tmp_path, below):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OSError) as info:
        run.check_writable(tmp_path / f"notes.txt/{below}dream.png")
    message = str(info.value)
    assert f"{blocker} is a file, not a folder" in message
    assert "File exists" not in message and "\n" not in message
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0,
    reason="needs POSIX permissions that bind the user",
)
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OSError, match="cannot write in") as info:
            run.check_writable(folder / "dream.png")
        assert "\n" not in str(info.value)
    finally:
        folder.chmod(0o700)


def test_script_errors_map_to_one_line_and_exit_status(capsys):
    def raising(error):
        @run.script_errors("demo.py")
        def main(argv=None):
            raise error

        return main

    assert raising(ValueError("bad layer 'x'\nmore detail"))([]) == 1
    assert capsys.readouterr().err == "demo.py: error: bad layer 'x'\n"

    assert raising(FileNotFoundError("cat.png: no such file"))([]) == 1
    assert "cat.png: no such file" in capsys.readouterr().err

    stopped = run.RunStopped("interrupted at iteration 3", exit_code=130)
    assert raising(stopped)([]) == 130
    assert "interrupted at iteration 3" in capsys.readouterr().err

    assert raising(KeyboardInterrupt())([]) == 130
    assert "interrupted; nothing saved" in capsys.readouterr().err

    with pytest.raises(ZeroDivisionError):
        raising(ZeroDivisionError())([])


def test_script_errors_pass_the_return_value():
    @run.script_errors("demo.py")
    def main(argv=None):
        return 0 if argv == ["ok"] else 3

    assert main(["ok"]) == 0
    assert main([]) == 3


def test_skip_shortens_the_run_but_not_the_count(tmp_path):
    with run.Run(tmp_path / "dream", total_steps=10, save_every=3, quiet=True) as r:
        for level in range(1, 5):
            r.step(lambda level=level: grey(level), loss=1.0)
        r.skip(6)
        assert (r.iteration, r.total_steps) == (4, 4)
        r.finish(grey(4))
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "dream.png",
        "dream_at_iteration_3.png",
    ]


def test_download_bar_follows_bytes_and_starts_over_for_the_next_mirror(capsys):
    with run.DownloadBar("weights") as progress:
        assert progress.bar is None  # nothing drawn before the first byte
        progress(0, 100)
        progress(60, 100)
        assert progress.bar.n == 60
        progress(0, 80)  # a failed mirror; the next one starts from zero
        progress(80, 80)
        assert (progress.bar.n, progress.bar.total) == (80, 80)
    assert "weights" in capsys.readouterr().err
