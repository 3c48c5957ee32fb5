"""The gRPC API (`mixtral_ep.v1`): generator.proto and its generated Python. Regenerate from the
repository root with

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. \\
        protos/generator.proto

(tests/unit/test_protos.py fails on any difference)."""
