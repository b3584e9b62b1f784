"""A CUDA driver program for the node agent's tests, written with ctypes (no toolkit).

``python cudaprobe.py meminfo``: print ``meminfo free=<bytes> total=<bytes>``.
``python cudaprobe.py fill <MiB>``: allocate ``<MiB>`` MiB at a time until the driver
refuses, printing each result and the error's name (``CUDA_ERROR_OUT_OF_MEMORY``).
``python cudaprobe.py hold <MiB> <seconds> [<path>]``: allocate once, print ``held`` and
what ``cuMemGetInfo`` says, sleep ``seconds`` (or until ``path`` exists), exit.
It loads ``libcuda.so.1`` the way any CUDA program does, so it runs on whatever driver
the library path gives it (the mock in tests), with or without libvgpu preloaded.
"""

from __future__ import annotations

import ctypes
import sys
import time
from pathlib import Path

MIB = 1 << 20


def main(argv: list[str]) -> int:
    cuda = ctypes.CDLL("libcuda.so.1")
    check(cuda, cuda.cuInit(0), "cuInit")
    ctx = ctypes.c_void_p()
    check(cuda, cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0), "cuDevicePrimaryCtxRetain")
    check(cuda, cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    command = argv[0]
    if command == "meminfo":
        meminfo(cuda)
    elif command == "fill":
        step = int(argv[1]) * MIB
        held = 0
        while True:
            ptr = ctypes.c_uint64()
            rc = cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(step))
            if rc != 0:
                print(f"cuMemAlloc({step // MIB} MiB) after {held // MIB} MiB: {name(cuda, rc)}")
                break
            held += step
        print(f"filled {held // MIB} MiB", flush=True)
    elif command == "hold":
        ptr = ctypes.c_uint64()
        size = ctypes.c_size_t(int(argv[1]) * MIB)
        check(cuda, cuda.cuMemAlloc_v2(ctypes.byref(ptr), size), "cuMemAlloc")
        print(f"held {argv[1]} MiB", flush=True)
        meminfo(cuda)
        until = time.monotonic() + float(argv[2])
        while time.monotonic() < until and not (len(argv) > 3 and Path(argv[3]).exists()):
            time.sleep(min(0.05, max(0.0, until - time.monotonic())))
    else:
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    return 0


def meminfo(cuda: ctypes.CDLL) -> None:
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    check(cuda, cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
    print(f"meminfo free={free.value} total={total.value}", flush=True)


def name(cuda: ctypes.CDLL, rc: int) -> str:
    text = ctypes.c_char_p()
    if cuda.cuGetErrorName(rc, ctypes.byref(text)) == 0:
        return (text.value or b"").decode()
    return f"CUresult {rc}"


def check(cuda: ctypes.CDLL, rc: int, what: str) -> None:
    if rc != 0:
        print(f"{what}: {name(cuda, rc)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
