/*
 * mockgpu.h - what a test program needs to drive the vslice mock GPU.
 *
 * The mock driver has no modules or compiler, so a "kernel" is described by
 * the program itself: a CUfunction (for cuLaunchKernel, cuLaunchKernelEx,
 * cuLaunchCooperativeKernel) or a CUgraphExec (for cuGraphLaunch) passed to
 * the mock must point at a struct vslice_mock_kernel.  The launch occupies
 * the device for duration_ns nanoseconds, after every kernel already queued on
 * that device by any process (one FIFO per device, like a time-sliced card).
 * A launch returns at once, as on a real card, unless the calling process
 * already has VSLICE_MOCK_QUEUE_DEPTH kernels pending on the device, in which
 * case it blocks like a full push buffer.  A handle with the wrong magic gets
 * CUDA_ERROR_INVALID_HANDLE.
 */
#ifndef VSLICE_MOCKGPU_H
#define VSLICE_MOCKGPU_H

#include <stdint.h>

#include "../libvgpu/cudadefs.h"

#define VSLICE_MOCK_KERNEL_MAGIC 0x4c4e524b4b434f4dULL /* "MOCKKRNL" */
#define VSLICE_MOCK_QUEUE_DEPTH 1024

struct vslice_mock_kernel {
    uint64_t magic;       /* VSLICE_MOCK_KERNEL_MAGIC */
    uint64_t duration_ns; /* device time the kernel (or whole graph) takes */
};

/* Mock-only entry points (not part of the CUDA API, so libvgpu never sees
 * them): an allocation the interposer cannot have tracked, and the number of
 * allocation calls that reached the mock driver in this process. */
CUresult vsliceMockRawAlloc(CUdeviceptr *dptr, size_t bytesize);
unsigned long long vsliceMockDriverAllocCalls(void);

#endif
