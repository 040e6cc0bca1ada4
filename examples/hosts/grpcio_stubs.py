"""Google's protobuf + grpcio stubs for the host protocol, generated from spec/ with grpcio-tools.

Used by the grpcio example host and client: ``load()`` generates the stubs once into a cache
directory (``$SPAWNMESH_GRPCIO_STUBS`` or a temporary one), puts it on ``sys.path`` and returns
the modules. The spec's ``spawnmesh/`` directory is staged as ``smpb/`` because the spawnmesh
Python package, when installed, would shadow it (module paths only; the protobuf packages and
gRPC service names are unchanged).
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

SPEC = Path(__file__).resolve().parents[2] / "spec"


def generate(out: Path) -> None:
    """Run grpcio-tools' protoc over spec/ into ``out``."""
    staged = out / "_proto"
    if staged.exists():
        shutil.rmtree(staged)
    for src in SPEC.rglob("*.proto"):
        rel = src.relative_to(SPEC)
        if rel.parts[0] == "spawnmesh":
            rel = Path("smpb", *rel.parts[1:])
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, staged / rel)
    protos = [str(p.relative_to(staged)) for p in staged.rglob("*.proto")]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{staged}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ],
        check=True,
        cwd=staged,
    )


def load() -> SimpleNamespace:
    """Generate (once) and import the stubs: actor, protocol, host (+ _grpc), tck, rpc."""
    out = Path(
        os.environ.get("SPAWNMESH_GRPCIO_STUBS")
        or Path(tempfile.gettempdir()) / f"spawnmesh-grpcio-stubs-{os.getuid()}"
    )
    marker = out / "smpb" / "v1" / "host_pb2_grpc.py"
    newest = max(p.stat().st_mtime for p in SPEC.rglob("*.proto"))
    if not marker.exists() or marker.stat().st_mtime < newest:
        out.mkdir(parents=True, exist_ok=True)
        generate(out)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return SimpleNamespace(
        actor=importlib.import_module("spawn.actors.actor_pb2"),
        protocol=importlib.import_module("spawn.actors.protocol_pb2"),
        host=importlib.import_module("smpb.v1.host_pb2"),
        host_grpc=importlib.import_module("smpb.v1.host_pb2_grpc"),
        tck=importlib.import_module("smpb.tck.v1.tck_pb2"),
        status=importlib.import_module("google.rpc.status_pb2"),
        details=importlib.import_module("google.rpc.error_details_pb2"),
    )
