"""Generates the Python stubs in emoe/rpc/v1/ from protos/emoe/v1/*.proto.

    python -m emoe.rpc.protogen          # regenerate (commit the result)

The stubs are committed; tests/rpc/test_protogen.py fails when they are stale. protoc lays
its output out by proto package (``emoe/v1/...``, importing ``emoe.v1``); the stubs live in
``emoe.rpc.v1``, so their imports are rewritten.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE_DIR = Path("emoe/v1")
STUB_DIR = Path(__file__).resolve().parent / "v1"
STUB_PACKAGE = "emoe.rpc.v1"

_IMPORT = re.compile(r"^from emoe\.v1 import ", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))


def generate() -> dict[str, str]:
    """Runs protoc on every proto; returns {stub file name: contents}."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as out:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out}",
                f"--pyi_out={out}", f"--grpc_python_out={out}",
                *(str(p.relative_to(PROTO_ROOT)) for p in proto_files())]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        generated = Path(out) / PROTO_PACKAGE_DIR
        return {p.name: _IMPORT.sub(f"from {STUB_PACKAGE} import ", p.read_text())
                for p in sorted(generated.iterdir()) if p.is_file()}


def write(stubs: dict[str, str]) -> None:
    STUB_DIR.mkdir(exist_ok=True)
    for old in STUB_DIR.glob("*_pb2*"):
        if old.name not in stubs:
            old.unlink()
    for name, text in stubs.items():
        (STUB_DIR / name).write_text(text)


def main() -> int:
    stubs = generate()
    write(stubs)
    print(f"wrote {len(stubs)} files to {STUB_DIR}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
