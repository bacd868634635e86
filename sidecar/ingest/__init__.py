"""Ingest: engine hooks' frames in, ledger records out.

``server`` (the asyncio Unix/TCP server, one connection per recorder) feeds
``frames`` (the incremental decoder of length-delimited ``IngestFrame``s), which
yields the plain records of ``records`` to the ledger's ingest seam
(:class:`enginetime.sidecar.ledger.protocols.IngestSink`).
"""
