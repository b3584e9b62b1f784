/*
 * launch.c - kernel launches and the compute limiter.
 *
 * Every launch path - cuLaunchKernel, cuLaunchKernelEx, cooperative launches
 * and graph launches (HAMi#1445), each with its _ptsz twin - passes one gate.
 * With no compute cap the gate is a predictable branch plus a store of the
 * launch time into this process's slot (the node agent reads it to see which
 * containers are active).
 *
 * Under CUDA_DEVICE_SM_LIMIT=P the gate is a token bucket of device-busy
 * time, shared by the container's processes through the shared cache:
 *   - tokens refill at P% of wall-clock time, capped at BURST_NS so an idle
 *     period cannot be saved up for a flood;
 *   - every TICK_US one process observes, through NVML's per-process
 *     utilization, how much device time the container's kernels really took,
 *     and pays that from the bucket;
 *   - between observations each launch is charged the learned device time per
 *     launch (observed busy time / launches, decaying over ~0.5 s), so a burst
 *     of launches cannot queue far more work than the bucket holds before the
 *     next observation sees it;
 *   - a launch waits while the bucket minus charged-but-unobserved time is
 *     not positive.
 * Costs are device time, never grid sizes or SM counts, so the cap means the
 * same on every card (HAMi-core #274 derived its cost from the SM count).
 * GPU_CORE_UTILIZATION_POLICY: disable ignores the cap; default applies it
 * for 0 < P < 100; force applies it for 0 < P <= 100 (HAMi-core #350: the
 * default policy must engage by itself).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>

#include "hooks.h"

#define TICK_US 10000LL             /* observation period, microseconds */
#define BURST_NS 20000000LL         /* most busy time saved up, nanoseconds */
#define INITIAL_COST_NS 1000000LL   /* per-launch charge before anything is observed */
#define LEARN_WINDOW_NS 500000000.0 /* decay time of the per-launch cost estimate */
#define MAX_SAMPLES 256

int vgpu_sm_active;
static uint32_t g_percent[VGPU_MAX_DEVICES]; /* 0 = not limited */

typedef nvmlReturn_t (*nvml_init_fn)(void);
typedef nvmlReturn_t (*nvml_handle_fn)(unsigned int, nvmlDevice_t *);
typedef nvmlReturn_t (*nvml_uuid_handle_fn)(const char *, nvmlDevice_t *);
typedef nvmlReturn_t (*nvml_putil_fn)(nvmlDevice_t, nvmlProcessUtilizationSample_t *,
                                      unsigned int *, unsigned long long);
static nvml_putil_fn g_process_utilization;
static nvmlDevice_t g_nvml_devices[VGPU_MAX_DEVICES];

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

void vgpu_limiter_setup(void) {
    uint32_t policy = vgpu_cache->header.sm_policy;
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) {
        uint32_t p = vgpu_cache->devices[d].sm_limit_percent;
        int on = policy != VGPU_POLICY_DISABLE && p > 0 &&
                 (p < 100 || policy == VGPU_POLICY_FORCE);
        g_percent[d] = on ? p : 0;
        vgpu_sm_active |= on;
    }
    if (!vgpu_sm_active) return;
    nvml_init_fn init = (nvml_init_fn)vgpu_resolve_nvml("nvmlInit_v2");
    nvml_handle_fn handle = (nvml_handle_fn)vgpu_resolve_nvml("nvmlDeviceGetHandleByIndex_v2");
    nvml_uuid_handle_fn by_uuid =
        (nvml_uuid_handle_fn)vgpu_resolve_nvml("nvmlDeviceGetHandleByUUID");
    g_process_utilization = (nvml_putil_fn)vgpu_resolve_nvml("nvmlDeviceGetProcessUtilization");
    if (init == NULL || handle == NULL || g_process_utilization == NULL || init() != NVML_SUCCESS) {
        vgpu_log(VGPU_LOG_ERROR, "compute limit needs NVML's process utilization, which is "
                 "unavailable: launches are paced by estimated cost only");
        g_process_utilization = NULL;
        return;
    }
    /* NVML ignores CUDA_VISIBLE_DEVICES: when it lists UUIDs, CUDA device d is
     * the NVML device of its d-th UUID, not NVML's d-th device */
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) {
        if (g_percent[d] == 0) continue;
        nvmlReturn_t r = d < vgpu_cfg.visible_count && by_uuid != NULL
                             ? by_uuid(vgpu_cfg.visible_uuid[d], &g_nvml_devices[d])
                             : handle((unsigned int)d, &g_nvml_devices[d]);
        if (r != NVML_SUCCESS) g_nvml_devices[d] = NULL;
    }
    for (int d = 0; d < VGPU_MAX_DEVICES; d++)
        if (g_percent[d] != 0)
            VGPU_LOG(VGPU_LOG_INFO, "device %d: compute limited to %u%%", d, g_percent[d]);
}

/* Busy time (ns) of the container's processes on device d in (since_us, now_us]. */
static int64_t observe(int d, int64_t since_us, int64_t now_us) {
    if (g_process_utilization == NULL || g_nvml_devices[d] == NULL) return 0;
    nvmlProcessUtilizationSample_t samples[MAX_SAMPLES];
    unsigned int count = MAX_SAMPLES;
    if (g_process_utilization(g_nvml_devices[d], samples, &count, (unsigned long long)since_us) !=
        NVML_SUCCESS)
        return 0;
    int32_t pids[VGPU_MAX_SLOTS];
    int npids = vgpu_container_pids(pids, VGPU_MAX_SLOTS);
    int64_t busy = 0;
    for (int p = 0; p < npids; p++) {
        /* NVML may return several samples per process; their mean is the
         * process's share of the window */
        unsigned long long sum = 0;
        unsigned int n = 0;
        for (unsigned int i = 0; i < count; i++) {
            if ((int32_t)samples[i].pid != pids[p]) continue;
            sum += samples[i].smUtil;
            n++;
        }
        if (n > 0) busy += (int64_t)(sum * (unsigned long long)(now_us - since_us) * 10ULL / n);
    }
    return busy;
}

static void tick(int d, struct vgpu_cache_device *dev, int64_t last_us, int64_t now_us) {
    int64_t percent = g_percent[d];
    if (last_us == 0) {
        STORE(&dev->sm_credit_ns, percent * TICK_US * 10);
        STORE(&dev->sm_cost_ns, INITIAL_COST_NS);
        return;
    }
    int64_t dt_ns = (now_us - last_us) * 1000;
    int64_t observed = observe(d, last_us, now_us);
    int64_t charged = __atomic_exchange_n(&dev->sm_charge_ns, 0, __ATOMIC_ACQ_REL);
    uint64_t launches = LOAD(&dev->sm_launches);
    uint64_t new_launches = launches - dev->sm_launches_tick;
    dev->sm_launches_tick = launches;

    int64_t refill = dt_ns > BURST_NS * 100 ? BURST_NS * 100 : dt_ns;
    int64_t credit = LOAD(&dev->sm_credit_ns) + refill * percent / 100 - observed;
    STORE(&dev->sm_credit_ns, credit > BURST_NS ? BURST_NS : credit);

    int64_t cost = LOAD(&dev->sm_cost_ns);
    int64_t pending = LOAD(&dev->sm_pending_ns) + charged - observed;
    if (charged == 0 && observed == 0) pending = 0; /* nothing queued, nothing ran */
    if (pending < 0) pending = 0;
    if (pending > BURST_NS + cost) pending = BURST_NS + cost;
    STORE(&dev->sm_pending_ns, pending);

    double decay = (double)dt_ns >= LEARN_WINDOW_NS ? 0.0 : 1.0 - (double)dt_ns / LEARN_WINDOW_NS;
    dev->sm_observed_acc = dev->sm_observed_acc * decay + (double)observed;
    dev->sm_launch_acc = dev->sm_launch_acc * decay + (double)new_launches;
    if (dev->sm_launch_acc >= 1.0 && dev->sm_observed_acc > 0.0)
        STORE(&dev->sm_cost_ns, (int64_t)(dev->sm_observed_acc / dev->sm_launch_acc));
    __atomic_fetch_add(&dev->sm_observed_ns, observed, __ATOMIC_RELAXED);
}

static void sleep_us(int64_t us) {
    struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

void vgpu_limiter_gate(void) {
    CUdevice d;
    if (vgpu_real_cuCtxGetDevice == NULL || vgpu_real_cuCtxGetDevice(&d) != CUDA_SUCCESS ||
        d < 0 || d >= VGPU_MAX_DEVICES || g_percent[d] == 0)
        return;
    struct vgpu_cache_device *dev = &vgpu_cache->devices[d];
    for (;;) {
        int64_t now_us = vgpu_now_ns() / 1000;
        int64_t last_us = LOAD(&dev->sm_tick_us);
        if (now_us - last_us >= TICK_US &&
            __atomic_compare_exchange_n(&dev->sm_tick_us, &last_us, now_us, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            tick(d, dev, last_us, now_us);
            last_us = now_us;
        }
        int64_t available =
            LOAD(&dev->sm_credit_ns) - LOAD(&dev->sm_pending_ns) - LOAD(&dev->sm_charge_ns);
        if (available > 0) {
            __atomic_fetch_add(&dev->sm_charge_ns, LOAD(&dev->sm_cost_ns), __ATOMIC_ACQ_REL);
            __atomic_fetch_add(&dev->sm_launches, 1, __ATOMIC_ACQ_REL);
            return;
        }
        int64_t wait_us = last_us + TICK_US - now_us;
        sleep_us(wait_us < 100 ? 100 : wait_us > TICK_US ? TICK_US : wait_us);
    }
}

/* ---- the launch paths ------------------------------------------------------------- */

static inline void before_launch(void) {
    vgpu_init();
    if (UNLIKELY(vgpu_sm_active)) vgpu_limiter_gate();
    struct vgpu_cache_slot *s = vgpu_slot();
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    __atomic_store_n(&s->last_kernel_ns, (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec,
                     __ATOMIC_RELAXED);
    /* approximate under thread races: an atomic add would cost the hot path */
    __atomic_store_n(&s->launches, __atomic_load_n(&s->launches, __ATOMIC_RELAXED) + 1,
                     __ATOMIC_RELAXED);
}

#define NO_DRIVER(fn)                                                                              \
    if (UNLIKELY(vgpu_real_##fn == NULL)) return CUDA_ERROR_NOT_FOUND

VGPU_API CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                 unsigned int bx, unsigned int by, unsigned int bz,
                                 unsigned int shmem, CUstream stream, void **params, void **extra) {
    before_launch();
    NO_DRIVER(cuLaunchKernel);
    return vgpu_real_cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra);
}

VGPU_API CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy,
                                      unsigned int gz, unsigned int bx, unsigned int by,
                                      unsigned int bz, unsigned int shmem, CUstream stream,
                                      void **params, void **extra) {
    before_launch();
    NO_DRIVER(cuLaunchKernel_ptsz);
    return vgpu_real_cuLaunchKernel_ptsz(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra);
}

VGPU_API CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params,
                                   void **extra) {
    before_launch();
    NO_DRIVER(cuLaunchKernelEx);
    return vgpu_real_cuLaunchKernelEx(config, f, params, extra);
}

VGPU_API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **params,
                                        void **extra) {
    before_launch();
    NO_DRIVER(cuLaunchKernelEx_ptsz);
    return vgpu_real_cuLaunchKernelEx_ptsz(config, f, params, extra);
}

VGPU_API CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gx, unsigned int gy,
                                            unsigned int gz, unsigned int bx, unsigned int by,
                                            unsigned int bz, unsigned int shmem, CUstream stream,
                                            void **params) {
    before_launch();
    NO_DRIVER(cuLaunchCooperativeKernel);
    return vgpu_real_cuLaunchCooperativeKernel(f, gx, gy, gz, bx, by, bz, shmem, stream, params);
}

VGPU_API CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy,
                                                 unsigned int gz, unsigned int bx, unsigned int by,
                                                 unsigned int bz, unsigned int shmem,
                                                 CUstream stream, void **params) {
    before_launch();
    NO_DRIVER(cuLaunchCooperativeKernel_ptsz);
    return vgpu_real_cuLaunchCooperativeKernel_ptsz(f, gx, gy, gz, bx, by, bz, shmem, stream,
                                                    params);
}

VGPU_API CUresult cuGraphLaunch(CUgraphExec graph, CUstream stream) {
    before_launch();
    NO_DRIVER(cuGraphLaunch);
    CUresult r = vgpu_real_cuGraphLaunch(graph, stream);
    vgpu_graph_launched(); /* its memory nodes may have grown the graph memory pool */
    return r;
}

VGPU_API CUresult cuGraphLaunch_ptsz(CUgraphExec graph, CUstream stream) {
    before_launch();
    NO_DRIVER(cuGraphLaunch_ptsz);
    CUresult r = vgpu_real_cuGraphLaunch_ptsz(graph, stream);
    vgpu_graph_launched(); /* its memory nodes may have grown the graph memory pool */
    return r;
}
