/*
 * memory.c - every device-memory allocation path, charged before the driver.
 *
 * A request that would pass the slice's cap returns CUDA_ERROR_OUT_OF_MEMORY
 * without reaching the driver; one that fits is charged first (so a racing
 * process cannot take the same bytes), then given back if the driver fails.
 * Frees credit exactly what was charged; pointers libvgpu did not charge go
 * to the driver untouched (HAMi-core #257).
 */
#include <pthread.h>
#include <stdio.h>

#include "hooks.h"
#include "track.h"

static struct vgpu_table *g_ptrs;    /* device pointer -> bytes, device */
static struct vgpu_table *g_handles; /* cuMemCreate handle -> bytes, device */
static struct vgpu_table *g_pools;   /* memory pool -> device */
static pthread_once_t g_tables_once = PTHREAD_ONCE_INIT;

static void make_tables(void) {
    g_ptrs = vgpu_table_new();
    g_handles = vgpu_table_new();
    g_pools = vgpu_table_new();
}

static inline void ready(void) {
    vgpu_init();
    pthread_once(&g_tables_once, make_tables);
}

static int current_device(void) {
    CUdevice d;
    if (vgpu_real_cuCtxGetDevice == NULL || vgpu_real_cuCtxGetDevice(&d) != CUDA_SUCCESS) return -1;
    return d < VGPU_MAX_DEVICES ? d : -1;
}

static CUresult admit(int dev, uint64_t bytes, const char *call) {
    if (vgpu_charge(dev, bytes)) return CUDA_SUCCESS;
    VGPU_LOG(VGPU_LOG_INFO,
             "%s: %llu bytes refused on device %d: %llu of the slice's %llu bytes are charged", call,
             (unsigned long long)bytes, dev, (unsigned long long)vgpu_used(dev),
             (unsigned long long)vgpu_limit(dev));
    return CUDA_ERROR_OUT_OF_MEMORY;
}

/* Records a successful allocation, or gives the charge back on failure. */
static void settle(struct vgpu_table *t, CUresult r, uint64_t key, uint64_t bytes, int dev) {
    if (r != CUDA_SUCCESS) {
        vgpu_credit(dev, bytes);
    } else if (!vgpu_table_put(t, key, bytes, dev)) {
        /* untracked, its free will not credit: better than crediting twice */
        VGPU_LOG(VGPU_LOG_ERROR, "out of host memory tracking an allocation of %llu bytes",
                 (unsigned long long)bytes);
    }
}

#define NO_DRIVER(fn)                                                                              \
    if (UNLIKELY(vgpu_real_##fn == NULL)) return CUDA_ERROR_NOT_FOUND

/* ---- plain allocations ------------------------------------------------------ */

static CUresult alloc_v2(CUresult (*real)(CUdeviceptr *, size_t), const char *call,
                         CUdeviceptr *dptr, size_t bytesize) {
    int dev = current_device();
    if (dev < 0 || dptr == NULL || bytesize == 0) return real(dptr, bytesize);
    CUresult r = admit(dev, bytesize, call);
    if (r != CUDA_SUCCESS) return r;
    r = real(dptr, bytesize);
    settle(g_ptrs, r, *dptr, bytesize, dev);
    return r;
}

VGPU_API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) {
    ready();
    NO_DRIVER(cuMemAlloc_v2);
    return alloc_v2(vgpu_real_cuMemAlloc_v2, "cuMemAlloc_v2", dptr, bytesize);
}

VGPU_API CUresult cuMemAlloc(CUdeviceptr_v1 *dptr, unsigned int bytesize) {
    ready();
    NO_DRIVER(cuMemAlloc);
    int dev = current_device();
    if (dev < 0 || dptr == NULL || bytesize == 0) return vgpu_real_cuMemAlloc(dptr, bytesize);
    CUresult r = admit(dev, bytesize, "cuMemAlloc");
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemAlloc(dptr, bytesize);
    settle(g_ptrs, r, *dptr, bytesize, dev);
    return r;
}

/* Managed memory is charged in full: it can all become resident on the
 * device, and a slice that admitted it would then be exceeded. */
VGPU_API CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags) {
    ready();
    NO_DRIVER(cuMemAllocManaged);
    int dev = current_device();
    if (dev < 0 || dptr == NULL || bytesize == 0)
        return vgpu_real_cuMemAllocManaged(dptr, bytesize, flags);
    CUresult r = admit(dev, bytesize, "cuMemAllocManaged");
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemAllocManaged(dptr, bytesize, flags);
    settle(g_ptrs, r, *dptr, bytesize, dev);
    return r;
}

static CUresult free_tracked(CUdeviceptr dptr, CUresult (*forward)(CUdeviceptr, void *), void *arg) {
    uint64_t bytes;
    int dev;
    if (dptr == 0 || !vgpu_table_take(g_ptrs, dptr, &bytes, &dev)) return forward(dptr, arg);
    CUresult r = forward(dptr, arg);
    if (r == CUDA_SUCCESS)
        vgpu_credit(dev, bytes);
    else
        vgpu_table_put(g_ptrs, dptr, bytes, dev);
    return r;
}

static CUresult fwd_free_v2(CUdeviceptr p, void *arg) {
    (void)arg;
    return vgpu_real_cuMemFree_v2(p);
}
static CUresult fwd_free_v1(CUdeviceptr p, void *arg) {
    (void)arg;
    return vgpu_real_cuMemFree((CUdeviceptr_v1)p);
}
static CUresult fwd_free_async(CUdeviceptr p, void *stream) {
    return vgpu_real_cuMemFreeAsync(p, (CUstream)stream);
}
static CUresult fwd_free_async_ptsz(CUdeviceptr p, void *stream) {
    return vgpu_real_cuMemFreeAsync_ptsz(p, (CUstream)stream);
}

VGPU_API CUresult cuMemFree_v2(CUdeviceptr dptr) {
    ready();
    NO_DRIVER(cuMemFree_v2);
    return free_tracked(dptr, fwd_free_v2, NULL);
}

VGPU_API CUresult cuMemFree(CUdeviceptr_v1 dptr) {
    ready();
    NO_DRIVER(cuMemFree);
    return free_tracked(dptr, fwd_free_v1, NULL);
}

/* ---- pitched allocations ------------------------------------------------------ */

/* The driver picks the pitch, so width x height is charged before the call
 * (a request past the cap never reaches the driver) and the difference to
 * the real pitch x height is settled after it: the slice pays for the
 * padding the card really holds (HAMi-core charged width x height). */
static CUresult settle_pitch(CUdeviceptr ptr, uint64_t guess, uint64_t actual, int dev,
                             CUresult (*release)(CUdeviceptr, void *)) {
    if (actual > guess && !vgpu_charge(dev, actual - guess)) {
        release(ptr, NULL);
        vgpu_credit(dev, guess);
        VGPU_LOG(VGPU_LOG_INFO, "cuMemAllocPitch: the pitch padding passes the slice on device %d",
                 dev);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (actual < guess) vgpu_credit(dev, guess - actual);
    settle(g_ptrs, CUDA_SUCCESS, ptr, actual, dev);
    return CUDA_SUCCESS;
}

VGPU_API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
                                     unsigned int element_size) {
    ready();
    NO_DRIVER(cuMemAllocPitch_v2);
    int dev = current_device();
    if (dev < 0 || dptr == NULL || pitch == NULL || width == 0 || height == 0 ||
        width > UINT64_MAX / height)
        return vgpu_real_cuMemAllocPitch_v2(dptr, pitch, width, height, element_size);
    uint64_t guess = (uint64_t)width * height;
    CUresult r = admit(dev, guess, "cuMemAllocPitch_v2");
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemAllocPitch_v2(dptr, pitch, width, height, element_size);
    if (r != CUDA_SUCCESS) {
        vgpu_credit(dev, guess);
        return r;
    }
    return settle_pitch(*dptr, guess, (uint64_t)*pitch * height, dev, fwd_free_v2);
}

VGPU_API CUresult cuMemAllocPitch(CUdeviceptr_v1 *dptr, unsigned int *pitch, unsigned int width,
                                  unsigned int height, unsigned int element_size) {
    ready();
    NO_DRIVER(cuMemAllocPitch);
    int dev = current_device();
    if (dev < 0 || dptr == NULL || pitch == NULL || width == 0 || height == 0)
        return vgpu_real_cuMemAllocPitch(dptr, pitch, width, height, element_size);
    uint64_t guess = (uint64_t)width * height;
    CUresult r = admit(dev, guess, "cuMemAllocPitch");
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemAllocPitch(dptr, pitch, width, height, element_size);
    if (r != CUDA_SUCCESS) {
        vgpu_credit(dev, guess);
        return r;
    }
    return settle_pitch(*dptr, guess, (uint64_t)*pitch * height, dev, fwd_free_v1);
}

/* ---- virtual memory management ------------------------------------------------ */

/* Physical memory is created here and only mapped later, so this is where
 * PyTorch's expandable segments and NCCL's buffers must be charged
 * (HAMi-core #169, #187, PR #98).  Host-located handles are not device
 * memory and pass through. */
VGPU_API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                              const CUmemAllocationProp *prop, unsigned long long flags) {
    ready();
    NO_DRIVER(cuMemCreate);
    if (handle == NULL || prop == NULL || size == 0 ||
        prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE || prop->location.id < 0 ||
        prop->location.id >= VGPU_MAX_DEVICES)
        return vgpu_real_cuMemCreate(handle, size, prop, flags);
    int dev = prop->location.id;
    CUresult r = admit(dev, size, "cuMemCreate");
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemCreate(handle, size, prop, flags);
    settle(g_handles, r, *handle, size, dev);
    return r;
}

VGPU_API CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    ready();
    NO_DRIVER(cuMemRelease);
    uint64_t bytes;
    int dev;
    if (handle == 0 || !vgpu_table_take(g_handles, handle, &bytes, &dev))
        return vgpu_real_cuMemRelease(handle);
    CUresult r = vgpu_real_cuMemRelease(handle);
    if (r == CUDA_SUCCESS)
        vgpu_credit(dev, bytes);
    else
        vgpu_table_put(g_handles, handle, bytes, dev);
    return r;
}

/* ---- stream-ordered allocation (HAMi-core #93, #96, #306) ----------------------- */

VGPU_API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool, CUdevice dev) {
    ready();
    NO_DRIVER(cuDeviceGetDefaultMemPool);
    CUresult r = vgpu_real_cuDeviceGetDefaultMemPool(pool, dev);
    /* remembered so allocations from the pool are charged to its device, not
     * to whichever context happens to be current */
    if (r == CUDA_SUCCESS && *pool != NULL && dev >= 0 && dev < VGPU_MAX_DEVICES) {
        uint64_t bytes;
        int known;
        if (!vgpu_table_get(g_pools, (uint64_t)(uintptr_t)*pool, &bytes, &known))
            vgpu_table_put(g_pools, (uint64_t)(uintptr_t)*pool, 0, dev);
    }
    return r;
}

static CUresult alloc_async(CUresult (*real)(CUdeviceptr *, size_t, CUstream), const char *call,
                            CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    int dev = current_device();
    if (dev < 0 || dptr == NULL || bytesize == 0) return real(dptr, bytesize, stream);
    CUresult r = admit(dev, bytesize, call);
    if (r != CUDA_SUCCESS) return r;
    r = real(dptr, bytesize, stream);
    settle(g_ptrs, r, *dptr, bytesize, dev);
    return r;
}

VGPU_API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    ready();
    NO_DRIVER(cuMemAllocAsync);
    return alloc_async(vgpu_real_cuMemAllocAsync, "cuMemAllocAsync", dptr, bytesize, stream);
}

VGPU_API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    ready();
    NO_DRIVER(cuMemAllocAsync_ptsz);
    return alloc_async(vgpu_real_cuMemAllocAsync_ptsz, "cuMemAllocAsync_ptsz", dptr, bytesize,
                       stream);
}

static CUresult alloc_pool(CUresult (*real)(CUdeviceptr *, size_t, CUmemoryPool, CUstream),
                           const char *call, CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                           CUstream stream) {
    uint64_t unused;
    int dev;
    if (pool == NULL || !vgpu_table_get(g_pools, (uint64_t)(uintptr_t)pool, &unused, &dev))
        dev = current_device();
    if (dev < 0 || dptr == NULL || bytesize == 0) return real(dptr, bytesize, pool, stream);
    CUresult r = admit(dev, bytesize, call);
    if (r != CUDA_SUCCESS) return r;
    r = real(dptr, bytesize, pool, stream);
    settle(g_ptrs, r, *dptr, bytesize, dev);
    return r;
}

VGPU_API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                          CUstream stream) {
    ready();
    NO_DRIVER(cuMemAllocFromPoolAsync);
    return alloc_pool(vgpu_real_cuMemAllocFromPoolAsync, "cuMemAllocFromPoolAsync", dptr, bytesize,
                      pool, stream);
}

VGPU_API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize,
                                               CUmemoryPool pool, CUstream stream) {
    ready();
    NO_DRIVER(cuMemAllocFromPoolAsync_ptsz);
    return alloc_pool(vgpu_real_cuMemAllocFromPoolAsync_ptsz, "cuMemAllocFromPoolAsync_ptsz", dptr,
                      bytesize, pool, stream);
}

/* The block is credited when the free is enqueued: the program can no longer
 * use it, and the pool hands it out again only to allocations we charge. */
VGPU_API CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream stream) {
    ready();
    NO_DRIVER(cuMemFreeAsync);
    return free_tracked(dptr, fwd_free_async, stream);
}

VGPU_API CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream stream) {
    ready();
    NO_DRIVER(cuMemFreeAsync_ptsz);
    return free_tracked(dptr, fwd_free_async_ptsz, stream);
}

/* ---- reporting the slice ------------------------------------------------------ */

/* total = the slice, used = what the whole container has charged, free =
 * total - used, never negative (HAMi-core #200). */
static int slice_info(int dev, uint64_t *free_bytes, uint64_t *total_bytes, uint64_t *used_bytes) {
    uint64_t limit = vgpu_limit(dev);
    if (limit == 0) return 0;
    uint64_t used = vgpu_used(dev);
    *used_bytes = used;
    *total_bytes = limit;
    *free_bytes = used >= limit ? 0 : limit - used;
    return 1;
}

VGPU_API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    ready();
    NO_DRIVER(cuMemGetInfo_v2);
    CUresult r = vgpu_real_cuMemGetInfo_v2(free_bytes, total_bytes);
    uint64_t f, t, u;
    if (r == CUDA_SUCCESS && slice_info(current_device(), &f, &t, &u)) {
        *free_bytes = f;
        *total_bytes = t;
    }
    return r;
}

VGPU_API CUresult cuMemGetInfo(unsigned int *free_bytes, unsigned int *total_bytes) {
    ready();
    NO_DRIVER(cuMemGetInfo);
    CUresult r = vgpu_real_cuMemGetInfo(free_bytes, total_bytes);
    uint64_t f, t, u;
    if (r == CUDA_SUCCESS && slice_info(current_device(), &f, &t, &u)) {
        *free_bytes = f > 0xffffffffULL ? 0xffffffffU : (unsigned int)f;
        *total_bytes = t > 0xffffffffULL ? 0xffffffffU : (unsigned int)t;
    }
    return r;
}

typedef nvmlReturn_t (*nvml_index_fn)(nvmlDevice_t, unsigned int *);
typedef nvmlReturn_t (*nvml_uuid_fn)(nvmlDevice_t, char *, unsigned int);

static void *nvml_fn(void **cache, const char *name) {
    void *f = __atomic_load_n(cache, __ATOMIC_ACQUIRE);
    if (f == NULL) {
        f = vgpu_resolve_nvml(name);
        __atomic_store_n(cache, f, __ATOMIC_RELEASE);
    }
    return f;
}

/* The CUDA device (the i of CUDA_DEVICE_MEMORY_LIMIT_<i>) of an NVML device, or
 * -1.  NVML ignores CUDA_VISIBLE_DEVICES: when that lists UUIDs (as the node
 * agent sets it, and as a process on the host sees every GPU) the device is
 * found by UUID; otherwise both enumerate the container's visible devices in
 * the same order and NVML's index is the CUDA device. */
static int nvml_cuda_device(nvmlDevice_t device) {
    static void *index_fn, *uuid_fn;
    nvml_index_fn get_index = (nvml_index_fn)nvml_fn(&index_fn, "nvmlDeviceGetIndex");
    unsigned int index;
    if (get_index == NULL || get_index(device, &index) != NVML_SUCCESS) return -1;
    if (vgpu_cfg.visible_count == 0) return (int)index;
    nvml_uuid_fn get_uuid = (nvml_uuid_fn)nvml_fn(&uuid_fn, "nvmlDeviceGetUUID");
    char uuid[NVML_DEVICE_UUID_BUFFER_SIZE];
    if (get_uuid == NULL || get_uuid(device, uuid, sizeof uuid) != NVML_SUCCESS) return -1;
    return vgpu_cuda_device_of(uuid, (int)index);
}

/* The slice of an NVML device (free, total, used bytes), when one applies to it. */
static int nvml_slice(nvmlDevice_t device, uint64_t *f, uint64_t *t, uint64_t *u) {
    int dev = nvml_cuda_device(device);
    return dev >= 0 && dev < VGPU_MAX_DEVICES && slice_info(dev, f, t, u);
}

VGPU_API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    vgpu_init();
    if (vgpu_real_nvmlDeviceGetMemoryInfo == NULL) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t r = vgpu_real_nvmlDeviceGetMemoryInfo(device, memory);
    uint64_t f, t, u;
    if (r == NVML_SUCCESS && nvml_slice(device, &f, &t, &u)) {
        memory->total = t;
        memory->free = f;
        memory->used = u;
    }
    return r;
}

VGPU_API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    vgpu_init();
    if (vgpu_real_nvmlDeviceGetMemoryInfo_v2 == NULL) return NVML_ERROR_UNINITIALIZED;
    nvmlReturn_t r = vgpu_real_nvmlDeviceGetMemoryInfo_v2(device, memory);
    uint64_t f, t, u;
    if (r == NVML_SUCCESS && nvml_slice(device, &f, &t, &u)) {
        memory->total = t;
        memory->reserved = 0;
        memory->free = f;
        memory->used = u;
    }
    return r;
}
