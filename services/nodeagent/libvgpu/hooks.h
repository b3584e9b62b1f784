/*
 * hooks.h - every driver and NVML entry point libvgpu interposes.
 *
 * One list drives the exported wrappers' prototypes, the pointers to the real
 * functions, and the name and address tables that answer dlsym and
 * cuGetProcAddress, so a new hook cannot be exported without being reachable
 * through every lookup path (HAMi-core #57).
 */
#ifndef VSLICE_HOOKS_H
#define VSLICE_HOOKS_H

#include "vgpu.h"

#define VGPU_CUDA_HOOKS(X)                                                                         \
    X(cuMemAlloc_v2, (CUdeviceptr * dptr, size_t bytesize))                                        \
    X(cuMemAlloc, (CUdeviceptr_v1 * dptr, unsigned int bytesize))                                  \
    X(cuMemFree_v2, (CUdeviceptr dptr))                                                            \
    X(cuMemFree, (CUdeviceptr_v1 dptr))                                                            \
    X(cuMemAllocPitch_v2, (CUdeviceptr * dptr, size_t * pitch, size_t width, size_t height,        \
                           unsigned int element_size))                                             \
    X(cuMemAllocPitch, (CUdeviceptr_v1 * dptr, unsigned int *pitch, unsigned int width,            \
                        unsigned int height, unsigned int element_size))                           \
    X(cuMemAllocManaged, (CUdeviceptr * dptr, size_t bytesize, unsigned int flags))                \
    X(cuMemGetInfo_v2, (size_t * free_bytes, size_t * total_bytes))                                \
    X(cuMemGetInfo, (unsigned int *free_bytes, unsigned int *total_bytes))                         \
    X(cuDeviceTotalMem_v2, (size_t * bytes, CUdevice dev))                                         \
    X(cuDeviceTotalMem, (unsigned int *bytes, CUdevice dev))                                       \
    X(cuMemCreate, (CUmemGenericAllocationHandle * handle, size_t size,                            \
                    const CUmemAllocationProp *prop, unsigned long long flags))                    \
    X(cuMemRelease, (CUmemGenericAllocationHandle handle))                                         \
    X(cuDeviceGetDefaultMemPool, (CUmemoryPool * pool, CUdevice dev))                              \
    X(cuMemAllocAsync, (CUdeviceptr * dptr, size_t bytesize, CUstream stream))                     \
    X(cuMemAllocAsync_ptsz, (CUdeviceptr * dptr, size_t bytesize, CUstream stream))                \
    X(cuMemAllocFromPoolAsync,                                                                     \
      (CUdeviceptr * dptr, size_t bytesize, CUmemoryPool pool, CUstream stream))                   \
    X(cuMemAllocFromPoolAsync_ptsz,                                                                \
      (CUdeviceptr * dptr, size_t bytesize, CUmemoryPool pool, CUstream stream))                   \
    X(cuMemFreeAsync, (CUdeviceptr dptr, CUstream stream))                                         \
    X(cuMemFreeAsync_ptsz, (CUdeviceptr dptr, CUstream stream))                                    \
    X(cuMemPoolTrimTo, (CUmemoryPool pool, size_t min_bytes_to_keep))                              \
    X(cuArrayCreate_v2, (CUarray * handle, const CUDA_ARRAY_DESCRIPTOR *desc))                     \
    X(cuArray3DCreate_v2, (CUarray * handle, const CUDA_ARRAY3D_DESCRIPTOR *desc))                 \
    X(cuArrayDestroy, (CUarray handle))                                                            \
    X(cuMipmappedArrayCreate, (CUmipmappedArray * handle, const CUDA_ARRAY3D_DESCRIPTOR *desc,     \
                               unsigned int levels))                                               \
    X(cuMipmappedArrayDestroy, (CUmipmappedArray handle))                                          \
    X(cuGraphAddMemAllocNode, (CUgraphNode * node, CUgraph graph, const CUgraphNode *deps,         \
                               size_t ndeps, CUDA_MEM_ALLOC_NODE_PARAMS *params))                  \
    X(cuDeviceGraphMemTrim, (CUdevice dev))                                                        \
    X(cuLaunchKernel, (CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,            \
                       unsigned int bx, unsigned int by, unsigned int bz, unsigned int shmem,      \
                       CUstream stream, void **params, void **extra))                              \
    X(cuLaunchKernel_ptsz, (CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,       \
                            unsigned int bx, unsigned int by, unsigned int bz, unsigned int shmem, \
                            CUstream stream, void **params, void **extra))                         \
    X(cuLaunchKernelEx, (const CUlaunchConfig *config, CUfunction f, void **params, void **extra)) \
    X(cuLaunchKernelEx_ptsz,                                                                       \
      (const CUlaunchConfig *config, CUfunction f, void **params, void **extra))                   \
    X(cuLaunchCooperativeKernel,                                                                   \
      (CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,           \
       unsigned int by, unsigned int bz, unsigned int shmem, CUstream stream, void **params))      \
    X(cuLaunchCooperativeKernel_ptsz,                                                              \
      (CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,           \
       unsigned int by, unsigned int bz, unsigned int shmem, CUstream stream, void **params))      \
    X(cuGraphLaunch, (CUgraphExec graph, CUstream stream))                                         \
    X(cuGraphLaunch_ptsz, (CUgraphExec graph, CUstream stream))                                    \
    X(cuGetProcAddress, (const char *symbol, void **pfn, int version, cuuint64_t flags))           \
    X(cuGetProcAddress_v2, (const char *symbol, void **pfn, int version, cuuint64_t flags,         \
                            CUdriverProcAddressQueryResult *status))

#define VGPU_NVML_HOOKS(X)                                                                         \
    X(nvmlDeviceGetMemoryInfo, (nvmlDevice_t device, nvmlMemory_t * memory))                       \
    X(nvmlDeviceGetMemoryInfo_v2, (nvmlDevice_t device, nvmlMemory_v2_t * memory))

#define VGPU_DECLARE_CUDA(name, params)                                                            \
    VGPU_HIDDEN extern CUresult(*vgpu_real_##name) params;                                         \
    VGPU_API CUresult name params;
#define VGPU_DECLARE_NVML(name, params)                                                            \
    VGPU_HIDDEN extern nvmlReturn_t(*vgpu_real_##name) params;                                     \
    VGPU_API nvmlReturn_t name params;
VGPU_CUDA_HOOKS(VGPU_DECLARE_CUDA)
VGPU_NVML_HOOKS(VGPU_DECLARE_NVML)

#endif
