"""`python -m model` (model/__main__.py): its options reach the Engine, and a bad checkpoint,
option or request is one line on stderr, exit 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from model import __main__ as cli
from model.engine import Engine
from tests.unit.test_quant_checkpoint import variant


class Built(Exception):
    """Raised in place of building the engine: the test only checks its arguments."""


def test_quantization_int8_reaches_the_engine(monkeypatch, tmp_path):
    """Issue 25: --quantization int8 quantizes the experts at load; other values are refused
    by the parser, naming the choices."""
    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs, path=path)
        raise Built

    monkeypatch.setattr(Engine, "from_pretrained", from_pretrained)
    with pytest.raises(Built):
        cli.main(["hi", "--checkpoint", str(tmp_path), "--quantization", "int8"])
    assert seen == {"path": str(tmp_path), "dtype": "auto", "device": seen["device"],
                    "quantization": "int8"}
    with pytest.raises(Built):
        cli.main(["hi", "--checkpoint", str(tmp_path)])
    assert seen["quantization"] is None


def test_an_unknown_quantization_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["hi", "--quantization", "fp8"])
    assert "--quantization: invalid choice: 'fp8' (choose from 'int8')" in capsys.readouterr().err


@pytest.mark.parametrize("args, named", [
    (["--checkpoint", "{missing}"], "ConfigError: no config.json at {missing}"),
    (["--checkpoint", "{fp8}", "--quantization", "int8"],
     "ValueError: quantization='int8': the checkpoint {fp8} is already quantized"),
    (["--checkpoint", "{awq}"], "CheckpointError: config.json quantization_config."
                                "quant_method 'awq' is not supported"),
    (["--temperature", "-1"], "InvalidRequest: temperature must be a finite number >= 0")])
def test_a_bad_checkpoint_or_request_is_one_line_and_exit_2(tiny_fp8_checkpoint, tmp_path,
                                                            capsys, args, named):
    """Issue 25 (a fresh user's try): a 15-30 line traceback before; errors that are not a
    ValueError still propagate (test_quantization_int8_reaches_the_engine's Built)."""
    paths = {"missing": tmp_path / "missing", "fp8": tiny_fp8_checkpoint,
             "awq": variant(tiny_fp8_checkpoint, tmp_path, {"quant_method": "awq"})}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["hi", "--max-tokens", "1", *(a.format(**paths) for a in args)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.splitlines()[-1].startswith(
        "python -m model: error: " + named.format(**paths)), err


def test_the_error_is_the_only_line_on_stderr(tmp_path):
    done = subprocess.run([sys.executable, "-m", "model", "hi", "--checkpoint",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"python -m model: error: ConfigError: no config.json at " \
                          f"{tmp_path / 'missing'}\n"
