/*
 * probe.c - a scriptable CUDA program for libvgpu's tests.
 *
 * Runs the commands given as arguments, one result line per command
 * ("<command> rc=<CUresult> key=value ..."), against whatever libcuda.so.1
 * the loader finds - the mock driver in the tests, with libvgpu preloaded.
 *
 * Built twice from this file: `probe` is linked with libcuda and calls the
 * driver directly; `probe_dl` is not linked with it and finds every function
 * at run time, with `--via=dlsym` through dlsym on a dlopen("libcuda.so.1")
 * handle, or with `--via=procaddr` the way the CUDA runtime does: dlsym only
 * cuGetProcAddress_v2, then ask it for everything else (version 12000).
 *
 * Commands: alloc SIZE | alloc1 SIZE | managed SIZE | pitch W H | pitch1 W H |
 * vmm SIZE [DEV] | vmmhost SIZE | async SIZE | pool SIZE | raw SIZE | free ID |
 * write ID | fill SIZE | meminfo | meminfo1 | nvml | nvml2 | nvmlat N | drivercalls |
 * launch KIND US COUNT | saturate KIND US SECONDS |
 * switch KIND US1 SECONDS1 US2 SECONDS2 | grow KIND US1 SECONDS1 US2 SECONDS2 |
 * mixed KIND US1 US2 N SECONDS | sync | device N |
 * procaddr NAME VERSION FLAGS | procaddr1 NAME VERSION FLAGS | ready | wait |
 * sleep MS | totalmem | asyncptsz SIZE | forkfree ID | exitrace THREADS SIZE |
 * exec COMMAND... | array W H | array3d W H D | mipmap W H LEVELS | poolkeep |
 * trim KEEP | graph SIZE | graphtrim | execbare PROGRAM ARGS... | timedalloc SIZE.  SIZE takes k/m/g suffixes; KIND is kernel, ex, coop or graph.
 *
 * mixed: a training step's pattern until SECONDS have passed, one US1 kernel
 * then N kernels of US2 (another function), over and over.
 *
 * forkfree: a forked child frees allocation ID (inherited from this process)
 * and exits; exitrace: THREADS threads allocate and free SIZE in a loop while
 * main returns (exit runs with them still allocating); exec: replaces this
 * process with a new probe running the rest of the arguments.  Arrays are
 * 8-bit, one channel (W x H x D bytes per level).  poolkeep sets the device's
 * default pool to keep what is freed into it (release threshold: all);
 * trim is cuMemPoolTrimTo on that pool.  graph builds a graph that allocates
 * SIZE on device 0 and frees it, instantiates and launches it (rc: the first
 * call that failed); graphtrim is cuDeviceGraphMemTrim(0).  execbare replaces
 * this process with PROGRAM (found on PATH) without LD_PRELOAD: an image that
 * does not load libvgpu.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../mockgpu/mockgpu.h"

#ifdef PROBE_LINKED
CUresult cuInit(unsigned int);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuCtxSynchronize(void);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemAlloc(CUdeviceptr_v1 *, unsigned int);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemFree(CUdeviceptr_v1);
CUresult cuMemAllocManaged(CUdeviceptr *, size_t, unsigned int);
CUresult cuMemAllocPitch_v2(CUdeviceptr *, size_t *, size_t, size_t, unsigned int);
CUresult cuMemAllocPitch(CUdeviceptr_v1 *, unsigned int *, unsigned int, unsigned int, unsigned int);
CUresult cuMemGetInfo_v2(size_t *, size_t *);
CUresult cuMemGetInfo(unsigned int *, unsigned int *);
CUresult cuMemCreate(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,
                     unsigned long long);
CUresult cuMemRelease(CUmemGenericAllocationHandle);
CUresult cuMemAddressReserve(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
CUresult cuMemAddressFree(CUdeviceptr, size_t);
CUresult cuMemMap(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
CUresult cuMemUnmap(CUdeviceptr, size_t);
CUresult cuMemSetAccess(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
CUresult cuMemAllocAsync(CUdeviceptr *, size_t, CUstream);
CUresult cuMemFreeAsync(CUdeviceptr, CUstream);
CUresult cuMemAllocAsync_ptsz(CUdeviceptr *, size_t, CUstream);
CUresult cuDeviceTotalMem_v2(size_t *, CUdevice);
CUresult cuArrayCreate_v2(CUarray *, const CUDA_ARRAY_DESCRIPTOR *);
CUresult cuArray3DCreate_v2(CUarray *, const CUDA_ARRAY3D_DESCRIPTOR *);
CUresult cuArrayDestroy(CUarray);
CUresult cuMipmappedArrayCreate(CUmipmappedArray *, const CUDA_ARRAY3D_DESCRIPTOR *, unsigned int);
CUresult cuMipmappedArrayDestroy(CUmipmappedArray);
CUresult cuMemPoolTrimTo(CUmemoryPool, size_t);
CUresult cuMemPoolSetAttribute(CUmemoryPool, CUmemPool_attribute, void *);
CUresult cuGraphCreate(CUgraph *, unsigned int);
CUresult cuGraphAddMemAllocNode(CUgraphNode *, CUgraph, const CUgraphNode *, size_t,
                                CUDA_MEM_ALLOC_NODE_PARAMS *);
CUresult cuGraphAddMemFreeNode(CUgraphNode *, CUgraph, const CUgraphNode *, size_t, CUdeviceptr);
CUresult cuGraphInstantiateWithFlags(CUgraphExec *, CUgraph, unsigned long long);
CUresult cuDeviceGraphMemTrim(CUdevice);
CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *, CUdevice);
CUresult cuMemAllocFromPoolAsync(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, CUstream, void **, void **);
CUresult cuLaunchKernelEx(const CUlaunchConfig *, CUfunction, void **, void **);
CUresult cuLaunchCooperativeKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                                   unsigned, unsigned, CUstream, void **);
CUresult cuGraphLaunch(CUgraphExec, CUstream);
CUresult cuGetProcAddress(const char *, void **, int, cuuint64_t);
CUresult cuGetProcAddress_v2(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);
nvmlReturn_t nvmlInit_v2(void);
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int, nvmlDevice_t *);
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t, nvmlMemory_t *);
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t, nvmlMemory_v2_t *);
#endif

#define API_LIST(X)                                                                                \
    X(cuInit, CUresult (*)(unsigned int), 2000)                                                    \
    X(cuDevicePrimaryCtxRetain, CUresult (*)(CUcontext *, CUdevice), 7000)                         \
    X(cuCtxSetCurrent, CUresult (*)(CUcontext), 4000)                                              \
    X(cuCtxSynchronize, CUresult (*)(void), 2000)                                                  \
    X(cuMemAlloc_v2, CUresult (*)(CUdeviceptr *, size_t), 12000)                                   \
    X(cuMemAlloc, CUresult (*)(CUdeviceptr_v1 *, unsigned int), 2000)                              \
    X(cuMemFree_v2, CUresult (*)(CUdeviceptr), 12000)                                              \
    X(cuMemFree, CUresult (*)(CUdeviceptr_v1), 2000)                                               \
    X(cuMemAllocManaged, CUresult (*)(CUdeviceptr *, size_t, unsigned int), 12000)                 \
    X(cuMemAllocPitch_v2, CUresult (*)(CUdeviceptr *, size_t *, size_t, size_t, unsigned int),     \
      12000)                                                                                       \
    X(cuMemAllocPitch,                                                                             \
      CUresult (*)(CUdeviceptr_v1 *, unsigned int *, unsigned int, unsigned int, unsigned int),    \
      2000)                                                                                        \
    X(cuMemGetInfo_v2, CUresult (*)(size_t *, size_t *), 12000)                                    \
    X(cuMemGetInfo, CUresult (*)(unsigned int *, unsigned int *), 2000)                            \
    X(cuMemCreate,                                                                                 \
      CUresult (*)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *,            \
                   unsigned long long),                                                            \
      12000)                                                                                       \
    X(cuMemRelease, CUresult (*)(CUmemGenericAllocationHandle), 12000)                             \
    X(cuMemAddressReserve,                                                                         \
      CUresult (*)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long), 12000)         \
    X(cuMemAddressFree, CUresult (*)(CUdeviceptr, size_t), 12000)                                  \
    X(cuMemMap,                                                                                    \
      CUresult (*)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long), \
      12000)                                                                                       \
    X(cuMemUnmap, CUresult (*)(CUdeviceptr, size_t), 12000)                                        \
    X(cuMemSetAccess, CUresult (*)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t), 12000)   \
    X(cuMemAllocAsync, CUresult (*)(CUdeviceptr *, size_t, CUstream), 12000)                       \
    X(cuMemFreeAsync, CUresult (*)(CUdeviceptr, CUstream), 12000)                                  \
    X(cuMemAllocAsync_ptsz, CUresult (*)(CUdeviceptr *, size_t, CUstream), 12000)                  \
    X(cuDeviceTotalMem_v2, CUresult (*)(size_t *, CUdevice), 12000)                                \
    X(cuArrayCreate_v2, CUresult (*)(CUarray *, const CUDA_ARRAY_DESCRIPTOR *), 12000)             \
    X(cuArray3DCreate_v2, CUresult (*)(CUarray *, const CUDA_ARRAY3D_DESCRIPTOR *), 12000)         \
    X(cuArrayDestroy, CUresult (*)(CUarray), 12000)                                                \
    X(cuMipmappedArrayCreate,                                                                      \
      CUresult (*)(CUmipmappedArray *, const CUDA_ARRAY3D_DESCRIPTOR *, unsigned int), 12000)     \
    X(cuMipmappedArrayDestroy, CUresult (*)(CUmipmappedArray), 12000)                              \
    X(cuMemPoolTrimTo, CUresult (*)(CUmemoryPool, size_t), 12000)                                  \
    X(cuMemPoolSetAttribute, CUresult (*)(CUmemoryPool, CUmemPool_attribute, void *), 12000)       \
    X(cuGraphCreate, CUresult (*)(CUgraph *, unsigned int), 12000)                                 \
    X(cuGraphAddMemAllocNode,                                                                      \
      CUresult (*)(CUgraphNode *, CUgraph, const CUgraphNode *, size_t,                            \
                   CUDA_MEM_ALLOC_NODE_PARAMS *),                                                  \
      12000)                                                                                       \
    X(cuGraphAddMemFreeNode,                                                                       \
      CUresult (*)(CUgraphNode *, CUgraph, const CUgraphNode *, size_t, CUdeviceptr), 12000)       \
    X(cuGraphInstantiateWithFlags, CUresult (*)(CUgraphExec *, CUgraph, unsigned long long), 12000) \
    X(cuDeviceGraphMemTrim, CUresult (*)(CUdevice), 12000)                                         \
    X(cuDeviceGetDefaultMemPool, CUresult (*)(CUmemoryPool *, CUdevice), 12000)                    \
    X(cuMemAllocFromPoolAsync, CUresult (*)(CUdeviceptr *, size_t, CUmemoryPool, CUstream), 12000) \
    X(cuLaunchKernel,                                                                              \
      CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,         \
                   unsigned, CUstream, void **, void **),                                          \
      12000)                                                                                       \
    X(cuLaunchKernelEx, CUresult (*)(const CUlaunchConfig *, CUfunction, void **, void **), 12000) \
    X(cuLaunchCooperativeKernel,                                                                   \
      CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,         \
                   unsigned, CUstream, void **),                                                   \
      12000)                                                                                       \
    X(cuGraphLaunch, CUresult (*)(CUgraphExec, CUstream), 12000)                                   \
    X(cuGetProcAddress, CUresult (*)(const char *, void **, int, cuuint64_t), 12000)               \
    X(cuGetProcAddress_v2,                                                                         \
      CUresult (*)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *),      \
      12050)

#define NVML_LIST(X)                                                                               \
    X(nvmlInit_v2, nvmlReturn_t (*)(void))                                                         \
    X(nvmlDeviceGetHandleByIndex_v2, nvmlReturn_t (*)(unsigned int, nvmlDevice_t *))               \
    X(nvmlDeviceGetMemoryInfo, nvmlReturn_t (*)(nvmlDevice_t, nvmlMemory_t *))                     \
    X(nvmlDeviceGetMemoryInfo_v2, nvmlReturn_t (*)(nvmlDevice_t, nvmlMemory_v2_t *))

#define FIELD(name, type, version) __typeof__(type) name;
#define NFIELD(name, type) __typeof__(type) name;
static struct {
    API_LIST(FIELD)
    NVML_LIST(NFIELD)
    CUresult (*raw_alloc)(CUdeviceptr *, size_t);
    unsigned long long (*driver_calls)(void);
} api;

enum kind { K_V2, K_V1, K_ASYNC, K_VMM, K_RAW, K_ARRAY, K_MIPMAP };
struct allocation {
    enum kind kind;
    CUdeviceptr ptr;
    size_t size;
    CUmemGenericAllocationHandle handle;
    int live;
};
static struct allocation allocs[100000];
static int nallocs;
static CUcontext ctx;

static void die(const char *what) {
    fprintf(stderr, "probe: %s\n", what);
    exit(2);
}

static size_t parse_size(const char *s) {
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    switch (*end) {
    case 'k': v <<= 10; break;
    case 'm': v <<= 20; break;
    case 'g': v <<= 30; break;
    default: break;
    }
    return (size_t)v;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void resolve(int argc, char **argv) {
#ifdef PROBE_LINKED
    (void)argc, (void)argv;
#define LINK(name, type, version) api.name = name;
#define NLINK(name, type) api.name = name;
    API_LIST(LINK)
    NVML_LIST(NLINK)
    api.raw_alloc = vsliceMockRawAlloc;
    api.driver_calls = vsliceMockDriverAllocCalls;
#else
    const char *via = "dlsym";
    cuuint64_t flags = 0;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--via=", 6) == 0) via = argv[i] + 6;
        if (strcmp(argv[i], "--ptds") == 0) flags = CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM;
    }
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    void *nvml = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (cuda == NULL || nvml == NULL) die(dlerror());
    if (strcmp(via, "dlsym") == 0) {
#define DLSYM(name, type, version) api.name = (type)dlsym(cuda, #name);
        API_LIST(DLSYM)
    } else if (strcmp(via, "procaddr") == 0) {
        api.cuGetProcAddress_v2 = (CUresult(*)(const char *, void **, int, cuuint64_t,
                                               CUdriverProcAddressQueryResult *))dlsym(cuda, "cuGetProcAddress_v2");
        if (api.cuGetProcAddress_v2 == NULL) die("no cuGetProcAddress_v2");
        /* ask by the base name, as the runtime does: the version picks _v2 */
#define PROC(name, type, version)                                                                  \
    {                                                                                              \
        char base[64];                                                                             \
        snprintf(base, sizeof base, "%s", #name);                                                  \
        char *suffix = strstr(base, "_v2");                                                        \
        if (suffix != NULL) *suffix = '\0';                                                        \
        void *fn = NULL;                                                                           \
        CUdriverProcAddressQueryResult st;                                                         \
        api.cuGetProcAddress_v2(base, &fn, version, flags, &st);                                   \
        api.name = (type)fn;                                                                       \
    }
        API_LIST(PROC)
    } else {
        die("unknown --via");
    }
#define NDLSYM(name, type) api.name = (type)dlsym(nvml, #name);
    NVML_LIST(NDLSYM)
    api.raw_alloc = (CUresult(*)(CUdeviceptr *, size_t))dlsym(cuda, "vsliceMockRawAlloc");
    api.driver_calls = (unsigned long long (*)(void))dlsym(cuda, "vsliceMockDriverAllocCalls");
#endif
}

static int record(enum kind kind, CUdeviceptr ptr, size_t size, CUmemGenericAllocationHandle h) {
    if (nallocs >= (int)(sizeof allocs / sizeof allocs[0])) die("too many allocations");
    allocs[nallocs] = (struct allocation){kind, ptr, size, h, 1};
    return nallocs++;
}

static void print_alloc(const char *cmd, CUresult r, enum kind kind, CUdeviceptr p, size_t size) {
    if (r == CUDA_SUCCESS)
        printf("%s rc=%d id=%d\n", cmd, r, record(kind, p, size, 0));
    else
        printf("%s rc=%d\n", cmd, r);
}

static const char *base_name(const char *path) {
    const char *s = strrchr(path, '/');
    return s != NULL ? s + 1 : path;
}

static struct vslice_mock_kernel kernel, kernel2;

static CUresult launch_of(const char *kind, struct vslice_mock_kernel *k) {
    CUfunction f = (CUfunction)(void *)k;
    if (strcmp(kind, "kernel") == 0) return api.cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL);
    if (strcmp(kind, "ex") == 0) {
        CUlaunchConfig cfg = {1, 1, 1, 1, 1, 1, 0, NULL, NULL, 0};
        return api.cuLaunchKernelEx(&cfg, f, NULL, NULL);
    }
    if (strcmp(kind, "coop") == 0)
        return api.cuLaunchCooperativeKernel(f, 1, 1, 1, 1, 1, 1, 0, NULL, NULL);
    if (strcmp(kind, "graph") == 0) return api.cuGraphLaunch((CUgraphExec)(void *)k, NULL);
    die("unknown launch kind");
    return CUDA_ERROR_INVALID_VALUE;
}

static CUresult launch(const char *kind) { return launch_of(kind, &kernel); }

/* Launches k as fast as the launch calls return until stop_ns; *longest_ns is
 * the longest single call (time spent blocked in a limiter or a full queue). */
static CUresult launch_until(const char *kind, struct vslice_mock_kernel *k, int64_t stop_ns,
                             long *n, int64_t *longest_ns) {
    CUresult r = CUDA_SUCCESS;
    int64_t t = now_ns();
    while (r == CUDA_SUCCESS && t < stop_ns) {
        r = launch_of(kind, k);
        int64_t after = now_ns();
        if (after - t > *longest_ns) *longest_ns = after - t;
        t = after;
        (*n)++;
    }
    return r;
}

static size_t race_size;

static void *race_allocs(void *arg) {
    (void)arg;
    if (api.cuCtxSetCurrent(ctx) != CUDA_SUCCESS) return NULL;
    for (;;) {
        CUdeviceptr p = 0;
        if (api.cuMemAlloc_v2(&p, race_size) == CUDA_SUCCESS) api.cuMemFree_v2(p);
    }
    return NULL;
}

static void use_device(int dev) {
    if (api.cuDevicePrimaryCtxRetain(&ctx, dev) != CUDA_SUCCESS) die("cuDevicePrimaryCtxRetain");
    if (api.cuCtxSetCurrent(ctx) != CUDA_SUCCESS) die("cuCtxSetCurrent");
}

/* SIGTERM ends the program through exit(), so the mock driver's exit handler
 * writes out its trace even when a test stops a program stuck in a launch. */
static void exit_on_term(int sig) {
    (void)sig;
    exit(3);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTERM, exit_on_term);
    resolve(argc, argv);
    if (api.cuInit == NULL || api.cuInit(0) != CUDA_SUCCESS) die("cuInit");
    use_device(0);
    kernel.magic = VSLICE_MOCK_KERNEL_MAGIC;
    for (int i = 1; i < argc; i++) {
        const char *c = argv[i];
        if (strncmp(c, "--", 2) == 0) continue;
#define ARG(n) (i + (n) < argc ? argv[i + (n)] : (die("missing argument"), ""))
        if (strcmp(c, "alloc") == 0) {
            CUdeviceptr p = 0;
            size_t size = parse_size(ARG(1));
            CUresult r_ = api.cuMemAlloc_v2(&p, size);
            print_alloc(c, r_, K_V2, p, size);
            i += 1;
        } else if (strcmp(c, "alloc1") == 0) {
            CUdeviceptr_v1 p = 0;
            size_t size = parse_size(ARG(1));
            CUresult r_ = api.cuMemAlloc(&p, (unsigned int)size);
            print_alloc(c, r_, K_V1, p, size);
            i += 1;
        } else if (strcmp(c, "managed") == 0) {
            CUdeviceptr p = 0;
            size_t size = parse_size(ARG(1));
            CUresult r_ = api.cuMemAllocManaged(&p, size, CU_MEM_ATTACH_GLOBAL);
            print_alloc(c, r_, K_V2, p, size);
            i += 1;
        } else if (strcmp(c, "raw") == 0) {
            CUdeviceptr p = 0;
            size_t size = parse_size(ARG(1));
            CUresult r_ = api.raw_alloc(&p, size);
            print_alloc(c, r_, K_RAW, p, size);
            i += 1;
        } else if (strcmp(c, "async") == 0) {
            CUdeviceptr p = 0;
            size_t size = parse_size(ARG(1));
            CUresult r_ = api.cuMemAllocAsync(&p, size, NULL);
            print_alloc(c, r_, K_ASYNC, p, size);
            i += 1;
        } else if (strcmp(c, "pool") == 0) {
            CUdeviceptr p = 0;
            CUmemoryPool pool = NULL;
            size_t size = parse_size(ARG(1));
            if (api.cuDeviceGetDefaultMemPool(&pool, 0) != CUDA_SUCCESS) die("no pool");
            CUresult r_ = api.cuMemAllocFromPoolAsync(&p, size, pool, NULL);
            print_alloc(c, r_, K_ASYNC, p, size);
            i += 1;
        } else if (strcmp(c, "pitch") == 0 || strcmp(c, "pitch1") == 0) {
            size_t w = parse_size(ARG(1)), h = parse_size(ARG(2));
            CUresult r;
            CUdeviceptr p = 0;
            size_t pitch = 0;
            if (c[5] == '1') {
                CUdeviceptr_v1 p1 = 0;
                unsigned int pitch1 = 0;
                r = api.cuMemAllocPitch(&p1, &pitch1, (unsigned)w, (unsigned)h, 4);
                p = p1;
                pitch = pitch1;
            } else {
                r = api.cuMemAllocPitch_v2(&p, &pitch, w, h, 4);
            }
            if (r == CUDA_SUCCESS)
                printf("%s rc=%d id=%d pitch=%zu\n", c, r,
                       record(c[5] == '1' ? K_V1 : K_V2, p, pitch * h, 0), pitch);
            else
                printf("%s rc=%d\n", c, r);
            i += 2;
        } else if (strcmp(c, "vmm") == 0 || strcmp(c, "vmmhost") == 0) {
            size_t size = parse_size(ARG(1));
            int dev = 0;
            if (c[3] == '\0' && i + 2 < argc && argv[i + 2][0] >= '0' && argv[i + 2][0] <= '9') {
                dev = atoi(argv[i + 2]);
                i++;
            }
            CUmemAllocationProp prop;
            memset(&prop, 0, sizeof prop);
            prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
            prop.location.type = c[3] == '\0' ? CU_MEM_LOCATION_TYPE_DEVICE : CU_MEM_LOCATION_TYPE_HOST;
            prop.location.id = dev;
            CUmemGenericAllocationHandle h = 0;
            CUresult r = api.cuMemCreate(&h, size, &prop, 0);
            CUdeviceptr va = 0;
            if (r == CUDA_SUCCESS) {
                CUmemAccessDesc access = {{CU_MEM_LOCATION_TYPE_DEVICE, dev}, 3};
                if (api.cuMemAddressReserve(&va, size, 0, 0, 0) != CUDA_SUCCESS ||
                    api.cuMemMap(va, size, 0, h, 0) != CUDA_SUCCESS ||
                    api.cuMemSetAccess(va, size, &access, 1) != CUDA_SUCCESS)
                    die("vmm map");
                printf("%s rc=%d id=%d\n", c, r, record(K_VMM, va, size, h));
            } else {
                printf("%s rc=%d\n", c, r);
            }
            i += 1;
        } else if (strcmp(c, "free") == 0) {
            int id = atoi(ARG(1));
            struct allocation *a = &allocs[id];
            CUresult r;
            switch (a->kind) {
            case K_V1: r = api.cuMemFree((CUdeviceptr_v1)a->ptr); break;
            case K_ASYNC: r = api.cuMemFreeAsync(a->ptr, NULL); break;
            case K_ARRAY: r = api.cuArrayDestroy((CUarray)(uintptr_t)a->ptr); break;
            case K_MIPMAP: r = api.cuMipmappedArrayDestroy((CUmipmappedArray)(uintptr_t)a->ptr); break;
            case K_VMM:
                api.cuMemUnmap(a->ptr, a->size);
                api.cuMemAddressFree(a->ptr, a->size);
                r = api.cuMemRelease(a->handle);
                break;
            default: r = api.cuMemFree_v2(a->ptr); break;
            }
            a->live = 0;
            printf("free rc=%d\n", r);
            i += 1;
        } else if (strcmp(c, "write") == 0) {
            struct allocation *a = &allocs[atoi(ARG(1))];
            memset((void *)(uintptr_t)a->ptr, 0xa5, a->size);
            unsigned char *last = (unsigned char *)(uintptr_t)(a->ptr + a->size - 1);
            printf("write ok=%d\n", *last == 0xa5);
            i += 1;
        } else if (strcmp(c, "fill") == 0) {
            size_t size = parse_size(ARG(1));
            int n = 0;
            for (;;) {
                CUdeviceptr p = 0;
                if (api.cuMemAlloc_v2(&p, size) != CUDA_SUCCESS) break;
                record(K_V2, p, size, 0);
                n++;
            }
            printf("fill count=%d\n", n);
            i += 1;
        } else if (strcmp(c, "meminfo") == 0) {
            size_t f = 0, t = 0;
            CUresult r = api.cuMemGetInfo_v2(&f, &t);
            printf("meminfo rc=%d free=%zu total=%zu\n", r, f, t);
        } else if (strcmp(c, "meminfo1") == 0) {
            unsigned int f = 0, t = 0;
            CUresult r = api.cuMemGetInfo(&f, &t);
            printf("meminfo1 rc=%d free=%u total=%u\n", r, f, t);
        } else if (strcmp(c, "nvml") == 0 || strcmp(c, "nvml2") == 0) {
            nvmlDevice_t dev;
            if (api.nvmlInit_v2() != NVML_SUCCESS ||
                api.nvmlDeviceGetHandleByIndex_v2(0, &dev) != NVML_SUCCESS)
                die("nvml");
            if (c[4] == '2') {
                nvmlMemory_v2_t m;
                memset(&m, 0, sizeof m);
                m.version = nvmlMemory_v2;
                nvmlReturn_t r = api.nvmlDeviceGetMemoryInfo_v2(dev, &m);
                printf("nvml2 rc=%d total=%llu used=%llu free=%llu\n", r, m.total, m.used, m.free);
            } else {
                nvmlMemory_t m;
                nvmlReturn_t r = api.nvmlDeviceGetMemoryInfo(dev, &m);
                printf("nvml rc=%d total=%llu used=%llu free=%llu\n", r, m.total, m.used, m.free);
            }
        } else if (strcmp(c, "nvmlat") == 0) {
            /* NVML device N (NVML's own index, blind to CUDA_VISIBLE_DEVICES) */
            nvmlDevice_t dev;
            if (api.nvmlInit_v2() != NVML_SUCCESS ||
                api.nvmlDeviceGetHandleByIndex_v2((unsigned int)atoi(ARG(1)), &dev) != NVML_SUCCESS)
                die("nvml");
            nvmlMemory_t m;
            nvmlReturn_t r = api.nvmlDeviceGetMemoryInfo(dev, &m);
            printf("nvmlat rc=%d index=%s total=%llu used=%llu\n", r, ARG(1), m.total, m.used);
            i += 1;
        } else if (strcmp(c, "drivercalls") == 0) {
            printf("drivercalls count=%llu\n", api.driver_calls());
        } else if (strcmp(c, "launch") == 0) {
            kernel.duration_ns = strtoull(ARG(2), NULL, 10) * 1000ULL;
            long count = atol(ARG(3));
            CUresult r = CUDA_SUCCESS;
            for (long n = 0; n < count && r == CUDA_SUCCESS; n++) r = launch(ARG(1));
            printf("launch rc=%d\n", r);
            i += 3;
        } else if (strcmp(c, "saturate") == 0) {
            kernel.duration_ns = strtoull(ARG(2), NULL, 10) * 1000ULL;
            int64_t start = now_ns();
            long n = 0;
            int64_t longest = 0;
            CUresult r = launch_until(ARG(1), &kernel, start + (int64_t)(atof(ARG(3)) * 1e9), &n,
                                      &longest);
            int64_t end = now_ns();
            api.cuCtxSynchronize();
            printf("saturate rc=%d launches=%ld start_ns=%lld stop_ns=%lld max_call_ns=%lld\n", r,
                   n, (long long)start, (long long)end, (long long)longest);
            i += 3;
        } else if (strcmp(c, "switch") == 0 || strcmp(c, "grow") == 0) {
            /* US1 kernels for SECONDS1, then a different kernel of US2 for
             * SECONDS2 (grow: the same kernel, made to run US2); no
             * synchronize at the end (the mock's trace already holds every
             * queued kernel), so a flood of queued work cannot hold the
             * program up */
            int grow = c[0] == 'g';
            kernel.duration_ns = strtoull(ARG(2), NULL, 10) * 1000ULL;
            kernel2.magic = VSLICE_MOCK_KERNEL_MAGIC;
            kernel2.duration_ns = strtoull(ARG(4), NULL, 10) * 1000ULL;
            int64_t start = now_ns();
            long n = 0;
            int64_t longest = 0, longest2 = 0;
            CUresult r = launch_until(ARG(1), &kernel, start + (int64_t)(atof(ARG(3)) * 1e9), &n,
                                      &longest);
            int64_t middle = now_ns();
            if (grow) kernel.duration_ns = kernel2.duration_ns;
            if (r == CUDA_SUCCESS)
                r = launch_until(ARG(1), grow ? &kernel : &kernel2,
                                 middle + (int64_t)(atof(ARG(5)) * 1e9), &n, &longest2);
            int64_t end = now_ns();
            printf("%s rc=%d launches=%ld start_ns=%lld switch_ns=%lld stop_ns=%lld "
                   "max_call_ns=%lld max_call2_ns=%lld\n",
                   c, r, n, (long long)start, (long long)middle, (long long)end, (long long)longest,
                   (long long)longest2);
            i += 5;
        } else if (strcmp(c, "mixed") == 0) {
            kernel.duration_ns = strtoull(ARG(2), NULL, 10) * 1000ULL;
            kernel2.magic = VSLICE_MOCK_KERNEL_MAGIC;
            kernel2.duration_ns = strtoull(ARG(3), NULL, 10) * 1000ULL;
            long shorts = atol(ARG(4));
            int64_t start = now_ns(), stop = start + (int64_t)(atof(ARG(5)) * 1e9);
            long n = 0;
            int64_t longest = 0;
            CUresult r = CUDA_SUCCESS;
            while (r == CUDA_SUCCESS && now_ns() < stop) {
                for (long k = 0; k <= shorts && r == CUDA_SUCCESS; k++) {
                    int64_t t = now_ns();
                    r = launch_of(ARG(1), k == 0 ? &kernel : &kernel2);
                    if (now_ns() - t > longest) longest = now_ns() - t;
                }
                n += 1 + shorts;
            }
            int64_t end = now_ns();
            api.cuCtxSynchronize();
            printf("mixed rc=%d launches=%ld start_ns=%lld stop_ns=%lld max_call_ns=%lld\n", r, n,
                   (long long)start, (long long)end, (long long)longest);
            i += 5;
        } else if (strcmp(c, "sync") == 0) {
            printf("sync rc=%d\n", api.cuCtxSynchronize());
        } else if (strcmp(c, "device") == 0) {
            use_device(atoi(ARG(1)));
            printf("device rc=0\n");
            i += 1;
        } else if (strcmp(c, "procaddr") == 0 || strcmp(c, "procaddr1") == 0) {
            void *fn = NULL;
            CUdriverProcAddressQueryResult st = (CUdriverProcAddressQueryResult)-1;
            int version = atoi(ARG(2));
            cuuint64_t flags = strtoull(ARG(3), NULL, 0);
            CUresult r = c[8] == '1' ? api.cuGetProcAddress(ARG(1), &fn, version, flags)
                                     : api.cuGetProcAddress_v2(ARG(1), &fn, version, flags, &st);
            Dl_info info;
            memset(&info, 0, sizeof info);
            if (fn != NULL) dladdr(fn, &info);
            printf("%s rc=%d status=%d symbol=%s library=%s\n", c, r, (int)st,
                   info.dli_sname != NULL ? info.dli_sname : "-",
                   info.dli_fname != NULL ? base_name(info.dli_fname) : "-");
            i += 3;
        } else if (strcmp(c, "array") == 0 || strcmp(c, "array3d") == 0 ||
                   strcmp(c, "mipmap") == 0) {
            CUDA_ARRAY3D_DESCRIPTOR d = {parse_size(ARG(1)), parse_size(ARG(2)), 0,
                                         CU_AD_FORMAT_UNSIGNED_INT8, 1, 0};
            CUresult r;
            enum kind kind = K_ARRAY;
            void *h = NULL;
            if (strcmp(c, "array") == 0) {
                CUDA_ARRAY_DESCRIPTOR d2 = {d.Width, d.Height, CU_AD_FORMAT_UNSIGNED_INT8, 1};
                r = api.cuArrayCreate_v2((CUarray *)&h, &d2);
            } else if (strcmp(c, "array3d") == 0) {
                d.Depth = parse_size(ARG(3));
                r = api.cuArray3DCreate_v2((CUarray *)&h, &d);
            } else {
                kind = K_MIPMAP;
                r = api.cuMipmappedArrayCreate((CUmipmappedArray *)&h, &d, (unsigned)atoi(ARG(3)));
            }
            print_alloc(c, r, kind, (CUdeviceptr)(uintptr_t)h, 0);
            i += c[5] == '\0' ? 2 : 3;
        } else if (strcmp(c, "poolkeep") == 0 || strcmp(c, "trim") == 0) {
            CUmemoryPool pool = NULL;
            if (api.cuDeviceGetDefaultMemPool(&pool, 0) != CUDA_SUCCESS) die("no pool");
            CUresult r;
            if (c[0] == 'p') {
                cuuint64_t all = ~0ULL;
                r = api.cuMemPoolSetAttribute(pool, CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &all);
            } else {
                r = api.cuMemPoolTrimTo(pool, parse_size(ARG(1)));
                i += 1;
            }
            printf("%s rc=%d\n", c, r);
        } else if (strcmp(c, "graph") == 0) {
            CUgraph graph = NULL;
            CUgraphNode alloc_node = NULL, free_node = NULL;
            CUgraphExec exec = NULL;
            CUDA_MEM_ALLOC_NODE_PARAMS params;
            memset(&params, 0, sizeof params);
            params.poolProps.allocType = CU_MEM_ALLOCATION_TYPE_PINNED;
            params.poolProps.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
            params.poolProps.location.id = 0;
            params.bytesize = parse_size(ARG(1));
            CUresult r = api.cuGraphCreate(&graph, 0);
            if (r == CUDA_SUCCESS) r = api.cuGraphAddMemAllocNode(&alloc_node, graph, NULL, 0, &params);
            if (r == CUDA_SUCCESS)
                r = api.cuGraphAddMemFreeNode(&free_node, graph, &alloc_node, 1, params.dptr);
            if (r == CUDA_SUCCESS) r = api.cuGraphInstantiateWithFlags(&exec, graph, 0);
            if (r == CUDA_SUCCESS) r = api.cuGraphLaunch(exec, NULL);
            if (r == CUDA_SUCCESS) r = api.cuCtxSynchronize();
            printf("graph rc=%d\n", r);
            i += 1;
        } else if (strcmp(c, "graphtrim") == 0) {
            printf("graphtrim rc=%d\n", api.cuDeviceGraphMemTrim(0));
        } else if (strcmp(c, "totalmem") == 0) {
            size_t total = 0;
            CUresult r = api.cuDeviceTotalMem_v2(&total, 0);
            printf("totalmem rc=%d total=%zu\n", r, total);
        } else if (strcmp(c, "asyncptsz") == 0) {
            CUdeviceptr p = 0;
            size_t size = parse_size(ARG(1));
            CUresult r_ = api.cuMemAllocAsync_ptsz(&p, size, NULL);
            print_alloc(c, r_, K_ASYNC, p, size);
            i += 1;
        } else if (strcmp(c, "forkfree") == 0) {
            struct allocation *a = &allocs[atoi(ARG(1))];
            pid_t child = fork();
            if (child == 0) _exit(api.cuMemFree_v2(a->ptr) == CUDA_SUCCESS ? 0 : 1);
            int status = 0;
            waitpid(child, &status, 0);
            printf("forkfree rc=%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
            i += 1;
        } else if (strcmp(c, "exitrace") == 0) {
            int threads = atoi(ARG(1));
            race_size = parse_size(ARG(2));
            for (int t = 0; t < threads; t++) {
                pthread_t th;
                if (pthread_create(&th, NULL, race_allocs, NULL) != 0) die("pthread_create");
            }
            usleep(2000);
            printf("exitrace rc=0\n");
            return 0; /* exit runs while the threads allocate and free */
        } else if (strcmp(c, "exec") == 0) {
            char self[4096];
            ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
            if (n <= 0) die("readlink");
            self[n] = '\0';
            argv[i] = self;
            execv(self, argv + i);
            die("execv");
        } else if (strcmp(c, "timedalloc") == 0) {
            /* how long the call took, in this process: a bound the test can check
             * without counting the load of the machine against process start-up */
            CUdeviceptr p = 0;
            size_t size = parse_size(ARG(1));
            int64_t t0 = now_ns();
            CUresult r_ = api.cuMemAlloc_v2(&p, size);
            long long us = (long long)((now_ns() - t0) / 1000);
            if (r_ == CUDA_SUCCESS) record(K_V2, p, size, 0);
            printf("timedalloc rc=%d us=%lld\n", r_, us);
            i += 1;
        } else if (strcmp(c, "execbare") == 0) {
            unsetenv("LD_PRELOAD");
            execvp(ARG(1), argv + i + 1);
            die("execvp");
        } else if (strcmp(c, "ready") == 0) {
            printf("ready pid=%d\n", (int)getpid());
        } else if (strcmp(c, "wait") == 0) {
            printf("waiting pid=%d\n", (int)getpid());
            char line[64];
            if (fgets(line, sizeof line, stdin) == NULL) line[0] = '\0';
        } else if (strcmp(c, "sleep") == 0) {
            usleep((useconds_t)atoi(ARG(1)) * 1000U);
            i += 1;
        } else {
            fprintf(stderr, "probe: unknown command %s\n", c);
            return 2;
        }
    }
    return 0;
}
