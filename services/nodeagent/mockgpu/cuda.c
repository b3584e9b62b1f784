/*
 * cuda.c - the mock CUDA driver, built as libcuda.so.1.
 *
 * It exports the driver functions vslice interposes, with the real names and
 * signatures, and behaves like a card in the ways the tests measure: device
 * memory is real address space (anonymous MAP_NORESERVE mappings, so a
 * 16 GiB card costs nothing until written), the physical total is enforced
 * across processes through the shared state (mockstate.h), and kernels occupy
 * the device for the time their struct vslice_mock_kernel says (mockgpu.h).
 * Every kernel interval is recorded in the state, and appended to the text
 * file $VSLICE_MOCKGPU_TRACE ("<device> <pid> <start_ns> <end_ns>" per line,
 * CLOCK_REALTIME) when that variable is set.  A process's kernels that run
 * back to back are written as one interval, and lines are buffered until a
 * synchronize, a full buffer or exit, so that tracing a million 1 us kernels
 * a second neither slows the launches nor fills the disk.
 *
 * Events are timestamped where they fall in the device's queue: an event
 * recorded while kernels are queued completes when the last of them ends, one
 * recorded on an idle device completes at once.  So, as on a real card, the
 * elapsed time between an event recorded just before a launch and one just
 * after it is the kernel's run time, plus any time the device spent between
 * the two records waiting for the host to submit the kernel.
 *
 * A MIG device (mockstate.h) named in CUDA_VISIBLE_DEVICES by its "MIG-..."
 * UUID is one CUDA device: its memory is the GPU instance's, charged to the
 * instance and to its GPU, and its kernels queue on the instance alone.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mockgpu.h"
#include "mockstate.h"

#define API __attribute__((visibility("default")))
#define DRIVER_VERSION 12060
#define VMM_GRANULARITY (2ULL << 20) /* bytes */
#define PITCH_ALIGNMENT 512ULL      /* bytes */
#define CTX_MAGIC 0x78746378U
#define POOL_MAGIC 0x6c6f6f70U
#define VMM_MAGIC 0x6d6d7676U

struct CUctx_st {
    uint32_t magic;
    int dev;
};
/* A stream-ordered pool: like the real one, it keeps memory freed into it
 * (reserved - used) for reuse, and gives it back to the device only on
 * cuMemPoolTrimTo, or on a synchronization for what exceeds its release
 * threshold (CUDA Driver API, "Stream Ordered Memory Allocator"). */
struct CUmemPoolHandle_st {
    uint32_t magic;
    int dev;
    pthread_mutex_t lock;
    uint64_t reserved;  /* bytes taken from the device */
    uint64_t used;      /* bytes handed out and not freed */
    uint64_t threshold; /* CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, default 0 */
};
#define ARRAY_MAGIC 0x79617261U
#define MIPMAP_MAGIC 0x70616d6dU
struct mock_array {
    uint32_t magic;
    int dev;
    size_t size; /* bytes charged to the device */
};
struct vmm_handle {
    uint32_t magic;
    int dev; /* -1 for host memory */
    size_t size;
};

static atomic_int g_initialized;
/* CUDA_VISIBLE_DEVICES: ordinal -> index in the shared state (set by cuInit),
 * and for a MIG device the serial of its compute instance (0 for a GPU). */
static int g_visible[MOCK_MAX_DEVICES];
static uint64_t g_visible_serial[MOCK_MAX_DEVICES];
static int g_visible_count;
static struct CUctx_st g_primary[MOCK_MAX_DEVICES];
static struct CUmemPoolHandle_st g_pools[MOCK_MAX_DEVICES];
static __thread struct CUctx_st *t_ctx;
static atomic_ullong g_alloc_calls;

/* ---- process-local allocation table ------------------------------------ */

struct alloc {
    CUdeviceptr ptr;
    size_t size; /* bytes charged to the device, or taken from pool */
    size_t mapped;
    struct CUmemPoolHandle_st *pool; /* stream-ordered: freed into this pool */
    int dev;
    int low32;
    struct alloc *next;
};
#define BUCKETS 4096
static struct alloc *g_table[BUCKETS];
static pthread_mutex_t g_table_lock = PTHREAD_MUTEX_INITIALIZER;

static size_t bucket_of(CUdeviceptr p) { return (size_t)((p >> 12) * 0x9E3779B97F4A7C15ULL >> 52); }

static void table_put(struct alloc *a) {
    pthread_mutex_lock(&g_table_lock);
    size_t b = bucket_of(a->ptr);
    a->next = g_table[b];
    g_table[b] = a;
    pthread_mutex_unlock(&g_table_lock);
}

static struct alloc *table_take(CUdeviceptr p) {
    pthread_mutex_lock(&g_table_lock);
    struct alloc **pp = &g_table[bucket_of(p)];
    while (*pp != NULL && (*pp)->ptr != p) pp = &(*pp)->next;
    struct alloc *a = *pp;
    if (a != NULL) *pp = a->next;
    pthread_mutex_unlock(&g_table_lock);
    return a;
}

/* ---- recycled mappings ---------------------------------------------------
 * Like the real driver, the mock does not clear memory between allocations,
 * so freed mappings are kept (up to MAPPING_CACHE of them, MAPPING_CACHE_BYTES
 * in all) and handed out again for the same size without a system call.  This
 * keeps the mock's own cost small and steady, so what libvgpu adds to an
 * allocation can be measured. */
#define MAPPING_CACHE 32
#define MAPPING_CACHE_BYTES (256ULL << 20)
static struct {
    void *ptr;
    size_t size;
} g_cache[MAPPING_CACHE];
static int g_cached;
static size_t g_cached_bytes;
static pthread_mutex_t g_cache_lock = PTHREAD_MUTEX_INITIALIZER;

static void *mapping_get(size_t size) {
    void *p = NULL;
    pthread_mutex_lock(&g_cache_lock);
    for (int i = g_cached - 1; i >= 0; i--) {
        if (g_cache[i].size != size) continue;
        p = g_cache[i].ptr;
        g_cache[i] = g_cache[--g_cached];
        g_cached_bytes -= size;
        break;
    }
    pthread_mutex_unlock(&g_cache_lock);
    return p;
}

static void mapping_put(void *p, size_t size) {
    pthread_mutex_lock(&g_cache_lock);
    int keep = g_cached < MAPPING_CACHE && g_cached_bytes + size <= MAPPING_CACHE_BYTES;
    if (keep) {
        g_cache[g_cached].ptr = p;
        g_cache[g_cached].size = size;
        g_cached++;
        g_cached_bytes += size;
    }
    pthread_mutex_unlock(&g_cache_lock);
    if (!keep) munmap(p, size);
}

/* ---- per-process launch queues ------------------------------------------ */

struct queue {
    pthread_mutex_t lock;
    int64_t ends[VSLICE_MOCK_QUEUE_DEPTH];
    uint64_t count;
    int64_t last_end_ns;
    int64_t trace_start_ns; /* the interval not yet written to the trace (0 = none) */
    int64_t trace_end_ns;
};
static struct queue g_queues[MOCK_MAX_DEVICES];
static pthread_once_t g_queue_once = PTHREAD_ONCE_INIT;
static int g_trace_fd = -1;

/* Trace lines wait here (under g_trace_lock) until TRACE_FLUSH bytes, a
 * synchronize or exit; one write of whole lines is one O_APPEND write, so the
 * lines of processes sharing the file never interleave. */
#define TRACE_BUFFER 65536
#define TRACE_FLUSH (TRACE_BUFFER - 256)
static char g_trace_buf[TRACE_BUFFER];
static size_t g_trace_len;
static pthread_mutex_t g_trace_lock = PTHREAD_MUTEX_INITIALIZER;

static void trace_flush_locked(void) {
    if (g_trace_len > 0 && write(g_trace_fd, g_trace_buf, g_trace_len) != (ssize_t)g_trace_len)
        perror("mockgpu: trace");
    g_trace_len = 0;
}

static void trace_line(int dev, int64_t start, int64_t end) {
    pthread_mutex_lock(&g_trace_lock);
    g_trace_len += (size_t)snprintf(g_trace_buf + g_trace_len, TRACE_BUFFER - g_trace_len,
                                    "%d %d %lld %lld\n", dev, (int)getpid(), (long long)start,
                                    (long long)end);
    if (g_trace_len >= TRACE_FLUSH) trace_flush_locked();
    pthread_mutex_unlock(&g_trace_lock);
}

/* Writes out device dev's pending interval and the buffer; q->lock held. */
static void trace_sync(int dev) {
    struct queue *q = &g_queues[dev];
    if (g_trace_fd < 0) return;
    if (q->trace_start_ns != 0) trace_line(dev, q->trace_start_ns, q->trace_end_ns);
    q->trace_start_ns = 0;
    pthread_mutex_lock(&g_trace_lock);
    trace_flush_locked();
    pthread_mutex_unlock(&g_trace_lock);
}

static void trace_at_exit(void) {
    for (int i = 0; i < MOCK_MAX_DEVICES; i++) {
        pthread_mutex_lock(&g_queues[i].lock);
        trace_sync(i);
        pthread_mutex_unlock(&g_queues[i].lock);
    }
}

static void queue_init(void) {
    for (int i = 0; i < MOCK_MAX_DEVICES; i++) pthread_mutex_init(&g_queues[i].lock, NULL);
    const char *trace = getenv("VSLICE_MOCKGPU_TRACE");
    if (trace != NULL && *trace != '\0') {
        g_trace_fd = open(trace, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (g_trace_fd >= 0) atexit(trace_at_exit);
    }
}

static void sleep_until_ns(int64_t t) {
    struct timespec ts = {.tv_sec = t / 1000000000LL, .tv_nsec = t % 1000000000LL};
    while (clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

/* ---- helpers ------------------------------------------------------------ */

static struct mock_state *ready(void) {
    if (!atomic_load_explicit(&g_initialized, memory_order_acquire)) return NULL;
    return mock_state_get();
}

static CUresult current_device(int *dev) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (t_ctx == NULL) return CUDA_ERROR_INVALID_CONTEXT;
    *dev = t_ctx->dev;
    return CUDA_SUCCESS;
}

static int valid_device(struct mock_state *st, CUdevice d) {
    (void)st;
    return d >= 0 && d < g_visible_count;
}

/* The state's device behind a visible ordinal (NVML and the state count
 * physical devices; CUDA counts the visible ones). */
static struct mock_device *dev_of(struct mock_state *st, int dev) { return &st->devices[g_visible[dev]]; }

/* CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, as NVIDIA's MPS server applies it to each client
 * process: "<ordinal>=<n>M|G[,...]", the ordinals CUDA numbers the visible devices by.
 * The mock stands in for the MPS server: a process's allocations on a device stop at
 * its limit (bytes; 0 = none), counted in g_mps_used. Read at cuInit. */
static uint64_t g_mps_limit[MOCK_MAX_DEVICES];
static _Atomic uint64_t g_mps_used[MOCK_MAX_DEVICES];

static void read_mps_limits(void) {
    memset(g_mps_limit, 0, sizeof g_mps_limit);
    const char *env = getenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT");
    if (env == NULL) return;
    char *copy = strdup(env);
    if (copy == NULL) return;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        char *end;
        long ordinal = strtol(tok, &end, 10);
        if (end == tok || *end != '=' || ordinal < 0 || ordinal >= g_visible_count) continue;
        char *unit;
        unsigned long long n = strtoull(end + 1, &unit, 10);
        if (unit == end + 1 || n == 0) continue;
        if (*unit == 'G' || *unit == 'g')
            n <<= 30;
        else if (*unit == 'M' || *unit == 'm')
            n <<= 20;
        else
            continue;
        g_mps_limit[ordinal] = n;
    }
    free(copy);
}

static int charge(struct mock_state *st, int dev, size_t size) {
    uint64_t limit = g_mps_limit[dev];
    if (limit != 0) {
        uint64_t old = atomic_load(&g_mps_used[dev]);
        do {
            if (size > limit || old > limit - size) return 0;
        } while (!atomic_compare_exchange_weak(&g_mps_used[dev], &old, old + size));
    }
    if (mock_charge(st, (unsigned int)g_visible[dev], g_visible_serial[dev], size)) return 1;
    if (limit != 0) atomic_fetch_sub(&g_mps_used[dev], size);
    return 0;
}

static void credit(struct mock_state *st, int dev, size_t size) {
    mock_credit(st, (unsigned int)g_visible[dev], size);
    if (g_mps_limit[dev] != 0) atomic_fetch_sub(&g_mps_used[dev], size);
}

static CUresult alloc_on(int dev, size_t size, int low32, CUdeviceptr *out) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (out == NULL || size == 0) return CUDA_ERROR_INVALID_VALUE;
    atomic_fetch_add(&g_alloc_calls, 1);
    if (!charge(st, dev, size)) return CUDA_ERROR_OUT_OF_MEMORY;
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (low32 ? MAP_32BIT : 0);
    void *p = low32 ? NULL : mapping_get(size);
    if (p == NULL) p = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, -1, 0);
    struct alloc *a = p == MAP_FAILED ? NULL : malloc(sizeof *a);
    if (a == NULL) {
        if (p != MAP_FAILED) munmap(p, size);
        credit(st, dev, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    a->ptr = (CUdeviceptr)(uintptr_t)p;
    a->size = size;
    a->mapped = size;
    a->dev = dev;
    a->low32 = low32;
    a->pool = NULL;
    table_put(a);
    *out = a->ptr;
    return CUDA_SUCCESS;
}

static CUresult alloc_current(size_t size, CUdeviceptr *out) {
    int dev;
    CUresult r = current_device(&dev);
    return r != CUDA_SUCCESS ? r : alloc_on(dev, size, 0, out);
}

static CUresult free_ptr(CUdeviceptr p) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (p == 0) return CUDA_SUCCESS;
    struct alloc *a = table_take(p);
    if (a == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (a->low32)
        munmap((void *)(uintptr_t)a->ptr, a->mapped);
    else
        mapping_put((void *)(uintptr_t)a->ptr, a->mapped);
    if (a->pool != NULL) {
        pthread_mutex_lock(&a->pool->lock);
        a->pool->used -= a->size; /* kept by the pool, not given back */
        pthread_mutex_unlock(&a->pool->lock);
    } else {
        credit(st, a->dev, a->size);
    }
    free(a);
    return CUDA_SUCCESS;
}

/* Gives a pool's reserve back to the device down to floor bytes (never below
 * what is in use).  Caller holds the pool's lock. */
static void pool_release_locked(struct mock_state *st, struct CUmemPoolHandle_st *pool,
                                uint64_t floor) {
    if (floor < pool->used) floor = pool->used;
    if (pool->reserved <= floor) return;
    credit(st, pool->dev, pool->reserved - floor);
    pool->reserved = floor;
}

/* An allocation from pool: its free reserve first, the device for the rest. */
static CUresult pool_alloc(struct CUmemPoolHandle_st *pool, size_t size, CUdeviceptr *out) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (out == NULL || size == 0) return CUDA_ERROR_INVALID_VALUE;
    atomic_fetch_add(&g_alloc_calls, 1);
    pthread_mutex_lock(&pool->lock);
    uint64_t spare = pool->reserved - pool->used;
    uint64_t grow = size > spare ? size - spare : 0;
    if (grow > 0 && !charge(st, pool->dev, grow)) {
        pthread_mutex_unlock(&pool->lock);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    pool->reserved += grow;
    pool->used += size;
    pthread_mutex_unlock(&pool->lock);
    void *p = mapping_get(size);
    if (p == NULL)
        p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                 -1, 0);
    struct alloc *a = p == MAP_FAILED ? NULL : malloc(sizeof *a);
    if (a == NULL) {
        if (p != MAP_FAILED) munmap(p, size);
        pthread_mutex_lock(&pool->lock);
        pool->used -= size;
        pthread_mutex_unlock(&pool->lock);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *a = (struct alloc){.ptr = (CUdeviceptr)(uintptr_t)p, .size = size, .mapped = size,
                        .pool = pool, .dev = pool->dev, .low32 = 0};
    table_put(a);
    *out = a->ptr;
    return CUDA_SUCCESS;
}

/* A synchronization gives back what each pool holds above its threshold. */
static void pools_sync(void) {
    struct mock_state *st = ready();
    if (st == NULL) return;
    for (int i = 0; i < g_visible_count; i++) {
        pthread_mutex_lock(&g_pools[i].lock);
        pool_release_locked(st, &g_pools[i], g_pools[i].threshold);
        pthread_mutex_unlock(&g_pools[i].lock);
    }
}

/* ---- initialization, devices, contexts --------------------------------- */

/* CUDA_VISIBLE_DEVICES as the CUDA C Programming Guide ("CUDA Environment
 * Variables") describes it: a comma list of device indices or UUIDs (a unique
 * prefix of "GPU-..." or "MIG-..." is enough); only those devices are
 * visible, in that order, and an entry that names no device ends the list.
 * Unset: all GPUs. */
static int match_visible(struct mock_state *st, const char *tok) {
    char *end;
    long idx = strtol(tok, &end, 10);
    if (end != tok && *end == '\0') return idx >= 0 && (uint32_t)idx < st->device_count ? (int)idx : -1;
    if (strncmp(tok, "MIG-", 4) == 0) return mock_find_mig(st, tok);
    int found = -1;
    for (uint32_t i = 0; i < st->device_count; i++) {
        if (strncmp(st->devices[i].uuid, tok, strlen(tok)) != 0) continue;
        if (found >= 0) return -1; /* ambiguous prefix */
        found = (int)i;
    }
    return found;
}

static void pick_visible(struct mock_state *st) {
    const char *env = getenv("CUDA_VISIBLE_DEVICES");
    g_visible_count = 0;
    if (env == NULL) {
        for (uint32_t i = 0; i < st->device_count; i++) {
            g_visible_serial[g_visible_count] = 0;
            g_visible[g_visible_count++] = (int)i;
        }
        return;
    }
    char *copy = strdup(env);
    if (copy == NULL) return;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok != NULL && g_visible_count < MOCK_MAX_DEVICES;
         tok = strtok_r(NULL, ",", &save)) {
        while (*tok == ' ') tok++;
        int idx = match_visible(st, tok);
        if (idx < 0) break;
        int dup = 0;
        for (int k = 0; k < g_visible_count; k++) dup |= g_visible[k] == idx;
        if (dup) break;
        /* a MIG device from now on means this compute instance, not a later one */
        g_visible_serial[g_visible_count] =
            (uint32_t)idx < st->device_count ? 0 : atomic_load(&st->devices[idx].ci_serial);
        g_visible[g_visible_count++] = idx;
    }
    free(copy);
}

API CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    struct mock_state *st = mock_state_get();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    pick_visible(st);
    if (g_visible_count == 0) return CUDA_ERROR_NO_DEVICE;
    read_mps_limits();
    for (int i = 0; i < g_visible_count; i++) {
        g_primary[i] = (struct CUctx_st){.magic = CTX_MAGIC, .dev = (int)i};
        g_pools[i] = (struct CUmemPoolHandle_st){.magic = POOL_MAGIC, .dev = (int)i};
        pthread_mutex_init(&g_pools[i].lock, NULL);
    }
    pthread_once(&g_queue_once, queue_init);
    atomic_store_explicit(&g_initialized, 1, memory_order_release);
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int *version) {
    if (version == NULL) return CUDA_ERROR_INVALID_VALUE;
    *version = DRIVER_VERSION;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetCount(int *count) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (count == NULL) return CUDA_ERROR_INVALID_VALUE;
    *count = g_visible_count;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (device == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(st, ordinal)) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (name == NULL || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(st, dev)) return CUDA_ERROR_INVALID_DEVICE;
    mock_device_name(st, (unsigned int)g_visible[dev], name, (size_t)len);
    return CUDA_SUCCESS;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

API CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (uuid == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(st, dev)) return CUDA_ERROR_INVALID_DEVICE;
    memset(uuid, 0, sizeof *uuid);
    const char *s = dev_of(st, dev)->uuid;
    if (strncmp(s, "GPU-", 4) == 0) s += 4;
    int n = 0;
    for (; *s != '\0' && n < 32; s++) {
        int v = hexval(*s);
        if (v < 0) continue;
        uuid->bytes[n / 2] = (char)(uuid->bytes[n / 2] | (v << (n % 2 ? 0 : 4)));
        n++;
    }
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) { return cuDeviceGetUuid(uuid, dev); }

API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (bytes == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(st, dev)) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = dev_of(st, dev)->total_bytes;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev) {
    size_t total = 0;
    CUresult r = cuDeviceTotalMem_v2(&total, dev);
    if (r == CUDA_SUCCESS) *bytes = total > 0xffffffffULL ? 0xffffffffU : (unsigned int)total;
    return r;
}

API CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (pi == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(st, dev)) return CUDA_ERROR_INVALID_DEVICE;
    switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT:
        /* a MIG device has its compute slices' share, as NVML reports it */
        *pi = (uint32_t)g_visible[dev] < st->device_count
                  ? 108
                  : MOCK_SMS_PER_SLICE * (int)dev_of(st, dev)->compute;
        break;
    case CU_DEVICE_ATTRIBUTE_TEXTURE_PITCH_ALIGNMENT: *pi = (int)PITCH_ALIGNMENT; break;
    default: *pi = 0; break;
    }
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (pctx == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(st, dev)) return CUDA_ERROR_INVALID_DEVICE;
    *pctx = &g_primary[dev];
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    return valid_device(st, dev) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE;
}

API CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev) {
    (void)flags;
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (pctx == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(st, dev)) return CUDA_ERROR_INVALID_DEVICE;
    struct CUctx_st *c = malloc(sizeof *c);
    if (c == NULL) return CUDA_ERROR_OUT_OF_MEMORY;
    *c = (struct CUctx_st){.magic = CTX_MAGIC, .dev = dev};
    t_ctx = c;
    *pctx = c;
    return CUDA_SUCCESS;
}

API CUresult cuCtxDestroy_v2(CUcontext ctx) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx == NULL || ctx->magic != CTX_MAGIC) return CUDA_ERROR_INVALID_CONTEXT;
    if (t_ctx == ctx) t_ctx = NULL;
    if (ctx < &g_primary[0] || ctx >= &g_primary[MOCK_MAX_DEVICES]) {
        ctx->magic = 0;
        free(ctx);
    }
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(CUcontext *pctx) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (pctx == NULL) return CUDA_ERROR_INVALID_VALUE;
    *pctx = t_ctx;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetCurrent(CUcontext ctx) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (ctx != NULL && ctx->magic != CTX_MAGIC) return CUDA_ERROR_INVALID_CONTEXT;
    t_ctx = ctx;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetDevice(CUdevice *device) {
    if (device == NULL) return CUDA_ERROR_INVALID_VALUE;
    int dev;
    CUresult r = current_device(&dev);
    if (r == CUDA_SUCCESS) *device = dev;
    return r;
}

static CUresult sync_device(int dev) {
    struct queue *q = &g_queues[dev];
    pthread_mutex_lock(&q->lock);
    int64_t until = q->last_end_ns;
    trace_sync(dev);
    pthread_mutex_unlock(&q->lock);
    if (until > mock_now_ns()) sleep_until_ns(until);
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize(void) {
    int dev;
    CUresult r = current_device(&dev);
    if (r != CUDA_SUCCESS) return r;
    r = sync_device(dev);
    pools_sync();
    return r;
}

API CUresult cuStreamSynchronize(CUstream stream) {
    (void)stream;
    return cuCtxSynchronize();
}
API CUresult cuStreamSynchronize_ptsz(CUstream stream) { return cuStreamSynchronize(stream); }

/* The enum names of cuda.h, as cuGetErrorName returns them. */
API CUresult cuGetErrorName(CUresult error, const char **str) {
    if (str == NULL) return CUDA_ERROR_INVALID_VALUE;
    switch (error) {
    case CUDA_SUCCESS: *str = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *str = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *str = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *str = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case CUDA_ERROR_NO_DEVICE: *str = "CUDA_ERROR_NO_DEVICE"; break;
    case CUDA_ERROR_INVALID_DEVICE: *str = "CUDA_ERROR_INVALID_DEVICE"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *str = "CUDA_ERROR_INVALID_CONTEXT"; break;
    default: *str = NULL; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorString(CUresult error, const char **str) {
    if (str == NULL) return CUDA_ERROR_INVALID_VALUE;
    switch (error) {
    case CUDA_SUCCESS: *str = "no error"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *str = "out of memory"; break;
    case CUDA_ERROR_INVALID_VALUE: *str = "invalid argument"; break;
    default: *str = "mock driver error"; break;
    }
    return CUDA_SUCCESS;
}

/* ---- memory ------------------------------------------------------------- */

API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize) { return alloc_current(bytesize, dptr); }

API CUresult cuMemAlloc(CUdeviceptr_v1 *dptr, unsigned int bytesize) {
    int dev;
    CUresult r = current_device(&dev);
    if (r != CUDA_SUCCESS) return r;
    if (dptr == NULL) return CUDA_ERROR_INVALID_VALUE;
    CUdeviceptr p = 0;
    r = alloc_on(dev, bytesize, 1, &p);
    if (r == CUDA_SUCCESS) *dptr = (CUdeviceptr_v1)p;
    return r;
}

API CUresult cuMemFree_v2(CUdeviceptr dptr) { return free_ptr(dptr); }
API CUresult cuMemFree(CUdeviceptr_v1 dptr) { return free_ptr(dptr); }

API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width, size_t height,
                                unsigned int element_size) {
    if (pitch == NULL || width == 0 || height == 0) return CUDA_ERROR_INVALID_VALUE;
    if (element_size != 4 && element_size != 8 && element_size != 16) return CUDA_ERROR_INVALID_VALUE;
    size_t p = (width + PITCH_ALIGNMENT - 1) / PITCH_ALIGNMENT * PITCH_ALIGNMENT;
    CUresult r = alloc_current(p * height, dptr);
    if (r == CUDA_SUCCESS) *pitch = p;
    return r;
}

API CUresult cuMemAllocPitch(CUdeviceptr_v1 *dptr, unsigned int *pitch, unsigned int width,
                             unsigned int height, unsigned int element_size) {
    int dev;
    CUresult r = current_device(&dev);
    if (r != CUDA_SUCCESS) return r;
    if (dptr == NULL || pitch == NULL || width == 0 || height == 0) return CUDA_ERROR_INVALID_VALUE;
    if (element_size != 4 && element_size != 8 && element_size != 16) return CUDA_ERROR_INVALID_VALUE;
    size_t p = (width + PITCH_ALIGNMENT - 1) / PITCH_ALIGNMENT * PITCH_ALIGNMENT;
    CUdeviceptr out = 0;
    r = alloc_on(dev, p * height, 1, &out);
    if (r == CUDA_SUCCESS) {
        *dptr = (CUdeviceptr_v1)out;
        *pitch = (unsigned int)p;
    }
    return r;
}

API CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags) {
    (void)flags;
    return alloc_current(bytesize, dptr);
}

API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    int dev;
    CUresult r = current_device(&dev);
    if (r != CUDA_SUCCESS) return r;
    if (free_bytes == NULL || total_bytes == NULL) return CUDA_ERROR_INVALID_VALUE;
    struct mock_device *d = dev_of(mock_state_get(), dev);
    uint64_t used = atomic_load(&d->used_bytes);
    *total_bytes = d->total_bytes;
    *free_bytes = used < d->total_bytes ? d->total_bytes - used : 0;
    return CUDA_SUCCESS;
}

API CUresult cuMemGetInfo(unsigned int *free_bytes, unsigned int *total_bytes) {
    size_t f, t;
    CUresult r = cuMemGetInfo_v2(&f, &t);
    if (r != CUDA_SUCCESS) return r;
    *free_bytes = f > 0xffffffffULL ? 0xffffffffU : (unsigned int)f;
    *total_bytes = t > 0xffffffffULL ? 0xffffffffU : (unsigned int)t;
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t bytes) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (dst == 0 || src == NULL) return CUDA_ERROR_INVALID_VALUE;
    memcpy((void *)(uintptr_t)dst, src, bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoD_v2_ptds(CUdeviceptr dst, const void *src, size_t bytes) {
    return cuMemcpyHtoD_v2(dst, src, bytes);
}

/* Virtual memory management: physical handles are charged when created. */

API CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                           int option) {
    (void)option;
    if (granularity == NULL || prop == NULL) return CUDA_ERROR_INVALID_VALUE;
    *granularity = VMM_GRANULARITY;
    return CUDA_SUCCESS;
}

API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size,
                         const CUmemAllocationProp *prop, unsigned long long flags) {
    (void)flags;
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (handle == NULL || prop == NULL || size == 0 || size % VMM_GRANULARITY != 0)
        return CUDA_ERROR_INVALID_VALUE;
    int dev = -1;
    if (prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE) {
        if (!valid_device(st, prop->location.id)) return CUDA_ERROR_INVALID_DEVICE;
        dev = prop->location.id;
    } else if (prop->location.type != CU_MEM_LOCATION_TYPE_HOST &&
               prop->location.type != CU_MEM_LOCATION_TYPE_HOST_NUMA) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    atomic_fetch_add(&g_alloc_calls, 1);
    if (dev >= 0 && !charge(st, dev, size)) return CUDA_ERROR_OUT_OF_MEMORY;
    struct vmm_handle *h = malloc(sizeof *h);
    if (h == NULL) {
        if (dev >= 0) credit(st, dev, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *h = (struct vmm_handle){.magic = VMM_MAGIC, .dev = dev, .size = size};
    *handle = (CUmemGenericAllocationHandle)(uintptr_t)h;
    return CUDA_SUCCESS;
}

API CUresult cuMemRelease(CUmemGenericAllocationHandle handle) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    struct vmm_handle *h = (struct vmm_handle *)(uintptr_t)handle;
    if (h == NULL || h->magic != VMM_MAGIC) return CUDA_ERROR_INVALID_VALUE;
    if (h->dev >= 0) credit(st, h->dev, h->size);
    h->magic = 0;
    free(h);
    return CUDA_SUCCESS;
}

API CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                                 unsigned long long flags) {
    (void)alignment, (void)addr, (void)flags;
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (ptr == NULL || size == 0) return CUDA_ERROR_INVALID_VALUE;
    void *p = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    *ptr = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

API CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    return munmap((void *)(uintptr_t)ptr, size) == 0 ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                      unsigned long long flags) {
    (void)flags;
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    struct vmm_handle *h = (struct vmm_handle *)(uintptr_t)handle;
    if (h == NULL || h->magic != VMM_MAGIC || offset + size > h->size) return CUDA_ERROR_INVALID_VALUE;
    void *p = mmap((void *)(uintptr_t)ptr, size, PROT_READ | PROT_WRITE,
                   MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}

API CUresult cuMemUnmap(CUdeviceptr ptr, size_t size) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    void *p = mmap((void *)(uintptr_t)ptr, size, PROT_NONE,
                   MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}

API CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count) {
    (void)ptr, (void)size, (void)desc, (void)count;
    return ready() == NULL ? CUDA_ERROR_NOT_INITIALIZED : CUDA_SUCCESS;
}

/* Stream-ordered allocation: the mock completes it at once. */

API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool, CUdevice dev) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (pool == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(st, dev)) return CUDA_ERROR_INVALID_DEVICE;
    *pool = &g_pools[dev];
    return CUDA_SUCCESS;
}

API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    (void)stream;
    int dev;
    CUresult r = current_device(&dev);
    return r != CUDA_SUCCESS ? r : pool_alloc(&g_pools[dev], bytesize, dptr);
}
API CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream stream) {
    return cuMemAllocAsync(dptr, bytesize, stream);
}

API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                     CUstream stream) {
    (void)stream;
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (pool == NULL || pool->magic != POOL_MAGIC) return CUDA_ERROR_INVALID_VALUE;
    return pool_alloc(pool, bytesize, dptr);
}
API CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                          CUstream stream) {
    return cuMemAllocFromPoolAsync(dptr, bytesize, pool, stream);
}

API CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream stream) {
    (void)stream;
    return free_ptr(dptr);
}
API CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream stream) { return cuMemFreeAsync(dptr, stream); }

API CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t min_bytes_to_keep) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (pool == NULL || pool->magic != POOL_MAGIC) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&pool->lock);
    pool_release_locked(st, pool, min_bytes_to_keep);
    pthread_mutex_unlock(&pool->lock);
    return CUDA_SUCCESS;
}

API CUresult cuMemPoolGetAttribute(CUmemoryPool pool, CUmemPool_attribute attr, void *value) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (pool == NULL || pool->magic != POOL_MAGIC || value == NULL) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&pool->lock);
    CUresult r = CUDA_SUCCESS;
    switch (attr) {
    case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: *(cuuint64_t *)value = pool->threshold; break;
    case CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: *(cuuint64_t *)value = pool->reserved; break;
    case CU_MEMPOOL_ATTR_USED_MEM_CURRENT: *(cuuint64_t *)value = pool->used; break;
    default: r = CUDA_ERROR_NOT_SUPPORTED; break;
    }
    pthread_mutex_unlock(&pool->lock);
    return r;
}

API CUresult cuMemPoolSetAttribute(CUmemoryPool pool, CUmemPool_attribute attr, void *value) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (pool == NULL || pool->magic != POOL_MAGIC || value == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (attr != CU_MEMPOOL_ATTR_RELEASE_THRESHOLD) return CUDA_ERROR_NOT_SUPPORTED;
    pthread_mutex_lock(&pool->lock);
    pool->threshold = *(cuuint64_t *)value;
    pthread_mutex_unlock(&pool->lock);
    return CUDA_SUCCESS;
}

/* ---- CUDA arrays ------------------------------------------------------------
 * The mock charges an array its texels: width x height x depth (each at
 * least 1) x channels x element size, per mipmap level; a real driver adds
 * layout padding it does not report. */

static size_t element_bytes(CUarray_format f) {
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8: return 1;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF: return 2;
    case CU_AD_FORMAT_UNSIGNED_INT32:
    case CU_AD_FORMAT_SIGNED_INT32:
    case CU_AD_FORMAT_FLOAT: return 4;
    default: return 0;
    }
}

static size_t array_bytes(const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned int levels) {
    size_t elem = element_bytes(d->Format);
    if (elem == 0 || d->Width == 0 || (d->NumChannels != 1 && d->NumChannels != 2 &&
                                       d->NumChannels != 4))
        return 0;
    size_t total = 0;
    for (unsigned int l = 0; l < levels; l++) {
        size_t w = d->Width >> l, h = d->Height >> l, z = d->Depth >> l;
        total += (w ? w : 1) * (h ? h : 1) * (z ? z : 1) * d->NumChannels * elem;
    }
    return total;
}

static CUresult array_create(void **out, uint32_t magic, const CUDA_ARRAY3D_DESCRIPTOR *d,
                             unsigned int levels) {
    int dev;
    CUresult r = current_device(&dev);
    if (r != CUDA_SUCCESS) return r;
    size_t size = d == NULL || out == NULL || levels == 0 ? 0 : array_bytes(d, levels);
    if (size == 0) return CUDA_ERROR_INVALID_VALUE;
    atomic_fetch_add(&g_alloc_calls, 1);
    struct mock_state *st = ready();
    if (!charge(st, dev, size)) return CUDA_ERROR_OUT_OF_MEMORY;
    struct mock_array *a = malloc(sizeof *a);
    if (a == NULL) {
        credit(st, dev, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *a = (struct mock_array){.magic = magic, .dev = dev, .size = size};
    *out = a;
    return CUDA_SUCCESS;
}

static CUresult array_destroy(void *handle, uint32_t magic) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    struct mock_array *a = handle;
    if (a == NULL || a->magic != magic) return CUDA_ERROR_INVALID_HANDLE;
    credit(st, a->dev, a->size);
    a->magic = 0;
    free(a);
    return CUDA_SUCCESS;
}

API CUresult cuArrayCreate_v2(CUarray *handle, const CUDA_ARRAY_DESCRIPTOR *desc) {
    if (desc == NULL) return CUDA_ERROR_INVALID_VALUE;
    CUDA_ARRAY3D_DESCRIPTOR d = {desc->Width, desc->Height, 0, desc->Format, desc->NumChannels, 0};
    return array_create((void **)handle, ARRAY_MAGIC, &d, 1);
}

API CUresult cuArray3DCreate_v2(CUarray *handle, const CUDA_ARRAY3D_DESCRIPTOR *desc) {
    return array_create((void **)handle, ARRAY_MAGIC, desc, 1);
}

API CUresult cuArrayDestroy(CUarray handle) { return array_destroy(handle, ARRAY_MAGIC); }

API CUresult cuMipmappedArrayCreate(CUmipmappedArray *handle, const CUDA_ARRAY3D_DESCRIPTOR *desc,
                                    unsigned int levels) {
    return array_create((void **)handle, MIPMAP_MAGIC, desc, levels);
}

API CUresult cuMipmappedArrayDestroy(CUmipmappedArray handle) {
    return array_destroy(handle, MIPMAP_MAGIC);
}

/* ---- kernels -------------------------------------------------------------- */

static CUresult run_kernel(const void *handle) {
    int dev;
    CUresult r = current_device(&dev);
    if (r != CUDA_SUCCESS) return r;
    const struct vslice_mock_kernel *k = handle;
    if (k == NULL || k->magic != VSLICE_MOCK_KERNEL_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
    if (k->duration_ns == 0) return CUDA_SUCCESS;
    struct mock_device *d = dev_of(mock_state_get(), dev);
    struct queue *q = &g_queues[dev];
    pthread_mutex_lock(&q->lock);
    if (q->count >= VSLICE_MOCK_QUEUE_DEPTH) {
        /* a full push buffer blocks the launching thread, as on a real card */
        int64_t oldest = q->ends[q->count % VSLICE_MOCK_QUEUE_DEPTH];
        if (oldest > mock_now_ns()) sleep_until_ns(oldest);
    }
    int64_t now = mock_now_ns();
    int64_t old = atomic_load(&d->busy_until_ns);
    int64_t start, end;
    do {
        start = old > now ? old : now;
        end = start + (int64_t)k->duration_ns;
    } while (!atomic_compare_exchange_weak(&d->busy_until_ns, &old, end));
    uint64_t idx = atomic_fetch_add(&d->ring_head, 1);
    struct mock_interval *e = &d->ring[idx % MOCK_RING];
    atomic_store_explicit(&e->seq, 0, memory_order_relaxed);
    e->start_ns = start;
    e->end_ns = end;
    e->pid = mock_host_pid();
    atomic_store_explicit(&e->seq, idx + 1, memory_order_release);
    q->ends[q->count % VSLICE_MOCK_QUEUE_DEPTH] = end;
    q->count++;
    q->last_end_ns = end;
    if (g_trace_fd >= 0) {
        if (q->trace_start_ns != 0 && q->trace_end_ns == start) {
            q->trace_end_ns = end; /* back to back with this process's last kernel */
        } else {
            if (q->trace_start_ns != 0) trace_line(dev, q->trace_start_ns, q->trace_end_ns);
            q->trace_start_ns = start;
            q->trace_end_ns = end;
        }
    }
    pthread_mutex_unlock(&q->lock);
    return CUDA_SUCCESS;
}

API CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                            unsigned int bx, unsigned int by, unsigned int bz, unsigned int shmem,
                            CUstream stream, void **params, void **extra) {
    (void)gx, (void)gy, (void)gz, (void)bx, (void)by, (void)bz, (void)shmem, (void)stream;
    (void)params, (void)extra;
    return run_kernel(f);
}
API CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                 unsigned int bx, unsigned int by, unsigned int bz,
                                 unsigned int shmem, CUstream stream, void **params, void **extra) {
    return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra);
}

API CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra) {
    (void)params, (void)extra;
    if (config == NULL) return CUDA_ERROR_INVALID_VALUE;
    return run_kernel(f);
}
API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **params,
                                   void **extra) {
    return cuLaunchKernelEx(config, f, params, extra);
}

API CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gx, unsigned int gy,
                                       unsigned int gz, unsigned int bx, unsigned int by,
                                       unsigned int bz, unsigned int shmem, CUstream stream,
                                       void **params) {
    (void)gx, (void)gy, (void)gz, (void)bx, (void)by, (void)bz, (void)shmem, (void)stream;
    (void)params;
    return run_kernel(f);
}
API CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy,
                                            unsigned int gz, unsigned int bx, unsigned int by,
                                            unsigned int bz, unsigned int shmem, CUstream stream,
                                            void **params) {
    return cuLaunchCooperativeKernel(f, gx, gy, gz, bx, by, bz, shmem, stream, params);
}

/* ---- graphs with memory nodes ----------------------------------------------
 * A graph's allocation nodes get their address when added; the device's graph
 * memory pool maps physical memory for them at launch (growing its reserve,
 * charged to the device, to the graph's allocations) and keeps it after the
 * graph's free nodes ran, until cuDeviceGraphMemTrim (CUDA Programming Guide,
 * "Graph Memory Nodes").  An instantiated graph is also a zero-length kernel
 * (struct vslice_mock_kernel first), so cuGraphLaunch accepts either. */
#define GRAPH_MAGIC 0x68707267U
#define GRAPH_ALLOCS 64
struct mock_graph {
    uint32_t magic;
    int dev;
    int count;
    CUdeviceptr ptr[GRAPH_ALLOCS];
    size_t size[GRAPH_ALLOCS];
    int freed[GRAPH_ALLOCS];
};
struct mock_graph_exec {
    struct vslice_mock_kernel kernel; /* duration 0 */
    uint32_t magic;
    struct mock_graph *graph;
};
static struct {
    pthread_mutex_t lock;
    uint64_t reserved, used;
} g_graph_mem[MOCK_MAX_DEVICES] = {[0 ... MOCK_MAX_DEVICES - 1] = {PTHREAD_MUTEX_INITIALIZER, 0, 0}};

API CUresult cuGraphCreate(CUgraph *graph, unsigned int flags) {
    (void)flags;
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (graph == NULL) return CUDA_ERROR_INVALID_VALUE;
    struct mock_graph *g = calloc(1, sizeof *g);
    if (g == NULL) return CUDA_ERROR_OUT_OF_MEMORY;
    g->magic = GRAPH_MAGIC;
    g->dev = -1;
    *graph = (CUgraph)(void *)g;
    return CUDA_SUCCESS;
}

API CUresult cuGraphAddMemAllocNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps,
                                    size_t ndeps, CUDA_MEM_ALLOC_NODE_PARAMS *params) {
    (void)deps, (void)ndeps;
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    struct mock_graph *g = (struct mock_graph *)(void *)graph;
    if (g == NULL || g->magic != GRAPH_MAGIC || node == NULL || params == NULL ||
        params->bytesize == 0 || params->poolProps.location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
        g->count >= GRAPH_ALLOCS)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(st, params->poolProps.location.id)) return CUDA_ERROR_INVALID_DEVICE;
    if (g->dev >= 0 && g->dev != params->poolProps.location.id) return CUDA_ERROR_NOT_SUPPORTED;
    atomic_fetch_add(&g_alloc_calls, 1);
    void *p = mmap(NULL, params->bytesize, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    g->dev = params->poolProps.location.id;
    g->ptr[g->count] = params->dptr = (CUdeviceptr)(uintptr_t)p;
    g->size[g->count] = params->bytesize;
    *node = (CUgraphNode)(uintptr_t)(g->count + 1);
    g->count++;
    return CUDA_SUCCESS;
}

API CUresult cuGraphAddMemFreeNode(CUgraphNode *node, CUgraph graph, const CUgraphNode *deps,
                                   size_t ndeps, CUdeviceptr dptr) {
    (void)deps, (void)ndeps;
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    struct mock_graph *g = (struct mock_graph *)(void *)graph;
    if (g == NULL || g->magic != GRAPH_MAGIC || node == NULL) return CUDA_ERROR_INVALID_VALUE;
    for (int i = 0; i < g->count; i++) {
        if (g->ptr[i] != dptr || g->freed[i]) continue;
        g->freed[i] = 1;
        *node = (CUgraphNode)(uintptr_t)(GRAPH_ALLOCS + i + 1);
        return CUDA_SUCCESS;
    }
    return CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuGraphInstantiateWithFlags(CUgraphExec *exec, CUgraph graph, unsigned long long flags) {
    (void)flags;
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    struct mock_graph *g = (struct mock_graph *)(void *)graph;
    if (g == NULL || g->magic != GRAPH_MAGIC || exec == NULL) return CUDA_ERROR_INVALID_VALUE;
    struct mock_graph_exec *e = malloc(sizeof *e);
    if (e == NULL) return CUDA_ERROR_OUT_OF_MEMORY;
    *e = (struct mock_graph_exec){{VSLICE_MOCK_KERNEL_MAGIC, 0}, GRAPH_MAGIC, g};
    *exec = (CUgraphExec)(void *)e;
    return CUDA_SUCCESS;
}

/* Maps the graph's allocations from the device's graph pool: its reserve
 * grows to hold them; what the graph does not free stays in use. */
static CUresult graph_mem_launch(struct mock_graph *g) {
    struct mock_state *st = ready();
    if (g->dev < 0 || g->count == 0) return CUDA_SUCCESS;
    uint64_t total = 0, kept = 0;
    for (int i = 0; i < g->count; i++) {
        total += g->size[i];
        if (!g->freed[i]) kept += g->size[i];
    }
    pthread_mutex_lock(&g_graph_mem[g->dev].lock);
    uint64_t spare = g_graph_mem[g->dev].reserved - g_graph_mem[g->dev].used;
    uint64_t grow = total > spare ? total - spare : 0;
    CUresult r = CUDA_SUCCESS;
    if (grow > 0 && !charge(st, g->dev, grow)) {
        r = CUDA_ERROR_OUT_OF_MEMORY;
    } else {
        g_graph_mem[g->dev].reserved += grow;
        g_graph_mem[g->dev].used += kept;
    }
    pthread_mutex_unlock(&g_graph_mem[g->dev].lock);
    return r;
}

API CUresult cuDeviceGraphMemTrim(CUdevice dev) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_device(st, dev)) return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_graph_mem[dev].lock);
    uint64_t spare = g_graph_mem[dev].reserved - g_graph_mem[dev].used;
    if (spare > 0) credit(st, dev, spare);
    g_graph_mem[dev].reserved -= spare;
    pthread_mutex_unlock(&g_graph_mem[dev].lock);
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetGraphMemAttribute(CUdevice dev, CUgraphMem_attribute attr, void *value) {
    struct mock_state *st = ready();
    if (st == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (!valid_device(st, dev)) return CUDA_ERROR_INVALID_DEVICE;
    if (value == NULL) return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_graph_mem[dev].lock);
    CUresult r = CUDA_SUCCESS;
    switch (attr) {
    case CU_GRAPH_MEM_ATTR_USED_MEM_CURRENT: *(cuuint64_t *)value = g_graph_mem[dev].used; break;
    case CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT:
        *(cuuint64_t *)value = g_graph_mem[dev].reserved;
        break;
    default: r = CUDA_ERROR_NOT_SUPPORTED; break;
    }
    pthread_mutex_unlock(&g_graph_mem[dev].lock);
    return r;
}

API CUresult cuGraphLaunch(CUgraphExec graph, CUstream stream) {
    (void)stream;
    const struct mock_graph_exec *e = (const struct mock_graph_exec *)(const void *)graph;
    if (e != NULL && e->kernel.magic == VSLICE_MOCK_KERNEL_MAGIC && e->kernel.duration_ns == 0 &&
        e->magic == GRAPH_MAGIC) {
        CUresult r = graph_mem_launch(e->graph);
        if (r != CUDA_SUCCESS) return r;
    }
    return run_kernel(graph);
}
API CUresult cuGraphLaunch_ptsz(CUgraphExec graph, CUstream stream) { return cuGraphLaunch(graph, stream); }

/* ---- events and stream capture -------------------------------------------- */

#define EVENT_MAGIC 0x746e7665U

struct CUevent_st {
    uint32_t magic;
    unsigned int flags;
    _Atomic int64_t done_ns; /* when the device reaches the event; 0 = never recorded */
};

API CUresult cuEventCreate(CUevent *event, unsigned int flags) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (event == NULL || (flags & ~0xfU) != 0) return CUDA_ERROR_INVALID_VALUE;
    struct CUevent_st *e = calloc(1, sizeof *e);
    if (e == NULL) return CUDA_ERROR_OUT_OF_MEMORY;
    e->magic = EVENT_MAGIC;
    e->flags = flags;
    *event = e;
    return CUDA_SUCCESS;
}

API CUresult cuEventDestroy_v2(CUevent event) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (event == NULL || event->magic != EVENT_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
    event->magic = 0;
    free(event);
    return CUDA_SUCCESS;
}

/* The device is one queue shared by every process (mockgpu.h), so an event is
 * reached when every kernel queued before it, by any process, has ended. */
API CUresult cuEventRecord(CUevent event, CUstream stream) {
    (void)stream;
    int dev;
    CUresult r = current_device(&dev);
    if (r != CUDA_SUCCESS) return r;
    if (event == NULL || event->magic != EVENT_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
    int64_t now = mock_now_ns();
    int64_t busy = atomic_load(&dev_of(mock_state_get(), dev)->busy_until_ns);
    atomic_store(&event->done_ns, busy > now ? busy : now);
    return CUDA_SUCCESS;
}
API CUresult cuEventRecord_ptsz(CUevent event, CUstream stream) { return cuEventRecord(event, stream); }

API CUresult cuEventQuery(CUevent event) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (event == NULL || event->magic != EVENT_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
    int64_t done = atomic_load(&event->done_ns);
    return done == 0 || done <= mock_now_ns() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

API CUresult cuEventSynchronize(CUevent event) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (event == NULL || event->magic != EVENT_MAGIC) return CUDA_ERROR_INVALID_HANDLE;
    int64_t done = atomic_load(&event->done_ns);
    if (done > mock_now_ns()) sleep_until_ns(done);
    return CUDA_SUCCESS;
}

/* Milliseconds between two completed events, with the real driver's errors:
 * NOT_READY while either is pending, INVALID_HANDLE when one was never
 * recorded or was created with CU_EVENT_DISABLE_TIMING. */
API CUresult cuEventElapsedTime(float *ms, CUevent start, CUevent end) {
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (ms == NULL) return CUDA_ERROR_INVALID_VALUE;
    if (start == NULL || end == NULL || start->magic != EVENT_MAGIC || end->magic != EVENT_MAGIC)
        return CUDA_ERROR_INVALID_HANDLE;
    int64_t a = atomic_load(&start->done_ns), b = atomic_load(&end->done_ns);
    if (a == 0 || b == 0 || ((start->flags | end->flags) & CU_EVENT_DISABLE_TIMING))
        return CUDA_ERROR_INVALID_HANDLE;
    int64_t now = mock_now_ns();
    if (a > now || b > now) return CUDA_ERROR_NOT_READY;
    *ms = (float)((double)(b - a) / 1e6);
    return CUDA_SUCCESS;
}
API CUresult cuEventElapsedTime_v2(float *ms, CUevent start, CUevent end) {
    return cuEventElapsedTime(ms, start, end);
}

/* The mock has no graphs to capture into: no stream is ever capturing. */
API CUresult cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus *status) {
    (void)stream;
    if (ready() == NULL) return CUDA_ERROR_NOT_INITIALIZED;
    if (status == NULL) return CUDA_ERROR_INVALID_VALUE;
    *status = CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}
API CUresult cuStreamIsCapturing_ptsz(CUstream stream, CUstreamCaptureStatus *status) {
    return cuStreamIsCapturing(stream, status);
}

/* ---- mock-only hooks ------------------------------------------------------ */

API CUresult vsliceMockRawAlloc(CUdeviceptr *dptr, size_t bytesize) { return alloc_current(bytesize, dptr); }
API unsigned long long vsliceMockDriverAllocCalls(void) { return atomic_load(&g_alloc_calls); }

/* ---- entry-point lookup --------------------------------------------------- */

CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, cuuint64_t flags);

struct proc_entry {
    const char *name;
    int min_version;  /* the CUDA version that introduced this variant */
    void *legacy;     /* the default and legacy-stream variant */
    void *per_thread; /* the _ptsz / _ptds variant, if any */
};

#define FN(f) ((void *)(f))
/* Variants of one name are listed newest first. */
static const struct proc_entry g_procs[] = {
    {"cuInit", 2000, FN(cuInit), NULL},
    {"cuDriverGetVersion", 2020, FN(cuDriverGetVersion), NULL},
    {"cuDeviceGetCount", 2000, FN(cuDeviceGetCount), NULL},
    {"cuDeviceGet", 2000, FN(cuDeviceGet), NULL},
    {"cuDeviceGetName", 2000, FN(cuDeviceGetName), NULL},
    {"cuDeviceGetUuid", 11040, FN(cuDeviceGetUuid_v2), NULL},
    {"cuDeviceGetUuid", 9020, FN(cuDeviceGetUuid), NULL},
    {"cuDeviceTotalMem", 3020, FN(cuDeviceTotalMem_v2), NULL},
    {"cuDeviceTotalMem", 2000, FN(cuDeviceTotalMem), NULL},
    {"cuDeviceGetAttribute", 2000, FN(cuDeviceGetAttribute), NULL},
    {"cuDevicePrimaryCtxRetain", 7000, FN(cuDevicePrimaryCtxRetain), NULL},
    {"cuDevicePrimaryCtxRelease", 11000, FN(cuDevicePrimaryCtxRelease_v2), NULL},
    {"cuCtxCreate", 3020, FN(cuCtxCreate_v2), NULL},
    {"cuCtxDestroy", 4000, FN(cuCtxDestroy_v2), NULL},
    {"cuCtxGetCurrent", 4000, FN(cuCtxGetCurrent), NULL},
    {"cuCtxSetCurrent", 4000, FN(cuCtxSetCurrent), NULL},
    {"cuCtxGetDevice", 2000, FN(cuCtxGetDevice), NULL},
    {"cuCtxSynchronize", 2000, FN(cuCtxSynchronize), NULL},
    {"cuStreamSynchronize", 2000, FN(cuStreamSynchronize), FN(cuStreamSynchronize_ptsz)},
    {"cuGetErrorString", 6000, FN(cuGetErrorString), NULL},
    {"cuMemAlloc", 3020, FN(cuMemAlloc_v2), NULL},
    {"cuMemAlloc", 2000, FN(cuMemAlloc), NULL},
    {"cuMemFree", 3020, FN(cuMemFree_v2), NULL},
    {"cuMemFree", 2000, FN(cuMemFree), NULL},
    {"cuMemAllocPitch", 3020, FN(cuMemAllocPitch_v2), NULL},
    {"cuMemAllocPitch", 2000, FN(cuMemAllocPitch), NULL},
    {"cuMemAllocManaged", 6000, FN(cuMemAllocManaged), NULL},
    {"cuMemGetInfo", 3020, FN(cuMemGetInfo_v2), NULL},
    {"cuMemGetInfo", 2000, FN(cuMemGetInfo), NULL},
    {"cuMemcpyHtoD", 3020, FN(cuMemcpyHtoD_v2), FN(cuMemcpyHtoD_v2_ptds)},
    {"cuMemGetAllocationGranularity", 10020, FN(cuMemGetAllocationGranularity), NULL},
    {"cuMemCreate", 10020, FN(cuMemCreate), NULL},
    {"cuMemRelease", 10020, FN(cuMemRelease), NULL},
    {"cuMemAddressReserve", 10020, FN(cuMemAddressReserve), NULL},
    {"cuMemAddressFree", 10020, FN(cuMemAddressFree), NULL},
    {"cuMemMap", 10020, FN(cuMemMap), NULL},
    {"cuMemUnmap", 10020, FN(cuMemUnmap), NULL},
    {"cuMemSetAccess", 10020, FN(cuMemSetAccess), NULL},
    {"cuDeviceGetDefaultMemPool", 11020, FN(cuDeviceGetDefaultMemPool), NULL},
    {"cuMemAllocAsync", 11020, FN(cuMemAllocAsync), FN(cuMemAllocAsync_ptsz)},
    {"cuMemAllocFromPoolAsync", 11020, FN(cuMemAllocFromPoolAsync), FN(cuMemAllocFromPoolAsync_ptsz)},
    {"cuMemFreeAsync", 11020, FN(cuMemFreeAsync), FN(cuMemFreeAsync_ptsz)},
    {"cuMemPoolTrimTo", 11020, FN(cuMemPoolTrimTo), NULL},
    {"cuMemPoolGetAttribute", 11020, FN(cuMemPoolGetAttribute), NULL},
    {"cuMemPoolSetAttribute", 11020, FN(cuMemPoolSetAttribute), NULL},
    {"cuArrayCreate", 3020, FN(cuArrayCreate_v2), NULL},
    {"cuArray3DCreate", 3020, FN(cuArray3DCreate_v2), NULL},
    {"cuArrayDestroy", 2000, FN(cuArrayDestroy), NULL},
    {"cuMipmappedArrayCreate", 5000, FN(cuMipmappedArrayCreate), NULL},
    {"cuMipmappedArrayDestroy", 5000, FN(cuMipmappedArrayDestroy), NULL},
    {"cuLaunchKernel", 4000, FN(cuLaunchKernel), FN(cuLaunchKernel_ptsz)},
    {"cuLaunchKernelEx", 11060, FN(cuLaunchKernelEx), FN(cuLaunchKernelEx_ptsz)},
    {"cuLaunchCooperativeKernel", 9000, FN(cuLaunchCooperativeKernel), FN(cuLaunchCooperativeKernel_ptsz)},
    {"cuGraphLaunch", 10000, FN(cuGraphLaunch), FN(cuGraphLaunch_ptsz)},
    {"cuGraphCreate", 10000, FN(cuGraphCreate), NULL},
    {"cuGraphAddMemAllocNode", 11040, FN(cuGraphAddMemAllocNode), NULL},
    {"cuGraphAddMemFreeNode", 11040, FN(cuGraphAddMemFreeNode), NULL},
    {"cuGraphInstantiateWithFlags", 11040, FN(cuGraphInstantiateWithFlags), NULL},
    {"cuDeviceGraphMemTrim", 11040, FN(cuDeviceGraphMemTrim), NULL},
    {"cuDeviceGetGraphMemAttribute", 11040, FN(cuDeviceGetGraphMemAttribute), NULL},
    {"cuEventCreate", 2000, FN(cuEventCreate), NULL},
    {"cuEventDestroy", 4000, FN(cuEventDestroy_v2), NULL},
    {"cuEventRecord", 2000, FN(cuEventRecord), FN(cuEventRecord_ptsz)},
    {"cuEventQuery", 2000, FN(cuEventQuery), NULL},
    {"cuEventSynchronize", 2000, FN(cuEventSynchronize), NULL},
    {"cuEventElapsedTime", 12080, FN(cuEventElapsedTime_v2), NULL},
    {"cuEventElapsedTime", 2000, FN(cuEventElapsedTime), NULL},
    {"cuStreamIsCapturing", 10000, FN(cuStreamIsCapturing), FN(cuStreamIsCapturing_ptsz)},
    {"cuGetProcAddress", 12050, NULL, NULL}, /* filled in below: _v2 */
    {"cuGetProcAddress", 11030, FN(cuGetProcAddress), NULL},
};

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
                             CUdriverProcAddressQueryResult *status);

static CUresult lookup(const char *symbol, void **pfn, int version, cuuint64_t flags,
                       CUdriverProcAddressQueryResult *status) {
    CUdriverProcAddressQueryResult st = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    if (symbol == NULL || pfn == NULL) return CUDA_ERROR_INVALID_VALUE;
    *pfn = NULL;
    for (size_t i = 0; i < sizeof g_procs / sizeof g_procs[0]; i++) {
        const struct proc_entry *e = &g_procs[i];
        if (strcmp(e->name, symbol) != 0) continue;
        if (version < e->min_version) {
            st = CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT;
            continue;
        }
        void *fn = e->legacy;
        if (strcmp(symbol, "cuGetProcAddress") == 0 && fn == NULL) fn = FN(cuGetProcAddress_v2);
        if ((flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) && e->per_thread != NULL)
            fn = e->per_thread;
        *pfn = fn;
        if (status != NULL) *status = CU_GET_PROC_ADDRESS_SUCCESS;
        return CUDA_SUCCESS;
    }
    if (status != NULL) *status = st;
    return CUDA_ERROR_NOT_FOUND;
}

API CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, cuuint64_t flags) {
    return lookup(symbol, pfn, version, flags, NULL);
}

API CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
                                 CUdriverProcAddressQueryResult *status) {
    return lookup(symbol, pfn, version, flags, status);
}
