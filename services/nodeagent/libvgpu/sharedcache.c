/*
 * sharedcache.c - the container's accounting file (layout: sharedcache.h).
 *
 * Charges are lock-free: a compare-and-swap on the device's used_bytes makes
 * check-and-add one step across processes, so two processes racing for the
 * last MiB cannot both win (HAMi-core #273), and 8 processes allocating at
 * once only contend on one cache line (HAMi-core measured 12.7 ms per
 * allocation behind its global lock).  Only slot bookkeeping takes a lock:
 * flock on the file, which the kernel releases the moment its holder dies, so
 * a SIGKILLed holder never blocks the container (HAMi#2500, HAMi-core #86).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "vgpu.h"

struct vgpu_cache *vgpu_cache;
static int g_shared;                         /* 0: private fallback mapping */
static uint64_t g_limit[VGPU_MAX_DEVICES];   /* copied from the file: fixed once created */
static struct vgpu_cache_slot *g_slot;
static struct vgpu_cache_slot g_orphan_slot; /* used when every slot is taken */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* ---- the file lock ---------------------------------------------------------- */

/* A fresh descriptor per acquisition: flock belongs to the open file
 * description, which a forked child would otherwise share with its parent. */
static int lock_cache(void) {
    pthread_mutex_lock(&g_lock);
    if (!g_shared) return -1;
    int fd = open(vgpu_cfg.cache_path, O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
        while (flock(fd, LOCK_EX) != 0 && errno == EINTR) {
        }
    }
    return fd;
}

static void unlock_cache(int fd) {
    if (fd >= 0) {
        flock(fd, LOCK_UN);
        close(fd);
    }
    pthread_mutex_unlock(&g_lock);
}

/* ---- process liveness ------------------------------------------------------- */

static uint64_t start_ticks_of(int32_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (p == NULL) return 0;
    /* starttime is field 22; field 3 follows the ')' of the command name */
    int field = 2;
    for (; *p != '\0' && field < 22; p++)
        if (*p == ' ') field++;
    return strtoull(p, NULL, 10);
}

static int slot_dead(const struct vgpu_cache_slot *s, int32_t pid) {
    if (pid == -1) return 1; /* a reclaimer died half way: finish its work */
    if (kill(pid, 0) == -1 && errno == ESRCH) return 1;
    uint64_t recorded = LOAD(&s->start_ticks);
    uint64_t now = recorded != 0 ? start_ticks_of(pid) : 0;
    return now != 0 && now != recorded; /* the pid was reused */
}

static void sub_clamped(uint64_t *p, uint64_t amount) {
    uint64_t old = LOAD(p);
    uint64_t next;
    do {
        next = old > amount ? old - amount : 0;
    } while (!__atomic_compare_exchange_n(p, &old, next, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
}

/* Gives a slot's charges back to the devices.  Exchanging each counter to 0
 * before subtracting means a reclaimer killed half way can leak a charge but
 * never credit one twice. */
static void drain_slot(struct vgpu_cache_slot *s) {
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) {
        uint64_t amount = __atomic_exchange_n(&s->charged_bytes[d], 0, __ATOMIC_ACQ_REL);
        if (amount != 0) sub_clamped(&vgpu_cache->devices[d].used_bytes, amount);
    }
}

/* Caller holds the file lock. */
static int reclaim_dead_locked(void) {
    int reclaimed = 0;
    for (int i = 0; i < VGPU_MAX_SLOTS; i++) {
        struct vgpu_cache_slot *s = &vgpu_cache->slots[i];
        int32_t pid = LOAD(&s->pid);
        if (pid == 0 || s == g_slot || !slot_dead(s, pid)) continue;
        STORE(&s->pid, -1);
        drain_slot(s);
        VGPU_LOG(VGPU_LOG_INFO, "reclaimed the shared-cache slot of dead process %d", (int)pid);
        STORE(&s->pid, 0);
        reclaimed++;
    }
    return reclaimed;
}

/* ---- attach ------------------------------------------------------------------ */

static void fill_new(struct vgpu_cache *c) {
    memset(c, 0, sizeof *c);
    c->header.version = VGPU_CACHE_VERSION;
    c->header.header_bytes = sizeof(struct vgpu_cache_header);
    c->header.device_count = VGPU_MAX_DEVICES;
    c->header.slot_count = VGPU_MAX_SLOTS;
    c->header.device_bytes = sizeof(struct vgpu_cache_device);
    c->header.slot_bytes = sizeof(struct vgpu_cache_slot);
    c->header.sm_policy = vgpu_cfg.sm_policy;
    c->header.creator_pid = (int32_t)getpid();
    c->header.created_ns = vgpu_now_ns();
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) {
        c->devices[d].limit_bytes = vgpu_cfg.limit_bytes[d];
        c->devices[d].sm_limit_percent = vgpu_cfg.sm_limit_percent[d];
    }
    STORE(&c->header.magic, VGPU_CACHE_MAGIC);
}

static int layout_matches(const struct vgpu_cache *c) {
    const struct vgpu_cache_header *h = &c->header;
    return h->version == VGPU_CACHE_VERSION && h->header_bytes == sizeof(struct vgpu_cache_header) &&
           h->device_count == VGPU_MAX_DEVICES && h->slot_count == VGPU_MAX_SLOTS &&
           h->device_bytes == sizeof(struct vgpu_cache_device) &&
           h->slot_bytes == sizeof(struct vgpu_cache_slot);
}

/* The first process's env sets the container's limits; a later process whose
 * env disagrees follows the file, and says so. */
static void follow_file(const struct vgpu_cache *c) {
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) {
        if (c->devices[d].limit_bytes != vgpu_cfg.limit_bytes[d])
            vgpu_log(VGPU_LOG_WARN,
                     "device %d: memory limit from env is %llu bytes but the shared cache %s says "
                     "%llu bytes (set by pid %d); following the shared cache",
                     d, (unsigned long long)vgpu_cfg.limit_bytes[d], vgpu_cfg.cache_path,
                     (unsigned long long)c->devices[d].limit_bytes, (int)c->header.creator_pid);
        if (c->devices[d].sm_limit_percent != vgpu_cfg.sm_limit_percent[d])
            vgpu_log(VGPU_LOG_WARN,
                     "device %d: SM limit from env is %u%% but the shared cache %s says %u%%; "
                     "following the shared cache",
                     d, vgpu_cfg.sm_limit_percent[d], vgpu_cfg.cache_path,
                     c->devices[d].sm_limit_percent);
    }
    if (c->header.sm_policy != vgpu_cfg.sm_policy)
        vgpu_log(VGPU_LOG_WARN,
                 "GPU_CORE_UTILIZATION_POLICY differs from the shared cache's; following the "
                 "shared cache");
}

static void use_private(const char *why) {
    vgpu_log(VGPU_LOG_ERROR,
             "shared cache %s unusable (%s): limits hold for this process only, not the container",
             vgpu_cfg.cache_path, why);
    void *m = mmap(NULL, sizeof(struct vgpu_cache), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) abort();
    vgpu_cache = m;
    fill_new(vgpu_cache);
    g_shared = 0;
}

void vgpu_cache_attach(void) {
    int fd = open(vgpu_cfg.cache_path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) {
        use_private(strerror(errno));
    } else {
        while (flock(fd, LOCK_EX) != 0 && errno == EINTR) {
        }
        struct stat sb;
        void *m = MAP_FAILED;
        if (fstat(fd, &sb) == 0 &&
            ((size_t)sb.st_size >= sizeof(struct vgpu_cache) ||
             ftruncate(fd, sizeof(struct vgpu_cache)) == 0))
            m = mmap(NULL, sizeof(struct vgpu_cache), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            use_private(strerror(errno));
        } else {
            struct vgpu_cache *c = m;
            uint32_t magic = LOAD(&c->header.magic);
            if (magic == 0) {
                fill_new(c);
                VGPU_LOG(VGPU_LOG_INFO, "created shared cache %s", vgpu_cfg.cache_path);
            }
            if (magic != 0 && (magic != VGPU_CACHE_MAGIC || !layout_matches(c))) {
                munmap(m, sizeof(struct vgpu_cache));
                use_private("not a version 1 vslice shared cache");
            } else {
                vgpu_cache = c;
                g_shared = 1;
                if (magic != 0) follow_file(c);
                reclaim_dead_locked();
            }
        }
        /* explicit: the mapping keeps the open file description, and so its
         * lock, alive after close */
        flock(fd, LOCK_UN);
        close(fd);
    }
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) g_limit[d] = vgpu_cache->devices[d].limit_bytes;
}

/* ---- slots -------------------------------------------------------------------- */

static void forget_slot_in_child(void) { g_slot = NULL; }

struct vgpu_cache_slot *vgpu_slot(void) {
    struct vgpu_cache_slot *s = LOAD(&g_slot);
    if (LIKELY(s != NULL)) return s;
    int fd = lock_cache();
    if (g_slot == NULL) {
        int32_t me = (int32_t)getpid();
        for (int pass = 0; pass < 2 && g_slot == NULL; pass++) {
            if (pass == 1 && reclaim_dead_locked() == 0) break;
            for (int i = 0; i < VGPU_MAX_SLOTS; i++) {
                struct vgpu_cache_slot *c = &vgpu_cache->slots[i];
                if (LOAD(&c->pid) != 0) continue;
                memset(c->charged_bytes, 0, sizeof c->charged_bytes);
                c->last_kernel_ns = 0;
                c->launches = 0;
                c->start_ticks = start_ticks_of(me);
                STORE(&c->pid, me);
                STORE(&g_slot, c);
                break;
            }
        }
        if (g_slot == NULL) {
            vgpu_log(VGPU_LOG_ERROR, "all %d shared-cache slots are taken; this process's usage "
                     "is not reclaimed if it dies", VGPU_MAX_SLOTS);
            g_orphan_slot.pid = me;
            STORE(&g_slot, &g_orphan_slot);
        }
    }
    s = g_slot;
    unlock_cache(fd);
    return s;
}

__attribute__((destructor)) static void release_slot(void) {
    struct vgpu_cache_slot *s = LOAD(&g_slot);
    if (s == NULL || s == &g_orphan_slot || LOAD(&s->pid) != (int32_t)getpid()) return;
    /* the driver frees a process's memory when it exits; so does the slice */
    int fd = lock_cache();
    drain_slot(s);
    STORE(&s->pid, 0);
    g_slot = NULL;
    unlock_cache(fd);
}

__attribute__((constructor)) static void install_fork_handler(void) {
    pthread_atfork(NULL, NULL, forget_slot_in_child);
}

/* ---- charging ----------------------------------------------------------------- */

static int try_charge(uint64_t *used, uint64_t limit, uint64_t bytes) {
    uint64_t old = LOAD(used);
    do {
        if (bytes > limit || old > limit - bytes) return 0;
    } while (!__atomic_compare_exchange_n(used, &old, old + bytes, 1, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
    return 1;
}

int vgpu_charge(int dev, uint64_t bytes) {
    if (dev < 0 || dev >= VGPU_MAX_DEVICES) return 1;
    struct vgpu_cache_slot *s = vgpu_slot();
    uint64_t *used = &vgpu_cache->devices[dev].used_bytes;
    uint64_t limit = g_limit[dev];
    if (limit == 0) {
        __atomic_fetch_add(used, bytes, __ATOMIC_ACQ_REL);
    } else if (!try_charge(used, limit, bytes)) {
        /* memory of processes that died without freeing belongs to nobody */
        int fd = lock_cache();
        int reclaimed = g_shared ? reclaim_dead_locked() : 0;
        unlock_cache(fd);
        if (reclaimed == 0 || !try_charge(used, limit, bytes)) return 0;
    }
    __atomic_fetch_add(&s->charged_bytes[dev], bytes, __ATOMIC_ACQ_REL);
    return 1;
}

void vgpu_credit(int dev, uint64_t bytes) {
    if (dev < 0 || dev >= VGPU_MAX_DEVICES) return;
    sub_clamped(&vgpu_cache->devices[dev].used_bytes, bytes);
    sub_clamped(&vgpu_slot()->charged_bytes[dev], bytes);
}

uint64_t vgpu_used(int dev) {
    return dev >= 0 && dev < VGPU_MAX_DEVICES ? LOAD(&vgpu_cache->devices[dev].used_bytes) : 0;
}

uint64_t vgpu_limit(int dev) { return dev >= 0 && dev < VGPU_MAX_DEVICES ? g_limit[dev] : 0; }

int vgpu_container_pids(int32_t *pids, int max) {
    int n = 0;
    for (int i = 0; i < VGPU_MAX_SLOTS && n < max; i++) {
        int32_t pid = LOAD(&vgpu_cache->slots[i].pid);
        if (pid > 0) pids[n++] = pid;
    }
    return n;
}
