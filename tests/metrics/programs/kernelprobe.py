"""A CUDA driver program for the metrics tests, written with ctypes (no toolkit): hold
device memory and keep launching kernels, so a slice has usage, utilization and a last
kernel to report.

``python kernelprobe.py <MiB> <seconds>``: allocate ``<MiB>`` MiB once, print ``held``,
then launch 2 ms kernels (the mock driver's ``struct vslice_mock_kernel`` as the function
handle, ``mockgpu.h``) one after the other for ``<seconds>`` seconds, and exit 0.
"""

from __future__ import annotations

import ctypes
import sys
import time

MIB = 1 << 20
MOCK_KERNEL_MAGIC = 0x4C4E524B4B434F4D  # "MOCKKRNL", mockgpu.h


class MockKernel(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint64), ("duration_ns", ctypes.c_uint64)]


def main(argv: list[str]) -> int:
    cuda = ctypes.CDLL("libcuda.so.1")
    check(cuda.cuInit(0), "cuInit")
    ctx = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    ptr = ctypes.c_uint64()
    check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(int(argv[0]) * MIB)), "alloc")
    print(f"held {argv[0]} MiB", flush=True)
    kernel = MockKernel(MOCK_KERNEL_MAGIC, 2_000_000)
    launch = cuda.cuLaunchKernel
    launch.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p] + [
        ctypes.c_void_p
    ] * 2
    deadline = time.monotonic() + float(argv[1])
    while time.monotonic() < deadline:
        check(launch(ctypes.addressof(kernel), 1, 1, 1, 1, 1, 1, 0, None, None, None), "launch")
        check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    return 0


def check(rc: int, what: str) -> None:
    if rc != 0:
        print(f"{what}: CUresult {rc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
