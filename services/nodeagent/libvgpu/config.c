/*
 * config.c - environment, logging and one-time initialization.
 *
 * Every variable is read once, the first time a wrapped function runs, so the
 * hot paths never call getenv (HAMi-core PR #166).  Names and formats are
 * HAMi-core's, so HAMi manifests carry over.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vgpu.h"

struct vgpu_config vgpu_cfg = {.log_level = VGPU_LOG_WARN};
atomic_int vgpu_ready;
static pthread_mutex_t g_init_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int t_initializing;

static const char *const LEVEL_NAMES[] = {"ERROR", "WARN", "INFO", "DEBUG"};

void vgpu_log(int level, const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (level < 0) level = 0;
    if (level > VGPU_LOG_DEBUG) level = VGPU_LOG_DEBUG;
    fprintf(stderr, "[vslice libvgpu %s pid %d] %s\n", LEVEL_NAMES[level], (int)getpid(), msg);
}

int64_t vgpu_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int vgpu_parse_size(const char *text, uint64_t *bytes) {
    if (text == NULL) return -1;
    while (isspace((unsigned char)*text)) text++;
    if (!isdigit((unsigned char)*text)) return -1;
    char *end = NULL;
    unsigned long long value = strtoull(text, &end, 10);
    unsigned shift = 0;
    switch (tolower((unsigned char)*end)) {
    case '\0': break;
    case 'k': shift = 10; end++; break;
    case 'm': shift = 20; end++; break;
    case 'g': shift = 30; end++; break;
    default: return -1;
    }
    while (isspace((unsigned char)*end)) end++;
    if (*end != '\0') return -1;
    if (shift != 0 && value > (~0ULL >> shift)) return -1;
    *bytes = (uint64_t)value << shift;
    return 0;
}

static int parse_level(const char *s) {
    if (s == NULL || *s == '\0') return VGPU_LOG_WARN;
    if (isdigit((unsigned char)*s)) {
        int v = atoi(s);
        return v < 0 ? 0 : v > VGPU_LOG_DEBUG ? VGPU_LOG_DEBUG : v;
    }
    for (int i = 0; i <= VGPU_LOG_DEBUG; i++)
        if (strcasecmp(s, LEVEL_NAMES[i]) == 0) return i;
    return VGPU_LOG_WARN;
}

static void load_limit(struct vgpu_config *cfg, int dev, const char *all) {
    char name[64];
    snprintf(name, sizeof name, "CUDA_DEVICE_MEMORY_LIMIT_%d", dev);
    const char *value = getenv(name);
    if (value == NULL || *value == '\0') {
        value = all;
        snprintf(name, sizeof name, "CUDA_DEVICE_MEMORY_LIMIT");
    }
    if (value == NULL || *value == '\0') return;
    uint64_t bytes = 0;
    if (vgpu_parse_size(value, &bytes) != 0) {
        vgpu_log(VGPU_LOG_ERROR, "ignoring %s=%s: want bytes or a k/m/g suffix", name, value);
        return;
    }
    cfg->limit_bytes[dev] = bytes;
}

static void load_sm(struct vgpu_config *cfg, int dev, const char *all) {
    char name[64];
    snprintf(name, sizeof name, "CUDA_DEVICE_SM_LIMIT_%d", dev);
    const char *value = getenv(name);
    if (value == NULL || *value == '\0') value = all;
    if (value == NULL || *value == '\0') return;
    char *end = NULL;
    long p = strtol(value, &end, 10);
    if (end == value || *end != '\0' || p < 0) {
        vgpu_log(VGPU_LOG_ERROR, "ignoring SM limit '%s': want a percent", value);
        return;
    }
    cfg->sm_limit_percent[dev] = p > 100 ? 100U : (uint32_t)p;
}

/* CUDA_VISIBLE_DEVICES of UUIDs ("GPU-..." or "MIG-...", as the node agent sets
 * it): CUDA device i is the i-th entry.  Indices, or anything else, leave the
 * list empty and NVML's index stands for the CUDA device, as before. */
static void load_visible(struct vgpu_config *cfg, const char *value) {
    cfg->visible_count = 0;
    if (value == NULL || (strncmp(value, "GPU-", 4) != 0 && strncmp(value, "MIG-", 4) != 0)) return;
    const char *p = value;
    while (*p != '\0' && cfg->visible_count < VGPU_MAX_DEVICES) {
        size_t n = strcspn(p, ",");
        if (n > 0 && n < sizeof cfg->visible_uuid[0]) {
            memcpy(cfg->visible_uuid[cfg->visible_count], p, n);
            cfg->visible_uuid[cfg->visible_count][n] = '\0';
            cfg->visible_count++;
        }
        p += n;
        if (*p == ',') p++;
    }
}

int vgpu_cuda_device_of(const char *uuid, int nvml_index) {
    if (vgpu_cfg.visible_count == 0) return nvml_index;
    for (int i = 0; i < vgpu_cfg.visible_count; i++) {
        /* CUDA accepts a unique prefix of the UUID */
        size_t n = strlen(vgpu_cfg.visible_uuid[i]);
        if (uuid != NULL && strncmp(uuid, vgpu_cfg.visible_uuid[i], n) == 0) return i;
    }
    return -1;
}

void vgpu_config_load(struct vgpu_config *cfg) {
    cfg->log_level = parse_level(getenv("LIBCUDA_LOG_LEVEL"));
    const char *all_mem = getenv("CUDA_DEVICE_MEMORY_LIMIT");
    const char *all_sm = getenv("CUDA_DEVICE_SM_LIMIT");
    for (int i = 0; i < VGPU_MAX_DEVICES; i++) {
        load_limit(cfg, i, all_mem);
        load_sm(cfg, i, all_sm);
    }
    const char *policy = getenv("GPU_CORE_UTILIZATION_POLICY");
    cfg->sm_policy = VGPU_POLICY_DEFAULT;
    if (policy != NULL && strcasecmp(policy, "force") == 0) cfg->sm_policy = VGPU_POLICY_FORCE;
    if (policy != NULL && strcasecmp(policy, "disable") == 0) cfg->sm_policy = VGPU_POLICY_DISABLE;
    load_visible(cfg, getenv("CUDA_VISIBLE_DEVICES"));
    const char *path = getenv("CUDA_DEVICE_MEMORY_SHARED_CACHE");
    if (path != NULL && *path != '\0')
        snprintf(cfg->cache_path, sizeof cfg->cache_path, "%s", path);
    else
        snprintf(cfg->cache_path, sizeof cfg->cache_path, "/tmp/vslice-libvgpu-%u.cache",
                 (unsigned)getuid());
}

void vgpu_init_slow(void) {
    /* the driver may call back into wrapped functions while we resolve it */
    if (t_initializing) return;
    pthread_mutex_lock(&g_init_lock);
    if (!atomic_load_explicit(&vgpu_ready, memory_order_relaxed)) {
        t_initializing = 1;
        vgpu_config_load(&vgpu_cfg);
        vgpu_resolve_driver();
        vgpu_cache_attach();
        vgpu_limiter_setup();
        t_initializing = 0;
        atomic_store_explicit(&vgpu_ready, 1, memory_order_release);
    }
    pthread_mutex_unlock(&g_init_lock);
}
