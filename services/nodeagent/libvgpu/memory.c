/*
 * memory.c - every device-memory allocation path, charged before the driver.
 *
 * A request that would pass the slice's cap returns CUDA_ERROR_OUT_OF_MEMORY
 * without reaching the driver; one that fits is charged first (so a racing
 * process cannot take the same bytes), then given back if the driver fails.
 * Frees credit exactly what was charged; pointers libvgpu did not charge go
 * to the driver untouched (HAMi-core #257).
 *
 * A wrapper entered again on the same thread from inside a wrapper (a driver
 * whose entry points call each other through exported names, as the mock's
 * _ptsz variants do, or a signal handler) goes straight to the driver: the
 * outer call has charged already.
 */
#include <pthread.h>
#include <stdio.h>

#include "hooks.h"
#include "track.h"

static struct vgpu_table *g_ptrs;    /* device pointer -> bytes, device */
static struct vgpu_table *g_handles; /* cuMemCreate handle -> bytes, device */
static struct vgpu_table *g_pools;   /* memory pool -> device */
static struct vgpu_table *g_arrays;  /* CUarray / CUmipmappedArray -> bytes, device */
static pthread_once_t g_tables_once = PTHREAD_ONCE_INIT;
static __thread int t_inside __attribute__((tls_model("initial-exec")));

/* Forward to the driver uncharged when this thread is already inside a wrapper. */
#define REENTERED(call)                                                                            \
    if (UNLIKELY(t_inside)) return (call)
/* Run a wrapper's body with this thread marked as inside. */
#define GUARDED(expr)                                                                              \
    do {                                                                                           \
        t_inside = 1;                                                                              \
        CUresult guarded_r_ = (expr);                                                              \
        t_inside = 0;                                                                              \
        return guarded_r_;                                                                         \
    } while (0)

static void make_tables(void) {
    g_ptrs = vgpu_table_new();
    g_handles = vgpu_table_new();
    g_pools = vgpu_table_new();
    g_arrays = vgpu_table_new();
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

static void settle_all_pools(void);
static int g_pool_count;
static int g_graph_active;

/* Charges bytes on dev; *owner is the charge's owner (VGPU_OWNER).  Before a
 * refusal, pools' charges are settled with what they still hold. */
static CUresult admit(int dev, uint64_t bytes, const char *call, uint64_t *owner) {
    *owner = vgpu_charge(dev, bytes);
    if (*owner == 0 && (__atomic_load_n(&g_pool_count, __ATOMIC_ACQUIRE) > 0 ||
                        __atomic_load_n(&g_graph_active, __ATOMIC_ACQUIRE))) {
        settle_all_pools();
        *owner = vgpu_charge(dev, bytes);
    }
    if (*owner != 0) return CUDA_SUCCESS;
    VGPU_LOG(VGPU_LOG_INFO,
             "%s: %llu bytes refused on device %d: %llu of the slice's %llu bytes are charged", call,
             (unsigned long long)bytes, dev, (unsigned long long)vgpu_used(dev),
             (unsigned long long)vgpu_limit(dev));
    return CUDA_ERROR_OUT_OF_MEMORY;
}

/* Records a successful allocation, or gives the charge back on failure. */
static void settle(struct vgpu_table *t, CUresult r, uint64_t key, uint64_t bytes, int dev,
                   uint64_t owner) {
    if (r != CUDA_SUCCESS) {
        vgpu_credit(dev, bytes, owner);
    } else if (!vgpu_table_put(t, key, bytes, dev, owner)) {
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
    uint64_t owner;
    CUresult r = admit(dev, bytesize, call, &owner);
    if (r != CUDA_SUCCESS) return r;
    r = real(dptr, bytesize);
    settle(g_ptrs, r, *dptr, bytesize, dev, owner);
    return r;
}

static CUresult cuMemAlloc_v2_body(CUdeviceptr *dptr, size_t bytesize) {
    return alloc_v2(vgpu_real_cuMemAlloc_v2, "cuMemAlloc_v2", dptr, bytesize);
}

VGPU_API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) {
    ready();
    NO_DRIVER(cuMemAlloc_v2);
    REENTERED(vgpu_real_cuMemAlloc_v2(dptr, bytesize));
    GUARDED(cuMemAlloc_v2_body(dptr, bytesize));
}

static CUresult cuMemAlloc_body(CUdeviceptr_v1 *dptr, unsigned int bytesize) {
    int dev = current_device();
    if (dev < 0 || dptr == NULL || bytesize == 0) return vgpu_real_cuMemAlloc(dptr, bytesize);
    uint64_t owner;
    CUresult r = admit(dev, bytesize, "cuMemAlloc", &owner);
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemAlloc(dptr, bytesize);
    settle(g_ptrs, r, *dptr, bytesize, dev, owner);
    return r;
}

VGPU_API CUresult cuMemAlloc(CUdeviceptr_v1 *dptr, unsigned int bytesize) {
    ready();
    NO_DRIVER(cuMemAlloc);
    REENTERED(vgpu_real_cuMemAlloc(dptr, bytesize));
    GUARDED(cuMemAlloc_body(dptr, bytesize));
}

/* Managed memory is charged in full: it can all become resident on the
 * device, and a slice that admitted it would then be exceeded. */
static CUresult cuMemAllocManaged_body(CUdeviceptr *dptr, size_t bytesize, unsigned int flags) {
    int dev = current_device();
    if (dev < 0 || dptr == NULL || bytesize == 0)
        return vgpu_real_cuMemAllocManaged(dptr, bytesize, flags);
    uint64_t owner;
    CUresult r = admit(dev, bytesize, "cuMemAllocManaged", &owner);
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemAllocManaged(dptr, bytesize, flags);
    settle(g_ptrs, r, *dptr, bytesize, dev, owner);
    return r;
}

VGPU_API CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags) {
    ready();
    NO_DRIVER(cuMemAllocManaged);
    REENTERED(vgpu_real_cuMemAllocManaged(dptr, bytesize, flags));
    GUARDED(cuMemAllocManaged_body(dptr, bytesize, flags));
}

static CUresult free_tracked(CUdeviceptr dptr, CUresult (*forward)(CUdeviceptr, void *), void *arg) {
    uint64_t bytes, owner;
    int dev;
    if (dptr == 0 || !vgpu_table_take(g_ptrs, dptr, &bytes, &dev, &owner))
        return forward(dptr, arg);
    CUresult r = forward(dptr, arg);
    if (r == CUDA_SUCCESS)
        vgpu_credit(dev, bytes, owner);
    else
        vgpu_table_put(g_ptrs, dptr, bytes, dev, owner);
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

/* cuMemFree may also free a stream-ordered block (it synchronizes first). */
static CUresult free_async(CUdeviceptr dptr, CUresult (*forward)(CUdeviceptr, void *), void *stream);

static CUresult cuMemFree_v2_body(CUdeviceptr dptr) { return free_async(dptr, fwd_free_v2, NULL); }

VGPU_API CUresult cuMemFree_v2(CUdeviceptr dptr) {
    ready();
    NO_DRIVER(cuMemFree_v2);
    REENTERED(vgpu_real_cuMemFree_v2(dptr));
    GUARDED(cuMemFree_v2_body(dptr));
}

static CUresult cuMemFree_body(CUdeviceptr_v1 dptr) { return free_async(dptr, fwd_free_v1, NULL); }

VGPU_API CUresult cuMemFree(CUdeviceptr_v1 dptr) {
    ready();
    NO_DRIVER(cuMemFree);
    REENTERED(vgpu_real_cuMemFree(dptr));
    GUARDED(cuMemFree_body(dptr));
}

/* ---- pitched allocations ------------------------------------------------------ */

/* The driver picks the pitch, so width x height is charged before the call
 * (a request past the cap never reaches the driver) and the difference to
 * the real pitch x height is settled after it: the slice pays for the
 * padding the card really holds (HAMi-core charged width x height). */
static CUresult settle_pitch(CUdeviceptr ptr, uint64_t guess, uint64_t actual, int dev,
                             uint64_t owner, CUresult (*release)(CUdeviceptr, void *)) {
    if (actual > guess && vgpu_charge(dev, actual - guess) == 0) {
        release(ptr, NULL);
        vgpu_credit(dev, guess, owner);
        VGPU_LOG(VGPU_LOG_INFO, "cuMemAllocPitch: the pitch padding passes the slice on device %d",
                 dev);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    if (actual < guess) vgpu_credit(dev, guess - actual, owner);
    settle(g_ptrs, CUDA_SUCCESS, ptr, actual, dev, owner);
    return CUDA_SUCCESS;
}

static CUresult cuMemAllocPitch_v2_body(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
                                     unsigned int element_size) {
    int dev = current_device();
    if (dev < 0 || dptr == NULL || pitch == NULL || width == 0 || height == 0 ||
        width > UINT64_MAX / height)
        return vgpu_real_cuMemAllocPitch_v2(dptr, pitch, width, height, element_size);
    uint64_t guess = (uint64_t)width * height;
    uint64_t owner;
    CUresult r = admit(dev, guess, "cuMemAllocPitch_v2", &owner);
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemAllocPitch_v2(dptr, pitch, width, height, element_size);
    if (r != CUDA_SUCCESS) {
        vgpu_credit(dev, guess, owner);
        return r;
    }
    return settle_pitch(*dptr, guess, (uint64_t)*pitch * height, dev, owner, fwd_free_v2);
}

VGPU_API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
                                     unsigned int element_size) {
    ready();
    NO_DRIVER(cuMemAllocPitch_v2);
    REENTERED(vgpu_real_cuMemAllocPitch_v2(dptr, pitch, width, height, element_size));
    GUARDED(cuMemAllocPitch_v2_body(dptr, pitch, width, height, element_size));
}

static CUresult cuMemAllocPitch_body(CUdeviceptr_v1 *dptr, unsigned int *pitch, unsigned int width,
                                  unsigned int height, unsigned int element_size) {
    int dev = current_device();
    if (dev < 0 || dptr == NULL || pitch == NULL || width == 0 || height == 0)
        return vgpu_real_cuMemAllocPitch(dptr, pitch, width, height, element_size);
    uint64_t guess = (uint64_t)width * height;
    uint64_t owner;
    CUresult r = admit(dev, guess, "cuMemAllocPitch", &owner);
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemAllocPitch(dptr, pitch, width, height, element_size);
    if (r != CUDA_SUCCESS) {
        vgpu_credit(dev, guess, owner);
        return r;
    }
    return settle_pitch(*dptr, guess, (uint64_t)*pitch * height, dev, owner, fwd_free_v1);
}

VGPU_API CUresult cuMemAllocPitch(CUdeviceptr_v1 *dptr, unsigned int *pitch, unsigned int width,
                                  unsigned int height, unsigned int element_size) {
    ready();
    NO_DRIVER(cuMemAllocPitch);
    REENTERED(vgpu_real_cuMemAllocPitch(dptr, pitch, width, height, element_size));
    GUARDED(cuMemAllocPitch_body(dptr, pitch, width, height, element_size));
}

/* ---- virtual memory management ------------------------------------------------ */

/* Physical memory is created here and only mapped later, so this is where
 * PyTorch's expandable segments and NCCL's buffers must be charged
 * (HAMi-core #169, #187, PR #98).  Host-located handles are not device
 * memory and pass through. */
static CUresult cuMemCreate_body(CUmemGenericAllocationHandle *handle, size_t size,
                              const CUmemAllocationProp *prop, unsigned long long flags) {
    if (handle == NULL || prop == NULL || size == 0 ||
        prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE || prop->location.id < 0 ||
        prop->location.id >= VGPU_MAX_DEVICES)
        return vgpu_real_cuMemCreate(handle, size, prop, flags);
    int dev = prop->location.id;
    uint64_t owner;
    CUresult r = admit(dev, size, "cuMemCreate", &owner);
    if (r != CUDA_SUCCESS) return r;
    r = vgpu_real_cuMemCreate(handle, size, prop, flags);
    settle(g_handles, r, *handle, size, dev, owner);
    return r;
}

VGPU_API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                              const CUmemAllocationProp *prop, unsigned long long flags) {
    ready();
    NO_DRIVER(cuMemCreate);
    REENTERED(vgpu_real_cuMemCreate(handle, size, prop, flags));
    GUARDED(cuMemCreate_body(handle, size, prop, flags));
}

VGPU_API CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    ready();
    NO_DRIVER(cuMemRelease);
    REENTERED(vgpu_real_cuMemRelease(handle));
    uint64_t bytes, owner;
    int dev;
    if (handle == 0 || !vgpu_table_take(g_handles, handle, &bytes, &dev, &owner))
        return vgpu_real_cuMemRelease(handle);
    t_inside = 1;
    CUresult r = vgpu_real_cuMemRelease(handle);
    t_inside = 0;
    if (r == CUDA_SUCCESS)
        vgpu_credit(dev, bytes, owner);
    else
        vgpu_table_put(g_handles, handle, bytes, dev, owner);
    return r;
}

/* ---- stream-ordered allocation (HAMi-core #93, #96, #306) -----------------------
 *
 * A pool keeps what cuMemFreeAsync gives it for reuse, and gives it back to
 * the device only on cuMemPoolTrimTo, or on a synchronization for what
 * exceeds its release threshold (which PyTorch and TensorFlow raise so that
 * it keeps everything).  The slice is charged what each pool has reserved
 * from the device, as the driver reports it (CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT),
 * so memory a pool keeps counts until it is trimmed.  An allocation is
 * charged beforehand only for what the pool cannot serve from its spare
 * reserve (reserved - used), then settled against the reserve the driver
 * reports afterwards.  A pool's charge is settled again by every allocation
 * and free from it, cuMemPoolTrimTo, cuMemGetInfo and before a refusal, so
 * what a synchronization gave back is never charged past the next of those.
 * A driver without pool attributes gets the plain per-allocation charge. */

typedef CUresult (*pool_attr_fn)(CUmemoryPool, CUmemPool_attribute, void *);
typedef CUresult (*device_pool_fn)(CUmemoryPool *, CUdevice);

#define MAX_POOLS 64
struct pool_acct {
    CUmemoryPool pool; /* NULL: entry unused */
    int dev;
    uint64_t charged; /* bytes of its reserve charged to the slice */
    uint64_t owner;   /* the claim they are charged to */
    pthread_mutex_t lock;
};
static struct pool_acct g_pool_accts[MAX_POOLS];
static pthread_mutex_t g_pool_accts_lock = PTHREAD_MUTEX_INITIALIZER;
static struct vgpu_table *g_pool_ptrs; /* stream-ordered pointer -> its pool_acct */
static pthread_once_t g_pool_once = PTHREAD_ONCE_INIT;
static pool_attr_fn g_pool_attr;
static device_pool_fn g_device_pool;

/* Graph memory nodes: each device's graph memory pool maps a graph's
 * allocations at launch and keeps them until cuDeviceGraphMemTrim (CUDA
 * Programming Guide, "Graph Memory Nodes"); like a stream-ordered pool, its
 * charge is its reserve (CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT), settled
 * after each graph launch, on trim, cuMemGetInfo and before a refusal.  An
 * allocation node that cannot fit beside the container's charges is refused
 * when it is added; the launch itself is never refused, so a graph that fit
 * when it was built can pass the slice by what others took meanwhile. */
typedef CUresult (*graph_attr_fn)(CUdevice, CUgraphMem_attribute, void *);
static graph_attr_fn g_graph_attr;
static struct {
    pthread_mutex_t lock;
    uint64_t charged; /* bytes of the reserve charged to the slice */
    uint64_t owner;
    int seen; /* an allocation node for this device was added */
} g_graph[VGPU_MAX_DEVICES];

static void pool_setup(void) {
    g_pool_ptrs = vgpu_table_new();
    g_pool_attr = (pool_attr_fn)vgpu_driver_symbol("cuMemPoolGetAttribute");
    g_device_pool = (device_pool_fn)vgpu_driver_symbol("cuDeviceGetMemPool");
    g_graph_attr = (graph_attr_fn)vgpu_driver_symbol("cuDeviceGetGraphMemAttribute");
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) pthread_mutex_init(&g_graph[d].lock, NULL);
}

static uint64_t pool_attr(CUmemoryPool pool, CUmemPool_attribute attr, int *ok) {
    cuuint64_t v = 0;
    *ok = *ok && g_pool_attr(pool, attr, &v) == CUDA_SUCCESS;
    return v;
}

/* The accounting entry of pool (on device dev), added on first sight; NULL
 * when the table is full or the driver reports no pool attributes. */
static struct pool_acct *pool_acct_of(CUmemoryPool pool, int dev) {
    pthread_once(&g_pool_once, pool_setup);
    if (pool == NULL || g_pool_attr == NULL) return NULL;
    int n = __atomic_load_n(&g_pool_count, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++)
        if (g_pool_accts[i].pool == pool) return &g_pool_accts[i];
    pthread_mutex_lock(&g_pool_accts_lock);
    struct pool_acct *pa = NULL;
    for (int i = 0; i < g_pool_count && pa == NULL; i++)
        if (g_pool_accts[i].pool == pool) pa = &g_pool_accts[i];
    if (pa == NULL && g_pool_count < MAX_POOLS && dev >= 0) {
        pa = &g_pool_accts[g_pool_count];
        pthread_mutex_init(&pa->lock, NULL);
        pa->dev = dev;
        pa->pool = pool;
        __atomic_store_n(&g_pool_count, g_pool_count + 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&g_pool_accts_lock);
    return pa;
}

/* Makes a reserve's charge (*charged, by *owner) equal to reserved. */
static void settle_reserve(int dev, uint64_t reserved, uint64_t *charged, uint64_t *owner_of) {
    uint64_t owner = vgpu_owner();
    if (*owner_of != owner) { /* a forked child: the parent's reserve is the parent's */
        *owner_of = owner;
        *charged = 0;
    }
    if (owner != 0 && reserved > *charged) {
        if (vgpu_charge_taken(dev, reserved - *charged) != 0) *charged = reserved;
    } else if (owner != 0 && reserved < *charged) {
        vgpu_credit(dev, *charged - reserved, owner);
        *charged = reserved;
    }
}

/* Makes the pool's charge equal to its reserve; returns its spare reserve
 * (reserved - used).  Caller holds pa->lock. */
static uint64_t pool_settle(struct pool_acct *pa) {
    int ok = 1;
    uint64_t reserved = pool_attr(pa->pool, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT, &ok);
    uint64_t used = pool_attr(pa->pool, CU_MEMPOOL_ATTR_USED_MEM_CURRENT, &ok);
    if (!ok) return 0;
    settle_reserve(pa->dev, reserved, &pa->charged, &pa->owner);
    return reserved > used ? reserved - used : 0;
}

/* The same for device dev's graph memory pool.  Caller holds g_graph[dev].lock. */
static uint64_t graph_settle(int dev) {
    cuuint64_t reserved = 0, used = 0;
    if (g_graph_attr == NULL ||
        g_graph_attr(dev, CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT, &reserved) != CUDA_SUCCESS ||
        g_graph_attr(dev, CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT, &used) != CUDA_SUCCESS)
        return 0;
    settle_reserve(dev, reserved, &g_graph[dev].charged, &g_graph[dev].owner);
    return reserved > used ? reserved - used : 0;
}

void vgpu_graph_launched(void) {
    if (!__atomic_load_n(&g_graph_active, __ATOMIC_ACQUIRE)) return;
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) {
        if (!__atomic_load_n(&g_graph[d].seen, __ATOMIC_ACQUIRE)) continue;
        pthread_mutex_lock(&g_graph[d].lock);
        graph_settle(d);
        pthread_mutex_unlock(&g_graph[d].lock);
    }
}

/* Settles every pool not being settled by another thread right now (this
 * thread may hold one: a refusal inside alloc_from). */
static void settle_all_pools(void) {
    if (__atomic_load_n(&g_graph_active, __ATOMIC_ACQUIRE)) {
        for (int d = 0; d < VGPU_MAX_DEVICES; d++) {
            if (!__atomic_load_n(&g_graph[d].seen, __ATOMIC_ACQUIRE) ||
                pthread_mutex_trylock(&g_graph[d].lock) != 0)
                continue;
            graph_settle(d);
            pthread_mutex_unlock(&g_graph[d].lock);
        }
    }
    int n = __atomic_load_n(&g_pool_count, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++) {
        if (pthread_mutex_trylock(&g_pool_accts[i].lock) != 0) continue;
        pool_settle(&g_pool_accts[i]);
        pthread_mutex_unlock(&g_pool_accts[i].lock);
    }
}

/* The pool cuMemAllocAsync on dev draws from: the device's current pool. */
static CUmemoryPool current_pool(int dev) {
    CUmemoryPool pool = NULL;
    pthread_once(&g_pool_once, pool_setup);
    if (g_device_pool != NULL && g_device_pool(&pool, dev) == CUDA_SUCCESS) return pool;
    if (vgpu_real_cuDeviceGetDefaultMemPool == NULL ||
        vgpu_real_cuDeviceGetDefaultMemPool(&pool, dev) != CUDA_SUCCESS)
        return NULL;
    return pool;
}

/* An allocation from pa's pool: charged what the spare reserve cannot serve. */
static CUresult alloc_from(struct pool_acct *pa, const char *call, CUdeviceptr *dptr,
                           size_t bytesize, CUresult (*real)(CUdeviceptr *, size_t, void *, void *),
                           void *a, void *b) {
    pthread_mutex_lock(&pa->lock);
    uint64_t spare = pool_settle(pa);
    uint64_t need = bytesize > spare ? bytesize - spare : 0;
    uint64_t owner = VGPU_OWNER_NONE;
    CUresult r = need > 0 ? admit(pa->dev, need, call, &owner) : CUDA_SUCCESS;
    if (r == CUDA_SUCCESS) {
        if (need > 0) pa->charged += need;
        r = real(dptr, bytesize, a, b);
        pool_settle(pa);
    }
    pthread_mutex_unlock(&pa->lock);
    if (r == CUDA_SUCCESS)
        vgpu_table_put(g_pool_ptrs, *dptr, bytesize, pa->dev, (uint64_t)(uintptr_t)pa);
    return r;
}

VGPU_API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool, CUdevice dev) {
    ready();
    NO_DRIVER(cuDeviceGetDefaultMemPool);
    CUresult r = vgpu_real_cuDeviceGetDefaultMemPool(pool, dev);
    /* remembered so allocations from the pool are charged to its device, not
     * to whichever context happens to be current */
    if (r == CUDA_SUCCESS && *pool != NULL && dev >= 0 && dev < VGPU_MAX_DEVICES) {
        uint64_t bytes;
        int known;
        if (!vgpu_table_get(g_pools, (uint64_t)(uintptr_t)*pool, &bytes, &known, NULL))
            vgpu_table_put(g_pools, (uint64_t)(uintptr_t)*pool, 0, dev, VGPU_OWNER_NONE);
    }
    return r;
}

struct async_call {
    CUresult (*real)(CUdeviceptr *, size_t, CUstream);
};

static CUresult call_async(CUdeviceptr *dptr, size_t bytesize, void *call, void *stream) {
    const struct async_call *c = call;
    return c->real(dptr, bytesize, (CUstream)stream);
}

static CUresult alloc_async(CUresult (*real)(CUdeviceptr *, size_t, CUstream), const char *call,
                            CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    int dev = current_device();
    if (dev < 0 || dptr == NULL || bytesize == 0) return real(dptr, bytesize, stream);
    struct pool_acct *pa = pool_acct_of(current_pool(dev), dev);
    if (pa != NULL) {
        struct async_call c = {real};
        return alloc_from(pa, call, dptr, bytesize, call_async, &c, stream);
    }
    uint64_t owner;
    CUresult r = admit(dev, bytesize, call, &owner);
    if (r != CUDA_SUCCESS) return r;
    r = real(dptr, bytesize, stream);
    settle(g_ptrs, r, *dptr, bytesize, dev, owner);
    return r;
}

static CUresult cuMemAllocAsync_body(CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    return alloc_async(vgpu_real_cuMemAllocAsync, "cuMemAllocAsync", dptr, bytesize, stream);
}

VGPU_API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    ready();
    NO_DRIVER(cuMemAllocAsync);
    REENTERED(vgpu_real_cuMemAllocAsync(dptr, bytesize, stream));
    GUARDED(cuMemAllocAsync_body(dptr, bytesize, stream));
}

static CUresult cuMemAllocAsync_ptsz_body(CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    return alloc_async(vgpu_real_cuMemAllocAsync_ptsz, "cuMemAllocAsync_ptsz", dptr, bytesize,
                       stream);
}

VGPU_API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    ready();
    NO_DRIVER(cuMemAllocAsync_ptsz);
    REENTERED(vgpu_real_cuMemAllocAsync_ptsz(dptr, bytesize, stream));
    GUARDED(cuMemAllocAsync_ptsz_body(dptr, bytesize, stream));
}

struct pool_call {
    CUresult (*real)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
    CUmemoryPool pool;
};

static CUresult call_pool(CUdeviceptr *dptr, size_t bytesize, void *call, void *stream) {
    const struct pool_call *c = call;
    return c->real(dptr, bytesize, c->pool, (CUstream)stream);
}

static CUresult alloc_pool(CUresult (*real)(CUdeviceptr *, size_t, CUmemoryPool, CUstream),
                           const char *call, CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                           CUstream stream) {
    uint64_t unused;
    int dev;
    if (pool == NULL || !vgpu_table_get(g_pools, (uint64_t)(uintptr_t)pool, &unused, &dev, NULL))
        dev = current_device();
    if (dev < 0 || dptr == NULL || bytesize == 0) return real(dptr, bytesize, pool, stream);
    struct pool_acct *pa = pool_acct_of(pool, dev);
    if (pa != NULL) {
        struct pool_call c = {real, pool};
        return alloc_from(pa, call, dptr, bytesize, call_pool, &c, stream);
    }
    uint64_t owner;
    CUresult r = admit(dev, bytesize, call, &owner);
    if (r != CUDA_SUCCESS) return r;
    r = real(dptr, bytesize, pool, stream);
    settle(g_ptrs, r, *dptr, bytesize, dev, owner);
    return r;
}

static CUresult cuMemAllocFromPoolAsync_body(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                             CUstream stream) {
    return alloc_pool(vgpu_real_cuMemAllocFromPoolAsync, "cuMemAllocFromPoolAsync", dptr, bytesize,
                      pool, stream);
}

VGPU_API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                          CUstream stream) {
    ready();
    NO_DRIVER(cuMemAllocFromPoolAsync);
    REENTERED(vgpu_real_cuMemAllocFromPoolAsync(dptr, bytesize, pool, stream));
    GUARDED(cuMemAllocFromPoolAsync_body(dptr, bytesize, pool, stream));
}

static CUresult cuMemAllocFromPoolAsync_ptsz_body(CUdeviceptr *dptr, size_t bytesize,
                                                  CUmemoryPool pool, CUstream stream) {
    return alloc_pool(vgpu_real_cuMemAllocFromPoolAsync_ptsz, "cuMemAllocFromPoolAsync_ptsz", dptr,
                      bytesize, pool, stream);
}

VGPU_API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize,
                                               CUmemoryPool pool, CUstream stream) {
    ready();
    NO_DRIVER(cuMemAllocFromPoolAsync_ptsz);
    REENTERED(vgpu_real_cuMemAllocFromPoolAsync_ptsz(dptr, bytesize, pool, stream));
    GUARDED(cuMemAllocFromPoolAsync_ptsz_body(dptr, bytesize, pool, stream));
}

/* A block from a pool goes back to the pool, which keeps it: the slice stays
 * charged its reserve.  A block charged on its own is credited when the free
 * is enqueued. */
static CUresult free_async(CUdeviceptr dptr, CUresult (*forward)(CUdeviceptr, void *), void *stream) {
    uint64_t bytes, acct;
    int dev;
    if (dptr == 0 || __atomic_load_n(&g_pool_count, __ATOMIC_ACQUIRE) == 0 ||
        !vgpu_table_take(g_pool_ptrs, dptr, &bytes, &dev, &acct))
        return free_tracked(dptr, forward, stream);
    CUresult r = forward(dptr, stream);
    struct pool_acct *pa = (struct pool_acct *)(uintptr_t)acct;
    if (r != CUDA_SUCCESS) {
        vgpu_table_put(g_pool_ptrs, dptr, bytes, dev, acct);
    } else {
        pthread_mutex_lock(&pa->lock);
        pool_settle(pa);
        pthread_mutex_unlock(&pa->lock);
    }
    return r;
}

static CUresult cuMemFreeAsync_body(CUdeviceptr dptr, CUstream stream) {
    return free_async(dptr, fwd_free_async, stream);
}

VGPU_API CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream stream) {
    ready();
    NO_DRIVER(cuMemFreeAsync);
    REENTERED(vgpu_real_cuMemFreeAsync(dptr, stream));
    GUARDED(cuMemFreeAsync_body(dptr, stream));
}

static CUresult cuMemFreeAsync_ptsz_body(CUdeviceptr dptr, CUstream stream) {
    return free_async(dptr, fwd_free_async_ptsz, stream);
}

VGPU_API CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream stream) {
    ready();
    NO_DRIVER(cuMemFreeAsync_ptsz);
    REENTERED(vgpu_real_cuMemFreeAsync_ptsz(dptr, stream));
    GUARDED(cuMemFreeAsync_ptsz_body(dptr, stream));
}

/* A trim settles the pool's charge with its reserve at once.  What a
 * synchronization returns (a pool's reserve above its release threshold) is
 * settled at the next allocation, free, cuMemGetInfo, or refusal. */
VGPU_API CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t min_bytes_to_keep) {
    ready();
    NO_DRIVER(cuMemPoolTrimTo);
    CUresult r = vgpu_real_cuMemPoolTrimTo(pool, min_bytes_to_keep);
    struct pool_acct *pa = r == CUDA_SUCCESS ? pool_acct_of(pool, -1) : NULL;
    if (pa != NULL) {
        pthread_mutex_lock(&pa->lock);
        pool_settle(pa);
        pthread_mutex_unlock(&pa->lock);
    }
    return r;
}

/* An allocation node is refused when its graph could not run beside what the
 * container has charged: what the device's graph pool cannot serve from its
 * spare reserve must fit the slice.  Nothing is charged here: the launch maps
 * the memory, and is settled then. */
static int graph_node_fits(int dev, uint64_t bytes) {
    pthread_once(&g_pool_once, pool_setup);
    pthread_mutex_lock(&g_graph[dev].lock);
    uint64_t spare = graph_settle(dev);
    __atomic_store_n(&g_graph[dev].seen, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&g_graph_active, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&g_graph[dev].lock);
    uint64_t need = bytes > spare ? bytes - spare : 0, limit = vgpu_limit(dev);
    if (limit == 0 || need == 0) return 1;
    for (int attempt = 0; attempt < 2; attempt++) {
        uint64_t used = vgpu_used(dev);
        if (need <= limit && used <= limit - need) return 1;
        if (attempt == 0) {
            vgpu_reclaim_dead();
            settle_all_pools();
        }
    }
    return 0;
}

VGPU_API CUresult cuGraphAddMemAllocNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps,
                                         size_t ndeps, CUDA_MEM_ALLOC_NODE_PARAMS *params) {
    ready();
    NO_DRIVER(cuGraphAddMemAllocNode);
    REENTERED(vgpu_real_cuGraphAddMemAllocNode(node, graph, deps, ndeps, params));
    if (params != NULL && params->bytesize > 0 &&
        params->poolProps.location.type == CU_MEM_LOCATION_TYPE_DEVICE &&
        params->poolProps.location.id >= 0 && params->poolProps.location.id < VGPU_MAX_DEVICES &&
        !graph_node_fits(params->poolProps.location.id, params->bytesize)) {
        VGPU_LOG(VGPU_LOG_INFO,
                 "cuGraphAddMemAllocNode: %zu bytes refused on device %d: %llu of the slice's %llu "
                 "bytes are charged",
                 params->bytesize, params->poolProps.location.id,
                 (unsigned long long)vgpu_used(params->poolProps.location.id),
                 (unsigned long long)vgpu_limit(params->poolProps.location.id));
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    GUARDED(vgpu_real_cuGraphAddMemAllocNode(node, graph, deps, ndeps, params));
}

VGPU_API CUresult cuDeviceGraphMemTrim(CUdevice dev) {
    ready();
    NO_DRIVER(cuDeviceGraphMemTrim);
    CUresult r = vgpu_real_cuDeviceGraphMemTrim(dev);
    if (r == CUDA_SUCCESS && dev >= 0 && dev < VGPU_MAX_DEVICES) {
        pthread_once(&g_pool_once, pool_setup);
        pthread_mutex_lock(&g_graph[dev].lock);
        graph_settle(dev);
        pthread_mutex_unlock(&g_graph[dev].lock);
    }
    return r;
}

/* ---- CUDA arrays ---------------------------------------------------------------
 * Charged their texels: width x height x depth (each at least 1) x channels x
 * element size, summed over mipmap levels.  The driver's layout padding is
 * not reported by it, so it is not charged. */

static uint64_t element_bytes(CUarray_format f) {
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8: return 1;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF: return 2;
    default: return 4; /* 32-bit formats, and a safe guess for the packed ones */
    }
}

static uint64_t array_bytes(const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned int levels) {
    uint64_t total = 0;
    for (unsigned int l = 0; l < levels && l < 64; l++) {
        uint64_t w = d->Width >> l, h = d->Height >> l, z = d->Depth >> l;
        total += (w ? w : 1) * (h ? h : 1) * (z ? z : 1) * d->NumChannels * element_bytes(d->Format);
    }
    return total;
}

static CUresult create_array(void **handle, const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned int levels,
                             const char *call, CUresult (*real)(void **, const void *, unsigned int),
                             const void *desc) {
    int dev = current_device();
    uint64_t bytes = d != NULL && handle != NULL ? array_bytes(d, levels) : 0;
    if (dev < 0 || bytes == 0) return real(handle, desc, levels);
    uint64_t owner;
    CUresult r = admit(dev, bytes, call, &owner);
    if (r != CUDA_SUCCESS) return r;
    r = real(handle, desc, levels);
    settle(g_arrays, r, (uint64_t)(uintptr_t)*handle, bytes, dev, owner);
    return r;
}

static CUresult real_array(void **h, const void *desc, unsigned int levels) {
    (void)levels;
    return vgpu_real_cuArrayCreate_v2((CUarray *)h, desc);
}
static CUresult real_array3d(void **h, const void *desc, unsigned int levels) {
    (void)levels;
    return vgpu_real_cuArray3DCreate_v2((CUarray *)h, desc);
}
static CUresult real_mipmap(void **h, const void *desc, unsigned int levels) {
    return vgpu_real_cuMipmappedArrayCreate((CUmipmappedArray *)h, desc, levels);
}

static CUresult destroy_array(void *handle, CUresult (*real)(void *)) {
    uint64_t bytes, owner;
    int dev;
    if (handle == NULL || !vgpu_table_take(g_arrays, (uint64_t)(uintptr_t)handle, &bytes, &dev, &owner))
        return real(handle);
    CUresult r = real(handle);
    if (r == CUDA_SUCCESS)
        vgpu_credit(dev, bytes, owner);
    else
        vgpu_table_put(g_arrays, (uint64_t)(uintptr_t)handle, bytes, dev, owner);
    return r;
}

static CUresult real_array_destroy(void *h) { return vgpu_real_cuArrayDestroy((CUarray)h); }
static CUresult real_mipmap_destroy(void *h) {
    return vgpu_real_cuMipmappedArrayDestroy((CUmipmappedArray)h);
}

VGPU_API CUresult cuArrayCreate_v2(CUarray *handle, const CUDA_ARRAY_DESCRIPTOR *desc) {
    ready();
    NO_DRIVER(cuArrayCreate_v2);
    REENTERED(vgpu_real_cuArrayCreate_v2(handle, desc));
    if (desc == NULL) return vgpu_real_cuArrayCreate_v2(handle, desc);
    CUDA_ARRAY3D_DESCRIPTOR d = {desc->Width, desc->Height, 0, desc->Format, desc->NumChannels, 0};
    GUARDED(create_array((void **)handle, &d, 1, "cuArrayCreate_v2", real_array, desc));
}

VGPU_API CUresult cuArray3DCreate_v2(CUarray *handle, const CUDA_ARRAY3D_DESCRIPTOR *desc) {
    ready();
    NO_DRIVER(cuArray3DCreate_v2);
    REENTERED(vgpu_real_cuArray3DCreate_v2(handle, desc));
    GUARDED(create_array((void **)handle, desc, 1, "cuArray3DCreate_v2", real_array3d, desc));
}

VGPU_API CUresult cuMipmappedArrayCreate(CUmipmappedArray *handle,
                                         const CUDA_ARRAY3D_DESCRIPTOR *desc, unsigned int levels) {
    ready();
    NO_DRIVER(cuMipmappedArrayCreate);
    REENTERED(vgpu_real_cuMipmappedArrayCreate(handle, desc, levels));
    GUARDED(create_array((void **)handle, desc, levels, "cuMipmappedArrayCreate", real_mipmap,
                         desc));
}

VGPU_API CUresult cuArrayDestroy(CUarray handle) {
    ready();
    NO_DRIVER(cuArrayDestroy);
    REENTERED(vgpu_real_cuArrayDestroy(handle));
    GUARDED(destroy_array(handle, real_array_destroy));
}

VGPU_API CUresult cuMipmappedArrayDestroy(CUmipmappedArray handle) {
    ready();
    NO_DRIVER(cuMipmappedArrayDestroy);
    REENTERED(vgpu_real_cuMipmappedArrayDestroy(handle));
    GUARDED(destroy_array(handle, real_mipmap_destroy));
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

/* Charges of processes that died (SIGKILL, an exec) are given back first, so
 * the free memory a program sizes itself by is current. */
VGPU_API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    ready();
    NO_DRIVER(cuMemGetInfo_v2);
    vgpu_reclaim_dead();
    settle_all_pools();
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
    vgpu_reclaim_dead();
    settle_all_pools();
    CUresult r = vgpu_real_cuMemGetInfo(free_bytes, total_bytes);
    uint64_t f, t, u;
    if (r == CUDA_SUCCESS && slice_info(current_device(), &f, &t, &u)) {
        *free_bytes = f > 0xffffffffULL ? 0xffffffffU : (unsigned int)f;
        *total_bytes = t > 0xffffffffULL ? 0xffffffffU : (unsigned int)t;
    }
    return r;
}

/* The slice, not the card: frameworks size themselves from the total
 * (PyTorch's caching allocator, TensorFlow's memory fraction), and would aim
 * past the slice otherwise. */
VGPU_API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    ready();
    NO_DRIVER(cuDeviceTotalMem_v2);
    CUresult r = vgpu_real_cuDeviceTotalMem_v2(bytes, dev);
    uint64_t limit = dev >= 0 && dev < VGPU_MAX_DEVICES ? vgpu_limit(dev) : 0;
    if (r == CUDA_SUCCESS && limit != 0) *bytes = limit;
    return r;
}

VGPU_API CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev) {
    ready();
    NO_DRIVER(cuDeviceTotalMem);
    CUresult r = vgpu_real_cuDeviceTotalMem(bytes, dev);
    uint64_t limit = dev >= 0 && dev < VGPU_MAX_DEVICES ? vgpu_limit(dev) : 0;
    if (r == CUDA_SUCCESS && limit != 0) *bytes = limit > 0xffffffffULL ? 0xffffffffU : (unsigned)limit;
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
    vgpu_reclaim_dead();
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
    vgpu_reclaim_dead();
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
