/*
 * exitfree.c - a library whose ELF destructor frees device memory.
 *
 * Preloaded after libvgpu (LD_PRELOAD="libvgpu.so libexitfree.so"), its
 * constructor allocates $EXITFREE_SIZE bytes (k/m/g suffixes) and its
 * destructor frees them after libvgpu's own destructor has run: the free of a
 * library that outlives libvgpu at exit.
 */
#include <stdlib.h>

#include "../../mockgpu/mockgpu.h"

CUresult cuInit(unsigned int);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemFree_v2(CUdeviceptr);

static CUdeviceptr held;

__attribute__((constructor)) static void allocate(void) {
    const char *text = getenv("EXITFREE_SIZE");
    if (text == NULL) return;
    char *end;
    size_t size = strtoull(text, &end, 10);
    if (*end == 'm') size <<= 20;
    CUcontext ctx;
    if (cuInit(0) != CUDA_SUCCESS || cuDevicePrimaryCtxRetain(&ctx, 0) != CUDA_SUCCESS ||
        cuCtxSetCurrent(ctx) != CUDA_SUCCESS || cuMemAlloc_v2(&held, size) != CUDA_SUCCESS)
        abort();
}

__attribute__((destructor)) static void release(void) {
    if (held != 0) cuMemFree_v2(held);
}
