"""Regenerate the Python stubs from proto/memsvc.proto (python -m memsvc.proto.build, or `make proto`).

protoc runs over a temporary tree `memsvc/proto/memsvc.proto` so the generated
grpc module imports `memsvc.proto.memsvc_pb2` (our namespace), not a top-level
`memsvc_pb2`. `generate(out_dir)` is also used by the test that checks the
committed stubs are current: `stale(...)` compares them with freshly generated
ones with the generator's version stamps set aside (a generator release alone
changes those lines, nothing else), so it fails on a change to memsvc.proto
that `make proto` did not follow, and not on a newer grpcio-tools. The committed
stubs come from the grpcio-tools in requirements.lock (`generator_version`).
"""
from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("memsvc_pb2.py", "memsvc_pb2.pyi", "memsvc_pb2_grpc.py")
# the lines a generator release changes in the stubs of an unchanged memsvc.proto
_STAMPS = (
    re.compile(r"^GRPC_GENERATED_VERSION = '[^']*'$", re.M),
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"(_runtime_version\.Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,\n"),
)


def generate(out_dir: Path, proto: Path | None = None) -> list[Path]:
    """Stubs of `proto` (default: proto/memsvc.proto) written to out_dir."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "memsvc" / "proto"
        src.mkdir(parents=True)
        shutil.copy(proto or HERE / "memsvc.proto", src / "memsvc.proto")
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


def without_stamps(text: str) -> str:
    for pattern in _STAMPS:
        text = pattern.sub(lambda m: m.group(1) if m.groups() else "", text)
    return text


def stale(committed: Path, generated: Path) -> list[str]:
    """The stub files in `committed` whose code differs from `generated`'s, version stamps aside."""
    return [name for name in OUTPUTS
            if without_stamps((committed / name).read_text()) != without_stamps((generated / name).read_text())]


def generator_version(stubs: Path = HERE) -> str:
    """The grpcio-tools release that generated the stubs in `stubs`."""
    m = _STAMPS[0].search((stubs / "memsvc_pb2_grpc.py").read_text())
    return m.group(0).split("'")[1] if m else ""


if __name__ == "__main__":
    for path in generate(HERE):
        print(f"wrote {path}")
    sys.exit(0)
