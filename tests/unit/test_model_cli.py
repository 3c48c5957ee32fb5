"""`python -m model` (model/__main__.py): its options reach the Engine."""
from __future__ import annotations

import pytest

from model import __main__ as cli
from model.engine import Engine


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
