"""Regenerate the Python gRPC code from the contract: ``python proto/generate.py``.

The generated modules are committed (``client/protocol/``) so that a fresh
checkout works without a code-generation step; ``tests/test_proto.py`` fails if
they drift from ``proto/degrade/v1/degrade.proto``.  Needs ``grpcio-tools``
(in the ``test`` extra).

protoc writes ``from degrade.v1 import degrade_pb2``, which would need a
top-level ``degrade`` package; the one import line is rewritten to a relative
import so the code lives inside the ``client`` package.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTO = "degrade/v1/degrade.proto"
DEST = ROOT.parent / "client" / "protocol"
GENERATED = ("degrade_pb2.py", "degrade_pb2.pyi", "degrade_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into ``out_dir``; returns their paths."""
    from grpc_tools import protoc
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{ROOT}", f"-I{include}",
            f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", PROTO,
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "degrade" / "v1" / name).read_text()
            text = re.sub(r"^from degrade\.v1 import degrade_pb2", "from . import degrade_pb2", text, flags=re.M)
            path = out_dir / name
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEST, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
