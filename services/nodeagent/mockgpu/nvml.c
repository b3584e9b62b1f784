/*
 * nvml.c - the mock NVML, built as libnvidia-ml.so.1.
 *
 * Reads the mock GPU's shared state (mockstate.h), so that memory used and
 * utilization cover every process on the mock card, as the real NVML does.
 * Device utilization is measured over the last second (the real one uses a
 * sample period between 1/6 s and 1 s); process utilization returns one
 * sample per process covering the time since lastSeenTimeStamp.  XID errors
 * are injected with the mock-only vsliceMockInjectXid (into the shared state,
 * so any process may inject) and delivered by event sets registered for
 * nvmlEventTypeXidCriticalError, like the real NVML delivers them.
 *
 * MIG ("Multi Instance GPU Management" in the NVML reference): GPU instances
 * and their compute instances are kept in the shared state (mockstate.h), so
 * that what one process creates every other sees.  A GPU instance gets one
 * compute instance covering it, and the pair is a MIG device: a handle NVML's
 * device calls (UUID, name, memory, processes) accept, which CUDA opens by its
 * MIG UUID.  Handles of instances are this process's and carry the serial of
 * what they name, so one kept past a destroy names nothing, even after another
 * instance took the same slot.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../libvgpu/cudadefs.h"
#include "mockstate.h"

#define API __attribute__((visibility("default")))
#define NVML_DEV_MAGIC 0x6c6d766eU
#define UTIL_WINDOW_NS 1000000000LL
#define MAX_HISTORY_NS 10000000000LL
#define NVML_GI_MAGIC 0x69676d6eU
#define NVML_CI_MAGIC 0x69636d6eU
#define NO_INSTANCE 0xffffffffU

/* Every handle: a GPU (index < device_count, serial 0), or a state slot and
 * the serial of the instance in it when the handle was made. */
struct ref {
    uint32_t magic;
    unsigned int index;
    uint64_t serial;
};
struct nvmlDevice_st {
    struct ref r;
};
struct nvmlGpuInstance_st {
    struct ref r;
};
struct nvmlComputeInstance_st {
    struct ref r;
};

static struct nvmlDevice_st g_handles[MOCK_MAX_GPUS];
static atomic_int g_init_count;

static struct mock_state *ready(void) {
    return atomic_load(&g_init_count) > 0 ? mock_state_get() : NULL;
}

/* A GPU's handle (not a MIG device's). */
static struct mock_device *device_of(nvmlDevice_t h) {
    struct mock_state *st = ready();
    if (st == NULL || h == NULL || h->r.magic != NVML_DEV_MAGIC || h->r.index >= st->device_count)
        return NULL;
    return &st->devices[h->r.index];
}

/* A MIG device's handle, while its compute instance exists. */
static struct mock_device *mig_of(nvmlDevice_t h) {
    struct mock_state *st = ready();
    if (st == NULL || h == NULL || h->r.magic != NVML_DEV_MAGIC || h->r.index < st->device_count ||
        h->r.index >= MOCK_MAX_DEVICES)
        return NULL;
    struct mock_device *d = &st->devices[h->r.index];
    return atomic_load(&d->ci_serial) == h->r.serial ? d : NULL;
}

/* A GPU's or a MIG device's handle. */
static struct mock_device *any_of(nvmlDevice_t h) {
    struct mock_device *d = device_of(h);
    return d != NULL ? d : mig_of(h);
}

/* What a call that takes only a GPU answers for h: a MIG device is not
 * supported there, anything else is not a device. */
static nvmlReturn_t refuse(nvmlDevice_t h) {
    return mig_of(h) != NULL ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_INVALID_ARGUMENT;
}

/* A device's figures after dead processes gave their memory back. */
static struct mock_device *device_now(nvmlDevice_t h) {
    struct mock_device *d = any_of(h);
    if (d != NULL) mock_reclaim_dead(mock_state_get());
    return d;
}

/* Handles of instances: one per (kind, slot) is remembered and handed out
 * again while its serial is current; a stale one is left allocated (with its
 * old serial it names nothing), as a caller may still hold it. */
enum { REF_MIG, REF_GI, REF_CI, REF_KINDS };
static struct ref *g_refs[REF_KINDS][MOCK_MAX_DEVICES];
static pthread_mutex_t g_refs_lock = PTHREAD_MUTEX_INITIALIZER;

static struct ref *ref_for(int kind, unsigned int slot, uint64_t serial) {
    static const uint32_t magic[REF_KINDS] = {NVML_DEV_MAGIC, NVML_GI_MAGIC, NVML_CI_MAGIC};
    pthread_mutex_lock(&g_refs_lock);
    struct ref *r = g_refs[kind][slot];
    if (r == NULL || r->serial != serial) {
        r = malloc(sizeof *r);
        if (r != NULL) {
            *r = (struct ref){.magic = magic[kind], .index = slot, .serial = serial};
            g_refs[kind][slot] = r;
        }
    }
    pthread_mutex_unlock(&g_refs_lock);
    return r;
}

API nvmlReturn_t nvmlInit_v2(void) {
    struct mock_state *st = mock_state_get();
    if (st == NULL) return NVML_ERROR_UNKNOWN;
    for (unsigned int i = 0; i < MOCK_MAX_GPUS; i++)
        g_handles[i] = (struct nvmlDevice_st){{.magic = NVML_DEV_MAGIC, .index = i, .serial = 0}};
    atomic_fetch_add(&g_init_count, 1);
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlInit(void) { return nvmlInit_v2(); }
API nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    return nvmlInit_v2();
}

API nvmlReturn_t nvmlShutdown(void) {
    if (atomic_load(&g_init_count) <= 0) return NVML_ERROR_UNINITIALIZED;
    atomic_fetch_sub(&g_init_count, 1);
    return NVML_SUCCESS;
}

API const char *nvmlErrorString(nvmlReturn_t r) {
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IN_USE: return "In Use";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Insufficient Resources";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument Version Mismatch";
    default: return "Unknown Error";
    }
}

API nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (version == NULL || length == 0) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(version, length, "560.35.03-vslice-mock");
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    struct mock_state *st = ready();
    if (st == NULL) return NVML_ERROR_UNINITIALIZED;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *count = st->device_count;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    struct mock_state *st = ready();
    if (st == NULL) return NVML_ERROR_UNINITIALIZED;
    if (device == NULL || index >= st->device_count) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &g_handles[index];
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    struct mock_state *st = ready();
    if (st == NULL) return NVML_ERROR_UNINITIALIZED;
    if (uuid == NULL || device == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < st->device_count; i++) {
        if (strcmp(st->devices[i].uuid, uuid) == 0) {
            *device = &g_handles[i];
            return NVML_SUCCESS;
        }
    }
    if (strncmp(uuid, "MIG-", 4) != 0) return NVML_ERROR_NOT_FOUND;
    for (unsigned int i = st->device_count; i < MOCK_MAX_DEVICES; i++) {
        uint64_t serial = atomic_load(&st->devices[i].ci_serial);
        if (serial == 0 || strcmp(st->devices[i].uuid, uuid) != 0) continue;
        struct ref *r = ref_for(REF_MIG, i, serial);
        if (r == NULL) return NVML_ERROR_UNKNOWN;
        *device = (nvmlDevice_t)(void *)r;
        return NVML_SUCCESS;
    }
    return NVML_ERROR_NOT_FOUND;
}

API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    if (device_of(device) == NULL) return refuse(device);
    if (index == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *index = device->r.index;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    struct mock_device *d = any_of(device);
    if (d == NULL || uuid == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    char copy[sizeof d->uuid];
    snprintf(copy, sizeof copy, "%s", d->uuid);
    if (any_of(device) == NULL) return NVML_ERROR_INVALID_ARGUMENT; /* destroyed meanwhile */
    if (strlen(copy) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(uuid, length, "%s", copy);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    if (any_of(device) == NULL || name == NULL || length == 0) return NVML_ERROR_INVALID_ARGUMENT;
    mock_device_name(mock_state_get(), device->r.index, name, length);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    struct mock_device *d = device_now(device);
    if (d == NULL || memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    uint64_t used = atomic_load(&d->used_bytes);
    memory->total = d->total_bytes;
    memory->used = used;
    memory->free = used < d->total_bytes ? d->total_bytes - used : 0;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    struct mock_device *d = device_now(device);
    if (d == NULL || memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    uint64_t used = atomic_load(&d->used_bytes);
    memory->total = d->total_bytes;
    memory->reserved = 0;
    memory->used = used;
    memory->free = used < d->total_bytes ? d->total_bytes - used : 0;
    return NVML_SUCCESS;
}

static unsigned int percent(int64_t part, int64_t whole) {
    if (whole <= 0) return 0;
    int64_t p = (part * 100 + whole / 2) / whole;
    return p > 100 ? 100U : (unsigned int)p;
}

API nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *util) {
    struct mock_device *d = device_of(device);
    if (d == NULL) return refuse(device);
    if (util == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    int64_t now = mock_now_ns();
    util->gpu = percent(mock_busy_ns(d, 0, now - UTIL_WINDOW_NS, now), UTIL_WINDOW_NS);
    util->memory = 0;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device,
                                                 nvmlProcessUtilizationSample_t *samples,
                                                 unsigned int *count,
                                                 unsigned long long last_seen_us) {
    struct mock_device *d = device_of(device);
    if (d == NULL) return refuse(device);
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    int64_t now = mock_now_ns();
    int64_t lo = last_seen_us == 0 ? now - UTIL_WINDOW_NS : (int64_t)last_seen_us * 1000;
    if (lo < now - MAX_HISTORY_NS) lo = now - MAX_HISTORY_NS;
    if (lo >= now) lo = now - 1;
    int32_t pids[MOCK_MAX_PROCS];
    int n = mock_busy_pids(d, lo, now, pids, MOCK_MAX_PROCS);
    if (n == 0) {
        *count = 0;
        return NVML_ERROR_NOT_FOUND;
    }
    if (samples == NULL || *count < (unsigned int)n) {
        *count = (unsigned int)n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (int i = 0; i < n; i++) {
        samples[i] = (nvmlProcessUtilizationSample_t){
            .pid = (unsigned int)pids[i],
            .timeStamp = (unsigned long long)(now / 1000),
            .smUtil = percent(mock_busy_ns(d, pids[i], lo, now), now - lo),
        };
    }
    *count = (unsigned int)n;
    return NVML_SUCCESS;
}

/* The GPU instance on GPU `gpu` where process slot p holds memory (the first
 * by slot), or NO_INSTANCE. */
static unsigned int instance_of_proc(struct mock_state *st, const struct mock_proc *p,
                                     unsigned int gpu) {
    for (unsigned int s = st->device_count; s < MOCK_MAX_DEVICES; s++) {
        const struct mock_device *d = &st->devices[s];
        if (atomic_load(&d->gi_serial) != 0 && d->parent == gpu &&
            atomic_load(&p->used_bytes[s]) > 0)
            return d->gi_id;
    }
    return NO_INSTANCE;
}

/* On a GPU in MIG mode every process of its MIG devices, with the instance it
 * uses, as the real NVML aggregates them; on a MIG device its own. */
API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                         nvmlProcessInfo_t *infos) {
    struct mock_device *d = device_now(device);
    if (d == NULL || count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    struct mock_state *st = mock_state_get();
    unsigned int slot = device->r.index;
    int mig = slot >= st->device_count;
    unsigned int n = 0;
    unsigned int cap = infos == NULL ? 0 : *count;
    for (int i = 0; i < MOCK_MAX_PROCS; i++) {
        int32_t pid = atomic_load(&st->procs[i].pid);
        uint64_t used = atomic_load(&st->procs[i].used_bytes[slot]);
        if (pid <= 0 || used == 0) continue;
        unsigned int gi = mig ? d->gi_id : instance_of_proc(st, &st->procs[i], slot);
        if (n < cap)
            infos[n] = (nvmlProcessInfo_t){.pid = (unsigned int)pid, .usedGpuMemory = used,
                                           .gpuInstanceId = gi,
                                           .computeInstanceId = gi == NO_INSTANCE ? NO_INSTANCE : 0};
        n++;
    }
    *count = n;
    return n > cap ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
}

/* ---- PCI ------------------------------------------------------------------ */

API nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    if (device_of(device) == NULL) return refuse(device);
    if (pci == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    memset(pci, 0, sizeof *pci);
    pci->bus = 0x10 + device->r.index;
    pci->pciDeviceId = 0x20b010deU;
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

API nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor) {
    if (device_of(device) == NULL) return refuse(device);
    if (minor == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *minor = device->r.index;
    return NVML_SUCCESS;
}

/* ---- XID events ----------------------------------------------------------- */

struct nvmlEventSet_st {
    uint64_t types[MOCK_MAX_GPUS];  /* registered event types per device */
    uint64_t cursor[MOCK_MAX_GPUS]; /* XIDs of each device already delivered */
};

API nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    if (device_of(device) == NULL) return refuse(device);
    if (types == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *types = nvmlEventTypeXidCriticalError;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlEventSetCreate(nvmlEventSet_t *set) {
    if (ready() == NULL) return NVML_ERROR_UNINITIALIZED;
    if (set == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *set = calloc(1, sizeof **set);
    return *set == NULL ? NVML_ERROR_UNKNOWN : NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types,
                                          nvmlEventSet_t set) {
    if (device_of(device) == NULL) return refuse(device);
    if (set == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (types & ~nvmlEventTypeXidCriticalError) return NVML_ERROR_NOT_SUPPORTED;
    struct mock_state *st = mock_state_get();
    unsigned int i = device->r.index;
    /* only XIDs that happen after the registration are delivered */
    if (set->types[i] == 0) set->cursor[i] = atomic_load(&st->xids[i].count);
    set->types[i] |= types;
    return NVML_SUCCESS;
}

static int next_xid(struct mock_state *st, nvmlEventSet_t set, nvmlEventData_t *data) {
    for (uint32_t d = 0; d < st->device_count; d++) {
        if (!(set->types[d] & nvmlEventTypeXidCriticalError)) continue;
        uint64_t count = atomic_load(&st->xids[d].count);
        if (count - set->cursor[d] > MOCK_XIDS) set->cursor[d] = count - MOCK_XIDS; /* overrun */
        if (set->cursor[d] >= count) continue;
        data->device = &g_handles[d];
        data->eventType = nvmlEventTypeXidCriticalError;
        data->eventData = st->xids[d].xid[set->cursor[d] % MOCK_XIDS];
        data->gpuInstanceId = 0xffffffffU;
        data->computeInstanceId = 0xffffffffU;
        set->cursor[d]++;
        return 1;
    }
    return 0;
}

API nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    struct mock_state *st = ready();
    if (st == NULL) return NVML_ERROR_UNINITIALIZED;
    if (set == NULL || data == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    int64_t deadline = mock_now_ns() + (int64_t)timeout_ms * 1000000LL;
    for (;;) {
        if (next_xid(st, set, data)) return NVML_SUCCESS;
        if (mock_now_ns() >= deadline) return NVML_ERROR_TIMEOUT;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 10000000L};
        nanosleep(&ts, NULL);
    }
}
API nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    return nvmlEventSetWait_v2(set, data, timeout_ms);
}

API nvmlReturn_t nvmlEventSetFree(nvmlEventSet_t set) {
    if (set == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    free(set);
    return NVML_SUCCESS;
}

/* Mock-only: record XID `xid` on device `index` (NVML's index), for every
 * event set registered for it. */
API nvmlReturn_t vsliceMockInjectXid(unsigned int index, unsigned long long xid) {
    struct mock_state *st = mock_state_get();
    if (st == NULL) return NVML_ERROR_UNINITIALIZED;
    if (index >= st->device_count) return NVML_ERROR_INVALID_ARGUMENT;
    struct mock_xids *x = &st->xids[index];
    /* single writer in practice (a test); the slot is filled before the count moves */
    uint64_t k = atomic_load(&x->count);
    x->xid[k % MOCK_XIDS] = xid;
    atomic_store(&x->count, k + 1);
    return NVML_SUCCESS;
}

/* ---- MIG -------------------------------------------------------------------
 * Every MIG call on a GPU without MIG, or whose MIG mode is off, is
 * NOT_SUPPORTED (MIG mode itself is readable and settable on a GPU with MIG).
 * Instances are created and destroyed under mock_lock, and listed under it so
 * that a list is one moment's. */

#define ANY_PROFILE 0xffffffffU
#define SHARED NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED

/* The compute slices of each compute instance profile id
 * (NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE .. _7_SLICE); 0: not offered. */
static const uint32_t CI_COMPUTE[] = {1, 2, 3, 4, 7};

static uint32_t ci_compute(unsigned int profile) {
    return profile < sizeof CI_COMPUTE / sizeof CI_COMPUTE[0] ? CI_COMPUTE[profile] : 0;
}

static unsigned int ci_profile_id(uint32_t compute) {
    for (unsigned int i = 0; i < sizeof CI_COMPUTE / sizeof CI_COMPUTE[0]; i++)
        if (CI_COMPUTE[i] == compute) return i;
    return NO_INSTANCE;
}

/* GPU `device`, with MIG (and MIG mode on, if `enabled`), and its geometry. */
static nvmlReturn_t mig_gpu(nvmlDevice_t device, int enabled, struct mock_device **d,
                            const struct mock_mig_geometry **g) {
    *d = device_of(device);
    if (*d == NULL) return refuse(device);
    *g = mock_mig_geometry((*d)->name);
    if (*g == NULL || (enabled && (*d)->mig_current != NVML_DEVICE_MIG_ENABLE))
        return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

/* The slot of a GPU instance handle, while that instance exists. */
static struct mock_device *gi_of(nvmlGpuInstance_t gi) {
    struct mock_state *st = ready();
    if (st == NULL || gi == NULL || gi->r.magic != NVML_GI_MAGIC || gi->r.index < st->device_count ||
        gi->r.index >= MOCK_MAX_DEVICES)
        return NULL;
    struct mock_device *d = &st->devices[gi->r.index];
    return atomic_load(&d->gi_serial) == gi->r.serial ? d : NULL;
}

/* The slot of a compute instance handle, while that instance exists. */
static struct mock_device *ci_of(nvmlComputeInstance_t ci) {
    struct mock_state *st = ready();
    if (st == NULL || ci == NULL || ci->r.magic != NVML_CI_MAGIC || ci->r.index < st->device_count ||
        ci->r.index >= MOCK_MAX_DEVICES)
        return NULL;
    struct mock_device *d = &st->devices[ci->r.index];
    return atomic_load(&d->ci_serial) == ci->r.serial ? d : NULL;
}

/* The slots of the GPU instances on GPU `gpu` (of `profile`, or ANY_PROFILE;
 * only those with a compute instance if `mig_devices`), by placement start. */
static unsigned int instances_on(const struct mock_state *st, unsigned int gpu, uint32_t profile,
                                 int mig_devices, unsigned int *slots) {
    unsigned int n = 0;
    for (uint32_t start = 0; start < 32; start++) {
        for (unsigned int s = st->device_count; s < MOCK_MAX_DEVICES; s++) {
            const struct mock_device *d = &st->devices[s];
            if (atomic_load(&d->gi_serial) == 0 || d->parent != gpu || d->start != start) continue;
            if (profile != ANY_PROFILE && d->profile_id != profile) continue;
            if (mig_devices && atomic_load(&d->ci_serial) == 0) continue;
            slots[n++] = s;
        }
    }
    return n;
}

/* The memory slices GPU instances hold on GPU `gpu`: bit s for slice s. */
static uint32_t occupied(const struct mock_state *st, unsigned int gpu) {
    unsigned int slots[MOCK_MAX_DEVICES];
    unsigned int n = instances_on(st, gpu, ANY_PROFILE, 0, slots);
    uint32_t mask = 0;
    for (unsigned int i = 0; i < n; i++) {
        const struct mock_device *d = &st->devices[slots[i]];
        mask |= ((1U << d->size) - 1) << d->start;
    }
    return mask;
}

static uint32_t span(const struct mock_mig_profile *p, uint32_t start) {
    return ((1U << p->size) - 1) << start;
}

/* The starts of p whose slices are free under mask, into starts (may be NULL);
 * returns how many. */
static unsigned int free_starts(const struct mock_mig_profile *p, uint32_t mask, uint32_t *starts) {
    unsigned int n = 0;
    for (uint32_t s = 0; s < 32; s++) {
        if (!(p->starts >> s & 1U) || (mask & span(p, s))) continue;
        if (starts != NULL) starts[n] = s;
        n++;
    }
    return n;
}

static uint32_t popcount(uint32_t x) { return (uint32_t)__builtin_popcount(x); }

API nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current,
                                      unsigned int *pending) {
    struct mock_device *d;
    const struct mock_mig_geometry *g;
    nvmlReturn_t r = mig_gpu(device, 0, &d, &g);
    if (r != NVML_SUCCESS) return r;
    if (current == NULL || pending == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *current = d->mig_current;
    *pending = d->mig_pending;
    return NVML_SUCCESS;
}

/* Takes effect at once: the mock has no GPU reset to wait for. */
API nvmlReturn_t nvmlDeviceSetMigMode(nvmlDevice_t device, unsigned int mode,
                                      nvmlReturn_t *activationStatus) {
    struct mock_device *d;
    const struct mock_mig_geometry *g;
    nvmlReturn_t r = mig_gpu(device, 0, &d, &g);
    if (r != NVML_SUCCESS) return r;
    if (activationStatus == NULL ||
        (mode != NVML_DEVICE_MIG_DISABLE && mode != NVML_DEVICE_MIG_ENABLE))
        return NVML_ERROR_INVALID_ARGUMENT;
    struct mock_state *st = mock_state_get();
    mock_lock(st);
    if (mode == NVML_DEVICE_MIG_DISABLE && occupied(st, device->r.index) != 0) {
        mock_unlock(st);
        return NVML_ERROR_IN_USE;
    }
    d->mig_current = d->mig_pending = mode;
    mock_unlock(st);
    *activationStatus = NVML_SUCCESS;
    return NVML_SUCCESS;
}

/* Profile `id` of a GPU in MIG mode. */
static nvmlReturn_t gi_profile(nvmlDevice_t device, unsigned int id,
                               const struct mock_mig_profile **p) {
    struct mock_device *d;
    const struct mock_mig_geometry *g;
    nvmlReturn_t r = mig_gpu(device, 1, &d, &g);
    if (r != NVML_SUCCESS) return r;
    *p = mock_mig_profile(g, id);
    return *p == NULL ? NVML_ERROR_NOT_SUPPORTED : NVML_SUCCESS;
}

/* Engine counts other than copy engines are left 0. */
static nvmlGpuInstanceProfileInfo_t gi_profile_info(const struct mock_mig_profile *p) {
    return (nvmlGpuInstanceProfileInfo_t){
        .id = p->id,
        .sliceCount = p->compute,
        .instanceCount = popcount(p->starts),
        .multiprocessorCount = MOCK_SMS_PER_SLICE * p->compute,
        .copyEngineCount = p->compute,
        .memorySizeMB = (unsigned long long)p->memory_gb * 1024ULL,
    };
}

API nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfo(nvmlDevice_t device, unsigned int profile,
                                                     nvmlGpuInstanceProfileInfo_t *info) {
    const struct mock_mig_profile *p;
    nvmlReturn_t r = gi_profile(device, profile, &p);
    if (r != NVML_SUCCESS) return r;
    if (info == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *info = gi_profile_info(p);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetGpuInstanceProfileInfoV(nvmlDevice_t device, unsigned int profile,
                                                      nvmlGpuInstanceProfileInfo_v2_t *info) {
    const struct mock_mig_profile *p;
    nvmlReturn_t r = gi_profile(device, profile, &p);
    if (r != NVML_SUCCESS) return r;
    if (info == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (info->version != nvmlGpuInstanceProfileInfo_v2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    nvmlGpuInstanceProfileInfo_t v1 = gi_profile_info(p);
    *info = (nvmlGpuInstanceProfileInfo_v2_t){
        .version = info->version,
        .id = v1.id,
        .isP2pSupported = v1.isP2pSupported,
        .sliceCount = v1.sliceCount,
        .instanceCount = v1.instanceCount,
        .multiprocessorCount = v1.multiprocessorCount,
        .copyEngineCount = v1.copyEngineCount,
        .memorySizeMB = v1.memorySizeMB,
    };
    snprintf(info->name, sizeof info->name, "MIG %s", p->name);
    return NVML_SUCCESS;
}

/* The placements of `profileId` possible now: its starts whose memory slices
 * no GPU instance holds.  placements NULL: only their number. */
API nvmlReturn_t nvmlDeviceGetGpuInstancePossiblePlacements_v2(
    nvmlDevice_t device, unsigned int profileId, nvmlGpuInstancePlacement_t *placements,
    unsigned int *count) {
    const struct mock_mig_profile *p;
    nvmlReturn_t r = gi_profile(device, profileId, &p);
    if (r != NVML_SUCCESS) return r;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    struct mock_state *st = mock_state_get();
    mock_lock(st);
    uint32_t starts[32];
    unsigned int n = free_starts(p, occupied(st, device->r.index), starts);
    mock_unlock(st);
    for (unsigned int i = 0; placements != NULL && i < n; i++)
        placements[i] = (nvmlGpuInstancePlacement_t){.start = starts[i], .size = p->size};
    *count = n;
    return NVML_SUCCESS;
}

/* A profile's placements never overlap one another, so each free one is one
 * more instance. */
API nvmlReturn_t nvmlDeviceGetGpuInstanceRemainingCapacity(nvmlDevice_t device,
                                                           unsigned int profileId,
                                                           unsigned int *count) {
    return nvmlDeviceGetGpuInstancePossiblePlacements_v2(device, profileId, NULL, count);
}

/* A GPU instance of profileId at `placement`, or at its first free start if
 * `first_free`. */
static nvmlReturn_t create_gpu_instance(nvmlDevice_t device, unsigned int profileId,
                                        const nvmlGpuInstancePlacement_t *placement,
                                        int first_free, nvmlGpuInstance_t *out) {
    const struct mock_mig_profile *p;
    nvmlReturn_t r = gi_profile(device, profileId, &p);
    if (r != NVML_SUCCESS) return r;
    if (out == NULL || (!first_free && placement == NULL)) return NVML_ERROR_INVALID_ARGUMENT;
    if (first_free) placement = NULL;
    if (placement != NULL && (placement->start >= 32 || !(p->starts >> placement->start & 1U) ||
                              placement->size != p->size))
        return NVML_ERROR_INVALID_ARGUMENT;
    struct mock_state *st = mock_state_get();
    unsigned int gpu = device->r.index;
    mock_lock(st);
    uint32_t mask = occupied(st, gpu);
    uint32_t starts[32];
    uint32_t start;
    if (placement != NULL) {
        start = placement->start;
        r = mask & span(p, start) ? NVML_ERROR_INSUFFICIENT_RESOURCES : NVML_SUCCESS;
    } else {
        r = free_starts(p, mask, starts) > 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_RESOURCES;
        start = starts[0];
    }
    unsigned int slot = MOCK_MAX_DEVICES;
    uint64_t ids = 0; /* bit i: GPU instance id i is taken on this GPU */
    for (unsigned int s = st->device_count; s < MOCK_MAX_DEVICES; s++) {
        const struct mock_device *d = &st->devices[s];
        if (atomic_load(&d->gi_serial) == 0) {
            if (slot == MOCK_MAX_DEVICES) slot = s;
        } else if (d->parent == gpu && d->gi_id < 64) {
            ids |= 1ULL << d->gi_id;
        }
    }
    if (r == NVML_SUCCESS && slot == MOCK_MAX_DEVICES) r = NVML_ERROR_INSUFFICIENT_RESOURCES;
    if (r != NVML_SUCCESS) {
        mock_unlock(st);
        return r;
    }
    uint32_t id = 1;
    while (ids >> id & 1ULL) id++;
    struct mock_device *d = &st->devices[slot];
    d->uuid[0] = '\0';
    d->name[0] = '\0';
    d->total_bytes = (uint64_t)p->memory_gb << 30;
    atomic_store(&d->used_bytes, 0);
    atomic_store(&d->busy_until_ns, 0);
    atomic_store(&d->ci_serial, 0);
    d->parent = gpu;
    d->gi_id = id;
    d->profile_id = p->id;
    d->start = start;
    d->size = p->size;
    d->compute = p->compute;
    uint64_t serial = atomic_fetch_add(&st->serial, 1) + 1;
    atomic_store(&d->gi_serial, serial);
    mock_unlock(st);
    struct ref *ref = ref_for(REF_GI, slot, serial);
    if (ref == NULL) return NVML_ERROR_UNKNOWN;
    *out = (nvmlGpuInstance_t)(void *)ref;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceCreateGpuInstanceWithPlacement(
    nvmlDevice_t device, unsigned int profileId, const nvmlGpuInstancePlacement_t *placement,
    nvmlGpuInstance_t *gpuInstance) {
    return create_gpu_instance(device, profileId, placement, 0, gpuInstance);
}

API nvmlReturn_t nvmlDeviceCreateGpuInstance(nvmlDevice_t device, unsigned int profileId,
                                             nvmlGpuInstance_t *gpuInstance) {
    return create_gpu_instance(device, profileId, NULL, 1, gpuInstance);
}

API nvmlReturn_t nvmlGpuInstanceDestroy(nvmlGpuInstance_t gpuInstance) {
    struct mock_state *st = ready();
    if (st == NULL) return NVML_ERROR_UNINITIALIZED;
    mock_lock(st);
    struct mock_device *d = gi_of(gpuInstance);
    nvmlReturn_t r = NVML_SUCCESS;
    if (d == NULL)
        r = NVML_ERROR_INVALID_ARGUMENT;
    else if (atomic_load(&d->ci_serial) != 0)
        r = NVML_ERROR_IN_USE; /* its compute instance goes first */
    else
        atomic_store(&d->gi_serial, 0);
    mock_unlock(st);
    return r;
}

/* The GPU instances of profileId on a GPU, by placement start; gpuInstances
 * must have room for the profile's instanceCount. */
API nvmlReturn_t nvmlDeviceGetGpuInstances(nvmlDevice_t device, unsigned int profileId,
                                           nvmlGpuInstance_t *gpuInstances, unsigned int *count) {
    const struct mock_mig_profile *p;
    nvmlReturn_t r = gi_profile(device, profileId, &p);
    if (r != NVML_SUCCESS) return r;
    if (gpuInstances == NULL || count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    struct mock_state *st = mock_state_get();
    unsigned int slots[MOCK_MAX_DEVICES];
    uint64_t serials[MOCK_MAX_DEVICES];
    mock_lock(st);
    unsigned int n = instances_on(st, device->r.index, profileId, 0, slots);
    for (unsigned int i = 0; i < n; i++) serials[i] = atomic_load(&st->devices[slots[i]].gi_serial);
    mock_unlock(st);
    for (unsigned int i = 0; i < n; i++) {
        struct ref *ref = ref_for(REF_GI, slots[i], serials[i]);
        if (ref == NULL) return NVML_ERROR_UNKNOWN;
        gpuInstances[i] = (nvmlGpuInstance_t)(void *)ref;
    }
    *count = n;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetGpuInstanceById(nvmlDevice_t device, unsigned int id,
                                              nvmlGpuInstance_t *gpuInstance) {
    struct mock_device *gpu;
    const struct mock_mig_geometry *g;
    nvmlReturn_t r = mig_gpu(device, 1, &gpu, &g);
    if (r != NVML_SUCCESS) return r;
    if (gpuInstance == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    struct mock_state *st = mock_state_get();
    unsigned int slots[MOCK_MAX_DEVICES];
    mock_lock(st);
    unsigned int n = instances_on(st, device->r.index, ANY_PROFILE, 0, slots);
    unsigned int slot = MOCK_MAX_DEVICES;
    uint64_t serial = 0;
    for (unsigned int i = 0; i < n; i++) {
        if (st->devices[slots[i]].gi_id != id) continue;
        slot = slots[i];
        serial = atomic_load(&st->devices[slot].gi_serial);
    }
    mock_unlock(st);
    if (slot == MOCK_MAX_DEVICES) return NVML_ERROR_NOT_FOUND;
    struct ref *ref = ref_for(REF_GI, slot, serial);
    if (ref == NULL) return NVML_ERROR_UNKNOWN;
    *gpuInstance = (nvmlGpuInstance_t)(void *)ref;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpuInstanceGetInfo(nvmlGpuInstance_t gpuInstance, nvmlGpuInstanceInfo_t *info) {
    struct mock_device *d = gi_of(gpuInstance);
    if (d == NULL || info == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *info = (nvmlGpuInstanceInfo_t){
        .device = &g_handles[d->parent],
        .id = d->gi_id,
        .profileId = d->profile_id,
        .placement = {.start = d->start, .size = d->size},
    };
    return NVML_SUCCESS;
}

/* The one compute instance profile a GPU instance offers: all its compute
 * slices, engines shared. */
static nvmlReturn_t ci_profile(nvmlGpuInstance_t gpuInstance, unsigned int profile,
                               unsigned int engProfile, struct mock_device **d) {
    *d = gi_of(gpuInstance);
    if (*d == NULL || engProfile != NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED)
        return NVML_ERROR_INVALID_ARGUMENT;
    return ci_compute(profile) == (*d)->compute ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
}

static nvmlComputeInstanceProfileInfo_t ci_profile_info(const struct mock_device *d) {
    return (nvmlComputeInstanceProfileInfo_t){
        .id = ci_profile_id(d->compute),
        .sliceCount = d->compute,
        .instanceCount = 1,
        .multiprocessorCount = MOCK_SMS_PER_SLICE * d->compute,
        .sharedCopyEngineCount = d->compute,
    };
}

API nvmlReturn_t nvmlGpuInstanceGetComputeInstanceProfileInfo(
    nvmlGpuInstance_t gpuInstance, unsigned int profile, unsigned int engProfile,
    nvmlComputeInstanceProfileInfo_t *info) {
    struct mock_device *d;
    nvmlReturn_t r = ci_profile(gpuInstance, profile, engProfile, &d);
    if (r != NVML_SUCCESS) return r;
    if (info == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *info = ci_profile_info(d);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpuInstanceGetComputeInstanceProfileInfoV(
    nvmlGpuInstance_t gpuInstance, unsigned int profile, unsigned int engProfile,
    nvmlComputeInstanceProfileInfo_v2_t *info) {
    struct mock_device *d;
    nvmlReturn_t r = ci_profile(gpuInstance, profile, engProfile, &d);
    if (r != NVML_SUCCESS) return r;
    if (info == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (info->version != nvmlComputeInstanceProfileInfo_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    const struct mock_mig_profile *p = mock_slot_profile(mock_state_get(), gpuInstance->r.index);
    nvmlComputeInstanceProfileInfo_t v1 = ci_profile_info(d);
    *info = (nvmlComputeInstanceProfileInfo_v2_t){
        .version = info->version,
        .id = v1.id,
        .sliceCount = v1.sliceCount,
        .instanceCount = v1.instanceCount,
        .multiprocessorCount = v1.multiprocessorCount,
        .sharedCopyEngineCount = v1.sharedCopyEngineCount,
    };
    snprintf(info->name, sizeof info->name, "MIG %s", p != NULL ? p->name : "");
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpuInstanceGetComputeInstanceRemainingCapacity(nvmlGpuInstance_t gpuInstance,
                                                                    unsigned int profileId,
                                                                    unsigned int *count) {
    struct mock_device *d;
    nvmlReturn_t r = ci_profile(gpuInstance, profileId, SHARED, &d);
    if (r != NVML_SUCCESS) return r;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *count = atomic_load(&d->ci_serial) == 0 ? 1 : 0;
    return NVML_SUCCESS;
}

/* A MIG device's UUID: "MIG-" and a UUID-shaped hash of the GPU's UUID, the
 * GPU instance id and how many compute instances the GPU had made, so that an
 * instance made again in the same place is a new device, as on a real GPU. */
static uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void mig_uuid(const char *gpu_uuid, uint32_t gi_id, uint64_t made, char *out, size_t len) {
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a */
    for (const char *c = gpu_uuid; *c != '\0'; c++) h = (h ^ (unsigned char)*c) * 0x100000001b3ULL;
    uint64_t a = mix64(h ^ ((uint64_t)gi_id << 56) ^ made);
    uint64_t b = mix64(a + h);
    snprintf(out, len, "MIG-%08x-%04x-4%03x-%04x-%012llx", (unsigned int)(a >> 32),
             (unsigned int)(a >> 16) & 0xffffU, (unsigned int)a & 0xfffU,
             0x8000U | ((unsigned int)(b >> 48) & 0x3fffU),
             (unsigned long long)(b & 0xffffffffffffULL));
}

API nvmlReturn_t nvmlGpuInstanceCreateComputeInstance(nvmlGpuInstance_t gpuInstance,
                                                      unsigned int profileId,
                                                      nvmlComputeInstance_t *computeInstance) {
    struct mock_state *st = ready();
    if (st == NULL) return NVML_ERROR_UNINITIALIZED;
    if (computeInstance == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    mock_lock(st);
    struct mock_device *d;
    nvmlReturn_t r = ci_profile(gpuInstance, profileId, SHARED, &d);
    if (r == NVML_SUCCESS && atomic_load(&d->ci_serial) != 0)
        r = NVML_ERROR_INSUFFICIENT_RESOURCES; /* one compute instance covers it */
    if (r != NVML_SUCCESS) {
        mock_unlock(st);
        return r;
    }
    struct mock_device *gpu = &st->devices[d->parent];
    mig_uuid(gpu->uuid, d->gi_id, ++gpu->mig_created, d->uuid, sizeof d->uuid);
    uint64_t serial = atomic_fetch_add(&st->serial, 1) + 1;
    atomic_store(&d->ci_serial, serial);
    mock_unlock(st);
    struct ref *ref = ref_for(REF_CI, gpuInstance->r.index, serial);
    if (ref == NULL) return NVML_ERROR_UNKNOWN;
    *computeInstance = (nvmlComputeInstance_t)(void *)ref;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlComputeInstanceDestroy(nvmlComputeInstance_t computeInstance) {
    struct mock_state *st = ready();
    if (st == NULL) return NVML_ERROR_UNINITIALIZED;
    mock_lock(st);
    struct mock_device *d = ci_of(computeInstance);
    if (d == NULL) {
        mock_unlock(st);
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    mock_reclaim_dead(st);
    /* closed before used_bytes is read: see mock_charge */
    uint64_t serial = atomic_exchange(&d->ci_serial, 0);
    if (atomic_load(&d->used_bytes) > 0) {
        atomic_store(&d->ci_serial, serial);
        mock_unlock(st);
        return NVML_ERROR_IN_USE; /* a live process holds memory there */
    }
    d->uuid[0] = '\0';
    mock_unlock(st);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpuInstanceGetComputeInstances(nvmlGpuInstance_t gpuInstance,
                                                    unsigned int profileId,
                                                    nvmlComputeInstance_t *computeInstances,
                                                    unsigned int *count) {
    struct mock_device *d;
    nvmlReturn_t r = ci_profile(gpuInstance, profileId, SHARED, &d);
    if (r != NVML_SUCCESS) return r;
    if (computeInstances == NULL || count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    uint64_t serial = atomic_load(&d->ci_serial);
    *count = 0;
    if (serial == 0) return NVML_SUCCESS;
    struct ref *ref = ref_for(REF_CI, gpuInstance->r.index, serial);
    if (ref == NULL) return NVML_ERROR_UNKNOWN;
    computeInstances[0] = (nvmlComputeInstance_t)(void *)ref;
    *count = 1;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlGpuInstanceGetComputeInstanceById(nvmlGpuInstance_t gpuInstance,
                                                       unsigned int id,
                                                       nvmlComputeInstance_t *computeInstance) {
    struct mock_device *d = gi_of(gpuInstance);
    if (d == NULL || computeInstance == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    uint64_t serial = atomic_load(&d->ci_serial);
    if (id != 0 || serial == 0) return NVML_ERROR_NOT_FOUND;
    struct ref *ref = ref_for(REF_CI, gpuInstance->r.index, serial);
    if (ref == NULL) return NVML_ERROR_UNKNOWN;
    *computeInstance = (nvmlComputeInstance_t)(void *)ref;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlComputeInstanceGetInfo_v2(nvmlComputeInstance_t computeInstance,
                                               nvmlComputeInstanceInfo_t *info) {
    struct mock_device *d = ci_of(computeInstance);
    if (d == NULL || info == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    struct ref *gi = ref_for(REF_GI, computeInstance->r.index, atomic_load(&d->gi_serial));
    if (gi == NULL) return NVML_ERROR_UNKNOWN;
    *info = (nvmlComputeInstanceInfo_t){
        .device = &g_handles[d->parent],
        .gpuInstance = (nvmlGpuInstance_t)(void *)gi,
        .id = 0,
        .profileId = ci_profile_id(d->compute),
        .placement = {.start = 0, .size = d->compute},
    };
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlComputeInstanceGetInfo(nvmlComputeInstance_t computeInstance,
                                            nvmlComputeInstanceInfo_t *info) {
    return nvmlComputeInstanceGetInfo_v2(computeInstance, info);
}

/* The most GPU instances the GPU holds (its 1g profile's count) while it is
 * in MIG mode; 0 when it has no MIG or MIG mode is off. */
API nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    struct mock_device *d;
    const struct mock_mig_geometry *g;
    nvmlReturn_t r = mig_gpu(device, 1, &d, &g);
    if (r != NVML_SUCCESS && r != NVML_ERROR_NOT_SUPPORTED) return r;
    if (count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *count = r == NVML_SUCCESS ? popcount(g->profiles[0].starts) : 0;
    return NVML_SUCCESS;
}

/* The GPU's MIG devices are its GPU instances that have a compute instance,
 * by placement start. */
API nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index,
                                                     nvmlDevice_t *migDevice) {
    struct mock_device *gpu;
    const struct mock_mig_geometry *g;
    nvmlReturn_t r = mig_gpu(device, 1, &gpu, &g);
    if (r != NVML_SUCCESS) return r;
    if (migDevice == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    struct mock_state *st = mock_state_get();
    unsigned int slots[MOCK_MAX_DEVICES];
    mock_lock(st);
    unsigned int n = instances_on(st, device->r.index, ANY_PROFILE, 1, slots);
    uint64_t serial = index < n ? atomic_load(&st->devices[slots[index]].ci_serial) : 0;
    mock_unlock(st);
    if (index >= n) return NVML_ERROR_NOT_FOUND;
    struct ref *ref = ref_for(REF_MIG, slots[index], serial);
    if (ref == NULL) return NVML_ERROR_UNKNOWN;
    *migDevice = (nvmlDevice_t)(void *)ref;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice) {
    if (any_of(device) == NULL || isMigDevice == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *isMigDevice = mig_of(device) != NULL;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id) {
    struct mock_device *d = mig_of(device);
    if (d == NULL)
        return device_of(device) != NULL ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_INVALID_ARGUMENT;
    if (id == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *id = d->gi_id;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id) {
    if (mig_of(device) == NULL)
        return device_of(device) != NULL ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_INVALID_ARGUMENT;
    if (id == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *id = 0;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice,
                                                              nvmlDevice_t *device) {
    struct mock_device *d = mig_of(migDevice);
    if (d == NULL)
        return device_of(migDevice) != NULL ? NVML_ERROR_NOT_SUPPORTED : NVML_ERROR_INVALID_ARGUMENT;
    if (device == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &g_handles[d->parent];
    return NVML_SUCCESS;
}
