"""The gRPC API: ``service`` (AccountingService on grpc.aio), ``fanout`` (streaming
subscribers fed from the ledger's change feed) and ``convert`` (views to protobuf)."""
