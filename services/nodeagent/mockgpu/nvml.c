/*
 * nvml.c - the mock NVML, built as libnvidia-ml.so.1.
 *
 * Reads the mock GPU's shared state (mockstate.h), so that memory used and
 * utilization cover every process on the mock card, as the real NVML does.
 * Device utilization is measured over the last second (the real one uses a
 * sample period between 1/6 s and 1 s); process utilization returns one
 * sample per process covering the time since lastSeenTimeStamp.
 */
#define _GNU_SOURCE
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

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

API nvmlReturn_t nvmlInit_v2(void) {
    struct mock_state *st = mock_state_get();
    if (st == NULL) return NVML_ERROR_UNKNOWN;
    for (unsigned int i = 0; i < MOCK_MAX_DEVICES; i++)
        g_handles[i] = (struct nvmlDevice_st){.magic = NVML_DEV_MAGIC, .index = i};
    atomic_fetch_add(&g_init_count, 1);
    return NVML_SUCCESS;
}
API nvmlReturn_t nvmlInit(void) { return nvmlInit_v2(); }

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
    struct mock_device *d = device_of(device);
    if (d == NULL || memory == NULL) return NVML_ERROR_INVALID_ARGUMENT;
    uint64_t used = atomic_load(&d->used_bytes);
    memory->total = d->total_bytes;
    memory->used = used;
    memory->free = used < d->total_bytes ? d->total_bytes - used : 0;
    return NVML_SUCCESS;
}

API nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    struct mock_device *d = device_of(device);
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
    struct mock_device *d = device_of(device);
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
