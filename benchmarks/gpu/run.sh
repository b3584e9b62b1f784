#!/usr/bin/env bash
# Builds libvgpu on the GPU machine and runs slice_check.py there, printing the
# machine, the driver and each check's figures:
#
#     bash benchmarks/gpu/run.sh [--device N]
#
# Needs gcc, nvidia-smi, and a python3 with torch (CUDA) and pynvml.
set -u
cd "$(dirname "$0")/../.."
echo "== machine"; date -u; uname -r
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || exit 2
python3 -c 'import torch, pynvml; print("torch", torch.__version__, "cuda", torch.version.cuda)' || exit 2
gcc --version | head -1
echo "== build"
make --no-print-directory -C services/nodeagent/mockgpu >/dev/null &&
	make --no-print-directory -C services/nodeagent/libvgpu libvgpu.so build/lookups >/dev/null ||
	echo "build failed: using the libvgpu.so and build/lookups already there" >&2
test -f services/nodeagent/libvgpu/libvgpu.so || exit 2
echo "== checks"
PYTHONUNBUFFERED=1 timeout 480 python3 benchmarks/gpu/slice_check.py "$@"
