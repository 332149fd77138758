"""The committed gRPC code is what proto/generate.py makes from the .proto today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_contract(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (test extra) regenerates the code")
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for path in gen.generate(tmp_path):
        committed = ROOT / "client" / "protocol" / path.name
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `python proto/generate.py` and commit the result")


def test_contract_names():
    from client.protocol import degrade_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Degrader"]
    assert pb.DESCRIPTOR.package == "degrade.v1"
    # ReleaseSlots: a same-host client gives back the shared-memory slots it mapped (issue 20)
    assert {m.name for m in service.methods} == {"GetInfo", "StreamBatches", "ReleaseSlots"}
    assert not service.methods_by_name["ReleaseSlots"].server_streaming
    assert service.methods_by_name["StreamBatches"].server_streaming
    assert not service.methods_by_name["GetInfo"].server_streaming
