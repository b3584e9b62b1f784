/* vgpu.h - libvgpu's internal interfaces (nothing here is exported). */
#ifndef VSLICE_VGPU_H
#define VSLICE_VGPU_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include "cudadefs.h"
#include "sharedcache.h"

#define VGPU_API __attribute__((visibility("default")))
#define VGPU_HIDDEN __attribute__((visibility("hidden")))
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* ---- configuration, read once from the environment ---------------------- */

enum { VGPU_LOG_ERROR = 0, VGPU_LOG_WARN = 1, VGPU_LOG_INFO = 2, VGPU_LOG_DEBUG = 3 };

struct vgpu_config {
    int log_level;                              /* LIBCUDA_LOG_LEVEL */
    uint64_t limit_bytes[VGPU_MAX_DEVICES];     /* CUDA_DEVICE_MEMORY_LIMIT[_<i>]; 0 = none */
    uint32_t sm_limit_percent[VGPU_MAX_DEVICES];/* CUDA_DEVICE_SM_LIMIT[_<i>]; 0 = none */
    uint32_t sm_policy;                         /* GPU_CORE_UTILIZATION_POLICY */
    char cache_path[4096];                      /* CUDA_DEVICE_MEMORY_SHARED_CACHE */
    /* CUDA_VISIBLE_DEVICES when it lists UUIDs: visible_uuid[i] is CUDA device i
     * (NVML ignores the variable, so its devices are matched by UUID); 0 = not set. */
    int visible_count;
    char visible_uuid[VGPU_MAX_DEVICES][96];
};

VGPU_HIDDEN extern struct vgpu_config vgpu_cfg;
VGPU_HIDDEN void vgpu_config_load(struct vgpu_config *cfg);
/* The CUDA device of the GPU whose NVML UUID is uuid: its place in
 * CUDA_VISIBLE_DEVICES when that lists UUIDs (-1 when not there), else nvml_index. */
VGPU_HIDDEN int vgpu_cuda_device_of(const char *uuid, int nvml_index);
/* Parses HAMi's size format: bytes, or a k/m/g suffix (x1024^n).  Returns 0
 * and sets *bytes on success, -1 on a malformed value. */
VGPU_HIDDEN int vgpu_parse_size(const char *text, uint64_t *bytes);
VGPU_HIDDEN void vgpu_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define VGPU_LOG(level, ...)                                                                     \
    do {                                                                                         \
        if (UNLIKELY((level) <= vgpu_cfg.log_level)) vgpu_log((level), __VA_ARGS__);            \
    } while (0)

/* ---- initialization --------------------------------------------------------- */

VGPU_HIDDEN extern atomic_int vgpu_ready;
VGPU_HIDDEN void vgpu_init_slow(void);
static inline void vgpu_init(void) {
    if (UNLIKELY(!atomic_load_explicit(&vgpu_ready, memory_order_acquire))) vgpu_init_slow();
}

/* ---- the real driver --------------------------------------------------------- */

typedef CUresult (*cuCtxGetDevice_fn)(CUdevice *);
VGPU_HIDDEN extern cuCtxGetDevice_fn vgpu_real_cuCtxGetDevice;
/* Resolves libcuda's and libnvidia-ml's real entry points; called from init. */
VGPU_HIDDEN void vgpu_resolve_driver(void);
VGPU_HIDDEN void *vgpu_resolve_nvml(const char *name);
VGPU_HIDDEN void *vgpu_driver_symbol(const char *name);
/* The wrapper libvgpu exports for a driver or NVML symbol name, or NULL. */
VGPU_HIDDEN void *vgpu_wrapper_by_name(const char *name);
/* The wrapper for a real driver entry point, or NULL if libvgpu has none. */
VGPU_HIDDEN void *vgpu_wrapper_by_real(void *real);

/* ---- shared cache ---------------------------------------------------------- */

VGPU_HIDDEN extern struct vgpu_cache *vgpu_cache;
VGPU_HIDDEN void vgpu_cache_attach(void);
VGPU_HIDDEN struct vgpu_cache_slot *vgpu_slot(void);
/* Who a charge belongs to: the claim of a slot (its index and generation),
 * so that only the claim that charged it gives it back - never a forked
 * child, an exec'd image or a free after the exit destructor. */
#define VGPU_OWNER(index, generation) ((((uint64_t)(index) + 1) << 32) | (uint32_t)(generation))
#define VGPU_OWNER_NONE 1ULL   /* nothing was charged (no device, zero bytes) */
#define VGPU_OWNER_ORPHAN 2ULL /* charged without a ledger: every slot was taken */
/* Charges bytes to device dev (check-and-add, atomic across processes).
 * Returns the charge's owner (non-zero) if the slice had room, 0 if the
 * charge would pass the cap (dead processes' charges are reclaimed first). */
VGPU_HIDDEN uint64_t vgpu_charge(int dev, uint64_t bytes);
/* Charges bytes the driver has already taken (a pool's reserve grew), past
 * the cap if need be.  Returns the owner, 0 if the accounting is closed. */
VGPU_HIDDEN uint64_t vgpu_charge_taken(int dev, uint64_t bytes);
/* This process's current claim (VGPU_OWNER), claiming a slot if needed. */
VGPU_HIDDEN uint64_t vgpu_owner(void);
/* Gives back bytes charged on dev by owner; nothing if owner is not this
 * process's current claim or its accounting is closed (exit). */
VGPU_HIDDEN void vgpu_credit(int dev, uint64_t bytes, uint64_t owner);
/* Gives back the charges of dead processes (cheap: one kill(pid, 0) per
 * live slot; /proc is read at most once a second). */
VGPU_HIDDEN void vgpu_reclaim_dead(void);
/* Bytes charged on dev by all processes of the container. */
VGPU_HIDDEN uint64_t vgpu_used(int dev);
VGPU_HIDDEN uint64_t vgpu_limit(int dev);
/* Live pids of the container (slots in use); returns how many. */
VGPU_HIDDEN int vgpu_container_pids(int32_t *pids, int max);

/* Settles the charge of each device's graph memory pool with its reserve;
 * called after a graph launch (which may grow it). */
VGPU_HIDDEN void vgpu_graph_launched(void);

/* ---- compute limiter ------------------------------------------------------- */

VGPU_HIDDEN extern int vgpu_sm_active; /* any device under a compute cap */
VGPU_HIDDEN void vgpu_limiter_setup(void);

VGPU_HIDDEN int64_t vgpu_now_ns(void);

#endif
