"""ORCA for proxies: attach a request's cost report to its response.

A proxy that forwards a request to the engine asks the sidecar for the request's report
once it finished (``client.request_cost(request_id)``) and sends it back to the caller or
the load balancer as the ``endpoint-load-metrics-bin`` trailer, where ORCA consumers (Envoy,
gRPC's weighted round robin) read per-call reports::

    report = client.request_cost(request_id)
    context.set_trailing_metadata([orca_trailer(report)])
"""

from __future__ import annotations

from enginetime.orca.orca_load_report_pb2 import OrcaLoadReport

#: The trailer ORCA consumers read a binary per-call load report from.
TRAILER = "endpoint-load-metrics-bin"


def orca_trailer(report: OrcaLoadReport) -> tuple[str, bytes]:
    """``(key, value)`` metadata carrying ``report`` (gRPC base64-encodes ``-bin`` values itself)."""
    return TRAILER, report.SerializeToString()


__all__ = ["TRAILER", "OrcaLoadReport", "orca_trailer"]
