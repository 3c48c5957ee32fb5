"""`python -m model.checkpoint` (model/checkpoint.py `main`): a real subcommand CLI whose `random`
is model/random_checkpoint.py's CLI under its own name, and an `--out` it cannot write is one
line, exit 2 (issue 25, a fresh user's try)."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from model import checkpoint, random_checkpoint

PROG = "python -m model.checkpoint"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model.checkpoint", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_lists_the_random_subcommand():
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert f"usage: {PROG} [-h] {{random}}" in done.stdout
    assert "random-weight checkpoint" in " ".join(done.stdout.split())


@pytest.mark.parametrize("args, named", [
    ([], f"{PROG}: error: the following arguments are required: {{random}}"),
    (["frob"], f"{PROG}: error: argument {{random}}: invalid choice: 'frob' (choose from "
               "'random')"),
    (["random"], f"{PROG} random: error: the following arguments are required: --preset, "
                 "--out")])
def test_a_missing_or_unknown_subcommand_is_named_exit_2(capsys, args, named):
    """Before: a hand-written usage line, exit 1, and `frob` not named."""
    with pytest.raises(SystemExit) as exit_:
        checkpoint.main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == named


def test_random_help_shows_the_random_checkpoint_options_under_its_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        checkpoint.main(["random", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith(f"usage: {PROG} random [-h] --preset")
    assert random_checkpoint.DESCRIPTION in text
    for option in ("--preset", "--out", "--dtype", "--seed", "--shard-size-mb", "--hot-expert",
                   "--quantization {fp8}"):
        assert option in text.split("options:", 1)[1], option


def test_both_clis_take_the_same_options():
    """`python -m model.random_checkpoint` keeps working as before, with the same options."""
    def options(parser):
        return {(a.dest, tuple(a.option_strings), a.default, a.required,
                 tuple(a.choices or ())) for a in parser._actions}
    sub = random_checkpoint.add_arguments(argparse.ArgumentParser())
    assert options(sub) == options(random_checkpoint._parser())


@pytest.mark.parametrize("main, prog", [
    (checkpoint.main, f"{PROG} random"),
    (lambda argv: random_checkpoint.main(argv[1:]), "python -m model.random_checkpoint")])
@pytest.mark.parametrize("out, named", [
    ("file", "--out {file} is an existing file, not a directory"),
    ("file/sub", "--out {file}/sub cannot be created: {file}/sub: Not a directory")])
def test_an_out_that_cannot_be_created_is_one_line_exit_2(tmp_path, capsys, main, prog, out,
                                                          named):
    """Before: a FileExistsError or NotADirectoryError traceback."""
    file = tmp_path / "file"
    file.write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["random", "--preset", "tiny", "--out", str(tmp_path / out)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"{prog}: error: {named.format(file=file)}\n"
    assert file.read_text() == "mine"


def test_a_bad_option_is_prefixed_with_the_subcommand(tmp_path):
    done = run("random", "--preset", "tiny", "--out", str(tmp_path / "x"), "--hot-expert", "8")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (f"{PROG} random: error: hot_expert must be in "
                                            "[0, 8), got 8")
    assert "Traceback" not in done.stderr
