"""Every command line: an argument error is one line naming the argument (not the whole usage text), exit
status 2; whole numbers may be written as 2e9 everywhere, as recipes and `data prepare` always took them."""

from __future__ import annotations

import argparse

import pytest

from smollm_ref.arguments import whole_number
from smollm_ref.data.__main__ import main as data_main
from smollm_ref.generate import main as generate_main
from smollm_ref.plot import main as plot_main
from smollm_ref.summary import main as summary_main
from smollm_ref.train.cli import main as train_main
from smollm_ref.train.options import build_parser


@pytest.mark.parametrize(("text", "value"), [("128", 128), ("2e9", 2_000_000_000), ("1_000", 1000), ("4.0", 4), ("-3", -3),
                                             ("12345678901234567e3", 12345678901234567000)])  # fmt: skip
def test_whole_numbers(text, value):
    assert whole_number(text) == value and type(whole_number(text)) is int


@pytest.mark.parametrize("text", ["1.5", "nan", "inf", "-Infinity", "1e-3", "x", "", "0x10"])
def test_what_is_not_a_whole_number(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a whole number"):
        whole_number(text)


def test_the_trainer_takes_2e9_for_its_integer_options():
    args = build_parser().parse_args(["--data-tokens", "2e9", "--batch-size", "1e1", "--max-steps", "4.0"])
    assert (args.data_tokens, args.batch_size, args.max_steps) == (2_000_000_000, 10, 4)


@pytest.mark.parametrize(
    ("main", "argv", "named"),
    [
        (train_main, ["--batch-size", "1.5"], "argument --batch-size: '1.5' is not a whole number"),
        (train_main, ["--lr-schedule", "linear"], "argument --lr-schedule: invalid choice"),
        (train_main, ["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (data_main, ["prepare", "x", "--tokens", "nan"], "argument --tokens: 'nan' is not a whole number"),
        (data_main, ["prepare", "x", "--tokens", "0"], "argument --tokens: must be a positive number"),
        (generate_main, ["--prompt", "hi", "--max-new-tokens", "ten"], "argument --max-new-tokens: 'ten' is not"),
        (plot_main, [], "the following arguments are required: run_dir"),
        (summary_main, ["--depth", "q"], "argument --depth: 'q' is not a whole number"),
    ],
)
def test_an_argument_error_is_one_line_with_exit_status_2(capsys, main, argv, named):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err and "--help" in err, err
