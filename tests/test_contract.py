"""The wire and API contract: .proto files, committed stubs, and the stdlib mirrors of their enums."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from enginetime.clients import InterferencePhase
from enginetime.engine_hooks import constants
from enginetime.orca import orca_load_report_pb2, orca_pb2
from enginetime.sidecar.ledger import views
from enginetime.v1 import accounting_pb2, ingest_pb2

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.e2e
def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    """Regenerate with the pinned grpcio-tools and compare byte for byte: a .proto edit
    without `make proto` (or a hand edit of a stub) fails here."""
    subprocess.run(
        [str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    for sub in ("v1", "orca"):
        committed_dir = ROOT / "proto" / "enginetime" / sub
        generated = sorted(p.name for p in (tmp_path / "enginetime" / sub).glob("*_pb2*"))
        assert generated, f"gen_proto.sh produced nothing in enginetime/{sub}"
        committed = sorted(p.name for p in committed_dir.glob("*_pb2*"))
        assert generated == committed
        match, mismatch, errors = filecmp.cmpfiles(
            tmp_path / "enginetime" / sub, committed_dir, generated, shallow=False
        )
        assert not mismatch and not errors, (
            f"stubs drifted from the .proto files: {mismatch + errors}; run `make proto`"
        )
    # The wheel's copies of ORCA's .proto files are the repository's.
    for f in ("xds/data/orca/v3/orca_load_report.proto", "xds/service/orca/v3/orca.proto"):
        copy = ROOT / "proto" / "enginetime" / "orca" / "proto" / f
        assert copy.read_bytes() == (ROOT / "proto" / f).read_bytes(), f"{copy} is stale; run `make proto`"


def test_orca_protos_are_the_published_definitions() -> None:
    """ORCA clients find the service by its full method path and decode reports by field number:
    both must be the xDS project's (xds/data/orca/v3, xds/service/orca/v3)."""
    report = orca_load_report_pb2.OrcaLoadReport.DESCRIPTOR
    assert report.full_name == "xds.data.orca.v3.OrcaLoadReport"
    assert report.file.name == "xds/data/orca/v3/orca_load_report.proto"
    assert {f.name: (f.number, f.type) for f in report.fields} == {
        "cpu_utilization": (1, 1),  # TYPE_DOUBLE
        "mem_utilization": (2, 1),
        "rps": (3, 4),  # TYPE_UINT64
        "request_cost": (4, 11),  # map<string, double>: a repeated map-entry message
        "utilization": (5, 11),
        "rps_fractional": (6, 1),
        "eps": (7, 1),
        "named_metrics": (8, 11),
        "application_utilization": (9, 1),
    }
    for name in ("request_cost", "utilization", "named_metrics"):
        entry = report.fields_by_name[name].message_type
        assert entry.GetOptions().map_entry
        assert [(f.name, f.type) for f in entry.fields] == [("key", 9), ("value", 1)]
    service = orca_pb2.DESCRIPTOR.services_by_name["OpenRcaService"]
    assert service.full_name == "xds.service.orca.v3.OpenRcaService"
    method = service.methods_by_name["StreamCoreMetrics"]
    assert method.server_streaming and not method.client_streaming
    assert method.output_type is report
    req = orca_pb2.OrcaLoadReportRequest.DESCRIPTOR
    assert req.full_name == "xds.service.orca.v3.OrcaLoadReportRequest"
    assert {f.name: f.number for f in req.fields} == {"report_interval": 1, "request_cost_names": 2}
    assert req.fields_by_name["report_interval"].message_type.full_name == "google.protobuf.Duration"


@pytest.mark.e2e
def test_buf_lint_standard() -> None:
    """buf STANDARD style (package layout, naming, enum zero values, RPC message names)."""
    buf = BIN / "buf"
    assert buf.exists(), "buf not installed: the buf-bin package is in the [dev] extra"
    result = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("mirror", "proto_enum", "prefix"),
    [
        (constants.Coupling, ingest_pb2.Coupling, "COUPLING_"),
        (constants.TimerSource, ingest_pb2.TimerSource, "TIMER_SOURCE_"),
        (constants.StepKind, ingest_pb2.StepKind, "STEP_KIND_"),
        (constants.EventKind, ingest_pb2.RequestEventKind, "REQUEST_EVENT_KIND_"),
        (views.RequestState, accounting_pb2.RequestState, "REQUEST_STATE_"),
        (views.InterferencePhase, accounting_pb2.InterferenceEvent.Phase, "PHASE_"),
        (InterferencePhase, accounting_pb2.InterferenceEvent.Phase, "PHASE_"),
    ],
)
def test_stdlib_enums_mirror_the_proto(mirror, proto_enum, prefix: str) -> None:
    """The engine side cannot import protobuf, so it carries its own copies of the enums."""
    proto_values = {name.removeprefix(prefix): number for name, number in proto_enum.items()}
    assert {m.name: m.value for m in mirror} == proto_values


def test_every_rpc_of_the_design_is_in_the_service() -> None:
    service = accounting_pb2.DESCRIPTOR.services_by_name["AccountingService"]
    assert set(service.methods_by_name) == {
        "GetRequest",
        "ListRequests",
        "WatchRequest",
        "StreamUpdates",
        "GetShards",
        "StreamInterference",
        "Advise",
        "GetRequestCost",
    }
    streaming = {m.name for m in service.methods if m.server_streaming}
    assert streaming == {"WatchRequest", "StreamUpdates", "StreamInterference"}


def test_request_accounting_carries_every_field_the_design_names() -> None:
    fields = set(accounting_pb2.RequestAccounting.DESCRIPTOR.fields_by_name)
    assert {
        "request_id",
        "session_id",
        "engine_id",
        "shard",
        "state",
        "arrival_time",
        "queue_time",
        "engine_time",
        "gpu_time",
        "interference",
        "wall",
        "tokens",
        "steps",
        "preemptions",
        "top_blame",
        "partial",
        "last_step_time",
        "migrated",
    } <= fields
    step_fields = set(ingest_pb2.StepRecord.DESCRIPTOR.fields_by_name)
    assert {
        "seq",
        "global_step",
        "start_time_ns",
        "end_time_ns",
        "device_time_ns",
        "timer_source",
        "kind",
        "handles",
        "prefill_tokens",
        "decode_tokens",
        "context_tokens",
        "peer_tokens",
    } <= step_fields
    # Columns are packed fixed32 so the hook side can write array('I').tobytes().
    for name in ("handles", "prefill_tokens", "decode_tokens", "context_tokens", "peer_tokens"):
        assert ingest_pb2.StepRecord.DESCRIPTOR.fields_by_name[name].type == 7  # TYPE_FIXED32


def test_parse_address_errors_say_what_is_accepted() -> None:
    assert constants.parse_address("unix:/tmp/x.sock") == ("unix", "/tmp/x.sock")
    assert constants.parse_address("tcp:127.0.0.1:7070") == ("tcp", ("127.0.0.1", 7070))
    assert constants.parse_address("tcp:[::1]:7070") == ("tcp", ("::1", 7070))
    for bad in ("", "unix:", "tcp:host", "tcp:host:99999", "http://x"):
        with pytest.raises(ValueError, match="unix:PATH|tcp:HOST:PORT|needs a path"):
            constants.parse_address(bad)
