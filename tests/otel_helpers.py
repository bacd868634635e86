"""Test helpers for span export and /metrics: real OTLP receivers and a Prometheus scrape.

- ``OtlpGrpcReceiver``: a gRPC ``TraceService`` server built from the official
  opentelemetry-proto stubs, on a free loopback port; the sidecar's real OTLP
  exporter sends to it over a socket.
- ``OtlpHttpReceiver``: the same for OTLP/HTTP (protobuf bodies on POST /v1/traces).
- ``scrape(address)``: GET /metrics and parse it with prometheus_client's own parser.
"""

from __future__ import annotations

import gzip
import http.server
import threading
import urllib.request
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families


def any_value(v: AnyValue) -> object:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(any_value(x) for x in v.array_value.values)
    return getattr(v, kind) if kind else None


def attributes(kvs: list[KeyValue]) -> dict[str, object]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class ReceivedSpan:
    span: Span
    resource: dict[str, object]
    scope: str

    @property
    def attrs(self) -> dict[str, object]:
        return attributes(self.span.attributes)


class _Store:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.cond = threading.Condition()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.cond:
            self.requests += 1
            for rs in request.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        self.spans.append(ReceivedSpan(span, resource, ss.scope.name))
            self.cond.notify_all()

    def wait_for(self, predicate, timeout: float = 20.0, message: str = ""):
        """Wait until ``predicate(spans)`` is truthy; return its value. AssertionError on timeout."""
        with self.cond:
            ok = self.cond.wait_for(lambda: predicate(self.spans), timeout)
            if not ok:
                raise AssertionError(f"{message or 'spans never arrived'}; got {len(self.spans)} spans")
            return predicate(self.spans)


class OtlpGrpcReceiver(_Store):
    """An OTLP/gRPC trace receiver on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        super().__init__()
        store = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (the generated name)
                store.add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop(0)

    def __enter__(self) -> OtlpGrpcReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OtlpHttpReceiver(_Store):
    """An OTLP/HTTP trace receiver (protobuf) on 127.0.0.1:<free port>; records the paths posted to."""

    def __init__(self) -> None:
        super().__init__()
        store = self
        self.paths: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                store.paths.append(self.path)
                content_type = self.headers.get("Content-Type")
                ok = self.path == "/v1/traces" and content_type == "application/x-protobuf"
                if ok:
                    store.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> OtlpHttpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(address: str) -> dict[Sample, float]:
    """GET http://address/metrics, parsed by prometheus_client: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metrics_address(stdout_lines: list[str]) -> str:
    """The metrics=HOST:PORT field of a sidecar's ready line."""
    for line in stdout_lines:
        for part in line.split():
            if part.startswith("metrics="):
                return part.split("=", 1)[1]
    raise AssertionError(f"no metrics= in the sidecar's ready line: {stdout_lines}")
