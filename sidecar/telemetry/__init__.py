"""What leaves the sidecar besides the API: ``finished`` (settled records of finished
requests), ``tracing`` and ``span_process`` (OpenTelemetry spans, exported from a child
process), ``metrics`` (Prometheus /metrics)."""
