#!/usr/bin/env bash
# Regenerates the committed Python stubs from proto/enginetime/v1/*.proto.
#
# Pinned grpcio-tools 1.75.1 (protoc with protobuf 6.31 gencode): the stubs run
# on protobuf runtimes 6.x and 7.x, so the client installs into session-server
# environments that pin either. Usage: scripts/gen_proto.sh [OUT_DIR]
# (default: proto/, i.e. in place; the drift test writes elsewhere and compares).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/proto}"
py="${PYTHON:-$root/.venv/bin/python}"
want="1.75.1"
have="$("$py" -c 'import grpc_tools, importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)"
if [ "$have" != "$want" ]; then
  echo "gen_proto: need grpcio-tools==$want in $py (have: ${have:-none}); run 'make venv'" >&2
  exit 1
fi
mkdir -p "$out/enginetime/v1"
cd "$root/proto"
"$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  enginetime/v1/ingest.proto enginetime/v1/accounting.proto
