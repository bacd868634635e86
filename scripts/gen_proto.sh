#!/usr/bin/env bash
# Regenerates the committed Python stubs from proto/enginetime/v1/*.proto and ORCA's
# proto/xds/**/*.proto (into proto/enginetime/orca/).
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
# ORCA's protos (proto/xds/..., the published xDS definitions) keep their upstream file
# names and packages for interoperability; their Python modules live in enginetime.orca
# (no top-level `xds` package in our wheel), so the imports are rewritten after protoc.
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$root/proto"
"$py" -m grpc_tools.protoc -I . \
  --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
  enginetime/v1/ingest.proto enginetime/v1/accounting.proto \
  xds/data/orca/v3/orca_load_report.proto xds/service/orca/v3/orca.proto
find "$tmp" -name '*_pb2*' -exec sed -i \
  -e 's/^from xds\.data\.orca\.v3 import /from enginetime.orca import /' \
  -e 's/^from xds\.service\.orca\.v3 import /from enginetime.orca import /' {} +
mkdir -p "$out/enginetime/v1" "$out/enginetime/orca"
cp "$tmp"/enginetime/v1/*_pb2* "$out/enginetime/v1/"
cp "$tmp"/xds/data/orca/v3/*_pb2.py* "$tmp"/xds/service/orca/v3/*_pb2* "$out/enginetime/orca/"
# The wheel's copy of ORCA's .proto files (accounting.proto imports one): an include root for
# them is site-packages/enginetime/orca/proto (docs/CLIENTS.md).
for f in xds/data/orca/v3/orca_load_report.proto xds/service/orca/v3/orca.proto; do
  mkdir -p "$out/enginetime/orca/proto/$(dirname "$f")"
  cp "$root/proto/$f" "$out/enginetime/orca/proto/$f"
done
