"""Regenerate the Python stubs from proto/memsvc.proto (python -m memsvc.proto.build).

protoc runs over a temporary tree `memsvc/proto/memsvc.proto` so the generated
grpc module imports `memsvc.proto.memsvc_pb2` (our namespace), not a top-level
`memsvc_pb2`. `generate(out_dir)` is also used by the test that checks the
committed stubs are current.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("memsvc_pb2.py", "memsvc_pb2.pyi", "memsvc_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "memsvc" / "proto"
        src.mkdir(parents=True)
        shutil.copy(HERE / "memsvc.proto", src / "memsvc.proto")
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{tmp}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                str(src / "memsvc.proto"),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in OUTPUTS:
            shutil.copy(src / name, out_dir / name)
            written.append(out_dir / name)
        return written


if __name__ == "__main__":
    for path in generate(HERE):
        print(f"wrote {path}")
    sys.exit(0)
