"""The committed generated code is what `make protos` makes from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

from tests.unit.test_lock import locked

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("sidecar_pb2.py", "sidecar_pb2.pyi", "sidecar_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """Regenerating from protos/ with the locked grpcio-tools gives byte-identical files (else
    run `make protos`)."""
    assert metadata.version("grpcio-tools") == locked("dev.txt")["grpcio-tools"]
    command = [
        sys.executable, "-m", "grpc_tools.protoc", "-I", str(ROOT / "protos"),
        f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
        str(ROOT / "protos/tether/v1/sidecar.proto"),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    for name in GENERATED:
        fresh = (tmp_path / "tether/v1" / name).read_bytes()
        committed = (ROOT / "sdk/python/tether/v1" / name).read_bytes()
        assert fresh == committed, f"{name} is stale: run `make protos` and commit the result"
