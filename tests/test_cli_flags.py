"""One flag name per concept across the commands (--runs, --input, --output); the earlier spellings are hidden
aliases that still work and say so in one line."""
from __future__ import annotations

import pytest

from budgetlora.cli import main


@pytest.mark.parametrize("argv, new, old", [
    (["shift", "run", "--target", "t.csv", "--out", "o"], {"input": "t.csv", "output": "o"}, ["--target", "--out"]),
    (["self-train", "run", "--unlabelled", "u.csv", "--out", "r"], {"input": "u.csv", "runs": "r"},
     ["--unlabelled", "--out"]),
    (["evaluate", "run", "--data", "l.csv"], {"input": "l.csv"}, ["--data"]),
    (["submit", "--target", "t.csv", "--output", "o.csv"], {"input": "t.csv", "output": "o.csv"}, ["--target"]),
])
def test_old_flag_spellings_still_work_with_a_one_line_notice(capsys, argv, new, old):
    from budgetlora.cli import build_parser

    args = build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in new} == new
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"budgetlora: note: {o} is now {n}; the old spelling still works"
                   for o, n in zip(old, [_NEW[o, argv[0]] for o in old])]


_NEW = {("--target", "shift"): "--input", ("--out", "shift"): "--output", ("--unlabelled", "self-train"): "--input",
        ("--out", "self-train"): "--runs", ("--data", "evaluate"): "--input", ("--target", "submit"): "--input"}


def test_old_spellings_are_hidden_and_a_required_flag_given_either_way(capsys):
    from budgetlora.cli import build_parser

    help_text = build_parser()._subparsers._group_actions[0].choices["shift"].format_help()
    assert "--input" in help_text and "--target" not in help_text and "--out " not in help_text
    with pytest.raises(SystemExit) as e:
        main(["shift", "run"])
    assert e.value.code == 2 and "the following arguments are required: --input" in capsys.readouterr().err
