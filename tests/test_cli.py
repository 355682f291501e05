"""Shared command-line options and validators (common/cli.py)."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from common import cli, vgg16


def parser(max_size=512):
    result = argparse.ArgumentParser(prog="script", formatter_class=cli.HelpFormatter)
    cli.add_common_arguments(result, max_size=max_size)
    return result


def parse_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_defaults():
    args = parser(max_size=384).parse_args([])
    assert Path(args.weights_root) == vgg16.DEFAULT_WEIGHTS_ROOT
    assert args.weights_format == "auto"
    assert args.max_size == 384
    assert args.seed == 0
    assert args.backend is None
    assert args.allow_large_images is False


def test_values_as_typed(tmp_path):
    weights = tmp_path / "my weights" / "vgg.h5"
    args = parser().parse_args(
        [
            "--weights_root",
            str(weights),
            "--weights_format",
            "keras-tf",
            "--max_size",
            "0",
            "--seed",
            "7",
            "--backend",
            "jax",
            "--allow_large_images",
        ]
    )
    assert args.weights_root == weights
    assert (args.weights_format, args.max_size, args.seed) == ("keras-tf", 0, 7)
    assert args.backend == "jax" and args.allow_large_images


def test_relative_path_is_kept_relative_to_where_the_user_stands():
    args = parser().parse_args(["--weights_root", "some/where.h5"])
    assert args.weights_root == Path("some/where.h5")


def test_help_shows_each_default_once_and_the_weights_folder_briefly(capsys):
    with pytest.raises(SystemExit):
        parser(max_size=321).parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: weights/ beside the scripts)" in help_text
    assert str(vgg16.DEFAULT_WEIGHTS_ROOT) not in help_text
    assert help_text.count("(default: 321)") == 1
    formats = "{" + ",".join(vgg16.WEIGHTS_FORMATS) + "}"
    assert formats in help_text and "{torch,jax}" in help_text


def test_help_leaves_out_defaults_that_say_nothing(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in help_text
    assert "(default: False)" not in help_text
    assert "(default: 0)" in help_text  # the seed: a real value is still shown


def test_the_largest_seed_is_accepted():
    assert parser().parse_args(["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_weights_format_choices_come_from_the_registry():
    action = next(
        action for action in parser()._actions if action.dest == "weights_format"
    )
    assert tuple(action.choices) == ("auto", *vgg16.FORMATS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_size", "-1"], "argument --max_size: expected 0 or more, got -1"),
        (
            ["--max_size", "big"],
            "argument --max_size: expected a whole number, got 'big'",
        ),
        (["--seed", "1.5"], "argument --seed: expected a whole number, got '1.5'"),
        (
            ["--seed", str(2**32)],
            f"argument --seed: expected 0 to {2**32 - 1}, got {2**32}",
        ),
        (
            ["--backend", "tensorflow"],
            "argument --backend: invalid choice: 'tensorflow'",
        ),
        (["--weights_format", "caffe"], "argument --weights_format: invalid choice"),
    ],
)
def test_bad_values_are_one_line_usage_errors(capsys, argv, message):
    assert message in parse_error(capsys, argv)


@pytest.mark.parametrize(
    ("validator", "text", "expected"),
    [
        (cli.positive_int, "3", 3),
        (cli.non_negative_int, "0", 0),
        (cli.positive_float, "0.25", 0.25),
        (cli.non_negative_float, "0", 0.0),
    ],
)
def test_validators_accept(validator, text, expected):
    assert validator(text) == expected


@pytest.mark.parametrize(
    ("validator", "text", "message"),
    [
        (cli.positive_int, "0", "expected 1 or more, got 0"),
        (cli.positive_float, "0", "expected a number above 0, got 0"),
        (cli.positive_float, "nan", "expected a number above 0, got nan"),
        (cli.non_negative_float, "-0.5", "expected 0 or a number above, got -0.5"),
        (cli.non_negative_float, "inf", "expected 0 or a number above, got inf"),
        (cli.positive_float, "x", "expected a number, got 'x'"),
    ],
)
def test_validators_refuse(validator, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        validator(text)


def test_layer_list():
    assert cli.vgg16_layers("block4_conv3, block5_conv1") == (
        "block4_conv3",
        "block5_conv1",
    )
    with pytest.raises(argparse.ArgumentTypeError, match="unknown VGG16 layer 'conv9'"):
        cli.vgg16_layers("block1_conv1,conv9")


def test_importing_cli_does_not_import_keras():
    code = "import sys; import common.cli; print('keras' in sys.modules)"
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "False"
