#!/usr/bin/env bash
# The GPU checks in one run, for a machine with one CUDA device and no network.
#
#   bash bench/gpu_checks.sh [OUTDIR]        (from the repository root)
#
# Needs a python3 with torch (CUDA) and numpy. The sidecar's own dependencies and
# enginetime itself come as wheels in ./.whl when the machine cannot install them
# (build them beside a checkout with network: `pip wheel --no-deps -w .whl .` plus
# `pip download --no-deps` of grpcio, protobuf, grpcio-health-checking,
# grpcio-reflection and the opentelemetry SDK/exporter for that python); without
# ./.whl the current environment must already have `enginetime[sidecar,testbed]`.
# Each check runs from /tmp so the bare `enginetime/` folder of the checkout does not
# shadow the installed package, under its own time limit, and its output goes to
# OUTDIR/<check>.log as well as to the terminal.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-${OUT:-/tmp/enginetime-gpu}}
mkdir -p "$out"
if [ -d "$root/.whl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/enginetime-site "$root"/.whl/*.whl || exit 1
    export PYTHONPATH=/tmp/enginetime-site
fi
export PYTHONUNBUFFERED=1
cd /tmp || exit 1
nvidia-smi -L 2>&1 | tee "$out/device.log"
python3 -c "import torch, grpc, google.protobuf as p; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'grpc', grpc.__version__, 'protobuf', p.__version__)" 2>&1 | tee -a "$out/device.log"

status=0
check() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    cat "$out/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}
check cuda_timer 120 python3 "$root/bench/cuda_timer_check.py"
check adapters_cuda 120 python3 "$root/bench/adapters_cuda_check.py"
check testbed_cuda 240 python3 "$root/bench/testbed_cuda.py" --out "$out/testbed_cuda.json"
exit $status
