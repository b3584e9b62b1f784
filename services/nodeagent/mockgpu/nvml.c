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
 */
#define _GNU_SOURCE
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

struct nvmlDevice_st {
    uint32_t magic;
    unsigned int index;
};

static struct nvmlDevice_st g_handles[MOCK_MAX_DEVICES];
static atomic_int g_init_count;

static struct mock_state *ready(void) {
    return atomic_load(&g_init_count) > 0 ? mock_state_get() : NULL;
}

static struct mock_device *device_of(nvmlDevice_t h) {
    struct mock_state *st = ready();
    if (st == NULL || h == NULL || h->magic != NVML_DEV_MAGIC || h->index >= st->device_count)
        return NULL;
    return &st->devices[h->index];
}

/* A device's figures after dead processes gave their memory back. */
static struct mock_device *device_now(nvmlDevice_t h) {
    struct mock_device *d = device_of(h);
    if (d != NULL) mock_reclaim_dead(mock_state_get());
    return d;
}

API nvmlReturn_t nvmlInit_v2(void) {
    struct mock_state *st = mock_state_get();
    if (st == NULL) return NVML_ERROR_UNKNOWN;
    for (unsigned int i = 0; i < MOCK_MAX_DEVICES; i++)
        g_handles[i] = (struct nvmlDevice_st){.magic = NVML_DEV_MAGIC, .index = i};
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
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_TIMEOUT: return "Timeout";
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
    return NVML_ERROR_NOT_FOUND;
}

API nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    if (device_of(device) == NULL || index == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *index = device->index;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    struct mock_device *d = device_of(device);
    if (d == NULL || uuid == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(d->uuid) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    snprintf(uuid, length, "%s", d->uuid);
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    if (device_of(device) == NULL || name == NULL || length == 0) return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(name, length, "vslice mock GPU");
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
    if (d == NULL || util == NULL) return NVML_ERROR_INVALID_ARGUMENT;
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
    if (d == NULL || count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
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

API nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *count,
                                                         nvmlProcessInfo_t *infos) {
    struct mock_device *d = device_now(device);
    if (d == NULL || count == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    struct mock_state *st = mock_state_get();
    unsigned int n = 0;
    unsigned int cap = infos == NULL ? 0 : *count;
    for (int i = 0; i < MOCK_MAX_PROCS; i++) {
        int32_t pid = atomic_load(&st->procs[i].pid);
        uint64_t used = atomic_load(&st->procs[i].used_bytes[device->index]);
        if (pid <= 0 || used == 0) continue;
        if (n < cap)
            infos[n] = (nvmlProcessInfo_t){.pid = (unsigned int)pid, .usedGpuMemory = used,
                                           .gpuInstanceId = 0xffffffffU, .computeInstanceId = 0xffffffffU};
        n++;
    }
    *count = n;
    return n > cap ? NVML_ERROR_INSUFFICIENT_SIZE : NVML_SUCCESS;
}

/* ---- PCI ------------------------------------------------------------------ */

API nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    if (device_of(device) == NULL || pci == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    memset(pci, 0, sizeof *pci);
    pci->bus = 0x10 + device->index;
    pci->pciDeviceId = 0x20b010deU;
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", pci->bus);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", pci->bus);
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlDeviceGetPciInfo_v2(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    return nvmlDeviceGetPciInfo_v3(device, pci);
}

API nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor) {
    if (device_of(device) == NULL || minor == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    *minor = device->index;
    return NVML_SUCCESS;
}

/* ---- XID events ----------------------------------------------------------- */

struct nvmlEventSet_st {
    uint64_t types[MOCK_MAX_DEVICES];  /* registered event types per device */
    uint64_t cursor[MOCK_MAX_DEVICES]; /* XIDs of each device already delivered */
};

API nvmlReturn_t nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    if (device_of(device) == NULL || types == NULL) return NVML_ERROR_INVALID_ARGUMENT;
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
    if (device_of(device) == NULL || set == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    if (types & ~nvmlEventTypeXidCriticalError) return NVML_ERROR_NOT_SUPPORTED;
    struct mock_state *st = mock_state_get();
    /* only XIDs that happen after the registration are delivered */
    if (set->types[device->index] == 0)
        set->cursor[device->index] = atomic_load(&st->xids[device->index].count);
    set->types[device->index] |= types;
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
