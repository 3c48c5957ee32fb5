"""The committed generated code is exactly what grpc_tools makes from protos/generator.proto."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("generator_pb2.py", "generator_pb2.pyi", "generator_pb2_grpc.py")


def test_generated_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    (tmp_path / "protos").mkdir()
    shutil.copy(ROOT / "protos" / "generator.proto", tmp_path / "protos")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                    "--pyi_out=.", "--grpc_python_out=.", "protos/generator.proto"],
                   cwd=tmp_path, check=True)
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        assert fresh == (ROOT / "protos" / name).read_text(), (
            f"protos/{name} is stale: regenerate it")


def test_every_message_field_is_commented():
    lines = (ROOT / "protos" / "generator.proto").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if ("=" in stripped and stripped.endswith(";")
                and not stripped.startswith(("//", "syntax", "package"))):
            assert lines[i - 1].strip().startswith("//"), f"line {i + 1} has no comment: {stripped}"


@pytest.mark.parametrize("argv", [["hi", "--seed", str(2**63)], ["hi", "--seed", str(-2**63 - 1)],
                                  ["hi", "--max-tokens", str(2**31)], ["hi", "--seed", "x"]])
def test_the_client_refuses_values_its_fields_cannot_hold(argv, capsys):
    from protos.client import main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "int" in capsys.readouterr().err


def test_client_help_lists_every_option_with_its_default(capsys):
    from protos.client import main
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())        # argparse wraps lines
    for option in ("--address", "--chat", "--system", "--max-tokens", "--temperature", "--top-p",
                   "--top-k", "--seed", "--stop", "--logprobs", "--unary", "--timeout",
                   "--prompt-token-ids", "--n", "--top-logprobs", "--prompt-logprobs",
                   "--presence-penalty", "--frequency-penalty", "--repetition-penalty",
                   "--logit-bias", "--min-tokens", "--stop-token-id", "--ignore-eos",
                   "--json-schema", "--regex", "--choice", "--grammar", "--json-object", "--tool",
                   "--tool-choice", "--parallel-tool-calls", "--no-parallel-tool-calls"):
        assert option in text
    assert "(default: localhost:9000)" in text and "(default: 64)" in text
