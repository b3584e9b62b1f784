/* mockstate.c - attach to, initialize and query the mock GPU's shared state. */
#define _GNU_SOURCE
#include "mockstate.h"

#include "../libvgpu/cudadefs.h"

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

#define DEFAULT_DEVICES "GPU-5a1ce000-0000-4000-8000-000000000000:16384"

static struct mock_state *g_state;
static struct mock_proc *g_self;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t g_self_lock = PTHREAD_MUTEX_INITIALIZER;

int64_t mock_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Gone from /proc as well: a process in a child PID namespace cannot signal
 * the host pids other processes are recorded under (see mock_host_pid). */
static int pid_dead(int32_t pid) {
    char path[32];
    snprintf(path, sizeof path, "/proc/%d", (int)pid);
    return kill(pid, 0) == -1 && errno == ESRCH && access(path, F_OK) != 0;
}

static _Atomic uint64_t g_host_pid; /* getpid() << 32 | host pid, read once per process */

int32_t mock_host_pid(void) {
    uint32_t me = (uint32_t)getpid();
    uint64_t known = atomic_load_explicit(&g_host_pid, memory_order_relaxed);
    if (known >> 32 == me) return (int32_t)(uint32_t)known;
    /* the first NSpid entry is the pid in the namespace of the /proc mounted:
     * the host's, unless the process mounted its own */
    int32_t pid = (int32_t)me;
    FILE *f = fopen("/proc/self/status", "r");
    if (f == NULL) return pid;
    char line[256];
    while (fgets(line, sizeof line, f) != NULL) {
        int first;
        if (sscanf(line, "NSpid: %d", &first) == 1) {
            pid = (int32_t)first;
            break;
        }
    }
    fclose(f);
    atomic_store_explicit(&g_host_pid, (uint64_t)me << 32 | (uint32_t)pid, memory_order_relaxed);
    return pid;
}

static int all_digits(const char *s) {
    if (*s == '\0') return 0;
    for (; *s != '\0'; s++)
        if (*s < '0' || *s > '9') return 0;
    return 1;
}

/* One entry, "<uuid>:<memory_mib>[:<product name>[:mig]]", read from the
 * right so that a UUID may hold colons as in the older "<uuid>:<memory_mib>".
 * Returns 0, or -1 when the entry has no memory size. */
static int parse_device(char *tok, struct mock_device *d) {
    int mig = 0;
    const char *name = MOCK_DEFAULT_NAME;
    char *colon = strrchr(tok, ':');
    if (colon != NULL && strcmp(colon + 1, "mig") == 0) {
        mig = 1;
        *colon = '\0';
        colon = strrchr(tok, ':');
    }
    if (colon != NULL && !all_digits(colon + 1)) {
        if (colon[1] != '\0') name = colon + 1;
        *colon = '\0';
        colon = strrchr(tok, ':');
    }
    if (colon == NULL || !all_digits(colon + 1)) return -1;
    *colon = '\0';
    snprintf(d->uuid, sizeof d->uuid, "%s", tok);
    snprintf(d->name, sizeof d->name, "%s", name);
    d->total_bytes = strtoull(colon + 1, NULL, 10) << 20;
    if (mig && mock_mig_geometry(d->name) == NULL)
        fprintf(stderr, "mockgpu: device %s (%s) has no MIG: ':mig' ignored\n", d->uuid, d->name);
    else if (mig)
        d->mig_current = d->mig_pending = 1;
    return 0;
}

static void parse_devices(struct mock_state *st) {
    const char *spec = getenv("VSLICE_MOCKGPU_DEVICES");
    if (spec == NULL || *spec == '\0') spec = DEFAULT_DEVICES;
    char *copy = strdup(spec);
    if (copy == NULL) return;
    char *save = NULL;
    uint32_t n = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok != NULL && n < MOCK_MAX_GPUS;
         tok = strtok_r(NULL, ",", &save)) {
        char *entry = strdup(tok);
        if (entry != NULL && parse_device(entry, &st->devices[n]) == 0)
            n++;
        else
            fprintf(stderr,
                    "mockgpu: ignoring device '%s' (want <uuid>:<memory_mib>[:<name>[:mig]])\n",
                    tok);
        free(entry);
    }
    free(copy);
    st->device_count = n;
}

void mock_reclaim_dead(struct mock_state *st) {
    for (int i = 0; i < MOCK_MAX_PROCS; i++) {
        struct mock_proc *p = &st->procs[i];
        int32_t pid = atomic_load(&p->pid);
        if (pid <= 0 || !pid_dead(pid)) continue;
        /* a dead process's device memory goes back to the card, as the real
         * driver frees it on exit */
        for (uint32_t d = 0; d < MOCK_MAX_DEVICES; d++) {
            uint64_t used = atomic_exchange(&p->used_bytes[d], 0);
            atomic_fetch_sub(&st->devices[d].used_bytes, used);
        }
        atomic_store(&p->pid, 0);
    }
}

static void attach(void) {
    char path[4096];
    const char *env = getenv("VSLICE_MOCKGPU_STATE");
    if (env != NULL && *env != '\0')
        snprintf(path, sizeof path, "%s", env);
    else
        snprintf(path, sizeof path, "/tmp/vslice-mockgpu-%u.state", (unsigned)getuid());
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        fprintf(stderr, "mockgpu: cannot open state file %s: %s\n", path, strerror(errno));
        return;
    }
    flock(fd, LOCK_EX);
    struct {
        uint64_t magic;
        uint32_t version;
    } head = {0, 0};
    int fresh = pread(fd, &head, sizeof head, 0) != (ssize_t)sizeof head ||
                head.magic != MOCK_STATE_MAGIC || head.version != MOCK_STATE_VERSION;
    /* A new card starts from zeros: truncating drops what an older one wrote,
     * and a sparse file's pages cost nothing until a device touches them
     * (most of the file is kernel rings of instance slots never used). */
    struct stat sb;
    if ((fresh && ftruncate(fd, 0) != 0) ||
        (fstat(fd, &sb) == 0 && (size_t)sb.st_size < sizeof(struct mock_state) &&
         ftruncate(fd, sizeof(struct mock_state)) != 0)) {
        fprintf(stderr, "mockgpu: cannot size state file %s\n", path);
        flock(fd, LOCK_UN);
        close(fd);
        return;
    }
    void *m = mmap(NULL, sizeof(struct mock_state), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        flock(fd, LOCK_UN);
        close(fd);
        return;
    }
    struct mock_state *st = m;
    if (fresh) {
        parse_devices(st);
        st->version = MOCK_STATE_VERSION;
        st->magic = MOCK_STATE_MAGIC;
    }
    mock_reclaim_dead(st);
    flock(fd, LOCK_UN);
    close(fd);
    g_state = st;
}

static void forget_self_in_child(void) { g_self = NULL; }

static void attach_once(void) {
    attach();
    pthread_atfork(NULL, NULL, forget_self_in_child);
}

struct mock_state *mock_state_get(void) {
    pthread_once(&g_once, attach_once);
    return g_state;
}

struct mock_proc *mock_state_self(void) {
    struct mock_proc *self = __atomic_load_n(&g_self, __ATOMIC_ACQUIRE);
    if (self != NULL) return self;
    struct mock_state *st = mock_state_get();
    if (st == NULL) return NULL;
    pthread_mutex_lock(&g_self_lock);
    if (g_self == NULL) {
        int32_t me = mock_host_pid();
        for (int pass = 0; pass < 2 && g_self == NULL; pass++) {
            for (int i = 0; i < MOCK_MAX_PROCS; i++) {
                int32_t expected = 0;
                if (atomic_compare_exchange_strong(&st->procs[i].pid, &expected, me)) {
                    __atomic_store_n(&g_self, &st->procs[i], __ATOMIC_RELEASE);
                    break;
                }
            }
            if (g_self == NULL) mock_reclaim_dead(st);
        }
    }
    self = g_self;
    pthread_mutex_unlock(&g_self_lock);
    return self;
}

/* Intervals are appended in (nearly) start order, so a backwards scan can stop
 * once it has seen a run of entries that all ended before the window. */
#define SCAN_SLACK 64

int64_t mock_busy_ns(const struct mock_device *dev, int32_t pid, int64_t lo_ns, int64_t hi_ns) {
    uint64_t head = atomic_load(&dev->ring_head);
    uint64_t n = head < MOCK_RING ? head : MOCK_RING;
    int64_t busy = 0;
    int older = 0;
    for (uint64_t k = 1; k <= n && older < SCAN_SLACK; k++) {
        uint64_t idx = head - k;
        const struct mock_interval *e = &dev->ring[idx % MOCK_RING];
        if (atomic_load_explicit(&e->seq, memory_order_acquire) != idx + 1) continue;
        if (e->end_ns <= lo_ns) {
            older++;
            continue;
        }
        older = 0;
        if (pid != 0 && e->pid != pid) continue;
        int64_t s = e->start_ns > lo_ns ? e->start_ns : lo_ns;
        int64_t t = e->end_ns < hi_ns ? e->end_ns : hi_ns;
        if (t > s) busy += t - s;
    }
    return busy;
}

int mock_busy_pids(const struct mock_device *dev, int64_t lo_ns, int64_t hi_ns, int32_t *pids,
                   int max_pids) {
    uint64_t head = atomic_load(&dev->ring_head);
    uint64_t n = head < MOCK_RING ? head : MOCK_RING;
    int count = 0;
    int older = 0;
    for (uint64_t k = 1; k <= n && older < SCAN_SLACK; k++) {
        uint64_t idx = head - k;
        const struct mock_interval *e = &dev->ring[idx % MOCK_RING];
        if (atomic_load_explicit(&e->seq, memory_order_acquire) != idx + 1) continue;
        if (e->end_ns <= lo_ns) {
            older++;
            continue;
        }
        older = 0;
        if (e->start_ns >= hi_ns) continue;
        int seen = 0;
        for (int i = 0; i < count; i++) seen |= pids[i] == e->pid;
        if (!seen && count < max_pids) pids[count++] = e->pid;
    }
    return count;
}

/* ---- MIG: the lock, charges, geometry --------------------------------------- */

void mock_lock(struct mock_state *st) {
    int32_t me = mock_host_pid();
    for (unsigned int spin = 1;; spin++) {
        int32_t holder = 0;
        if (atomic_compare_exchange_weak(&st->lock, &holder, me)) return;
        /* a process killed inside a MIG call would hold it for ever */
        if (spin % 256 == 0 && holder != 0 && holder != me && pid_dead(holder))
            atomic_compare_exchange_strong(&st->lock, &holder, 0);
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 20000};
        nanosleep(&ts, NULL);
    }
}

void mock_unlock(struct mock_state *st) { atomic_store(&st->lock, 0); }

static int reserve(struct mock_device *d, uint64_t size) {
    uint64_t old = atomic_load(&d->used_bytes);
    do {
        if (size > d->total_bytes || old > d->total_bytes - size) return 0;
    } while (!atomic_compare_exchange_weak(&d->used_bytes, &old, old + size));
    return 1;
}

int mock_charge(struct mock_state *st, unsigned int slot, uint64_t serial, uint64_t size) {
    struct mock_device *d = &st->devices[slot];
    if (!reserve(d, size)) return 0;
    int gpu = -1;
    if (slot >= st->device_count) {
        /* A MIG device being destroyed takes no more: the destroyer clears
         * ci_serial before it reads used_bytes, a charger reads ci_serial after
         * it raised used_bytes, so one of them sees the other. */
        if (atomic_load(&d->ci_serial) != serial) {
            atomic_fetch_sub(&d->used_bytes, size);
            return 0;
        }
        gpu = (int)d->parent;
        if (!reserve(&st->devices[gpu], size)) {
            atomic_fetch_sub(&d->used_bytes, size);
            return 0;
        }
    }
    struct mock_proc *self = mock_state_self();
    if (self != NULL) {
        atomic_fetch_add(&self->used_bytes[slot], size);
        if (gpu >= 0) atomic_fetch_add(&self->used_bytes[gpu], size);
    }
    return 1;
}

void mock_credit(struct mock_state *st, unsigned int slot, uint64_t size) {
    struct mock_device *d = &st->devices[slot];
    int gpu = slot >= st->device_count ? (int)d->parent : -1;
    atomic_fetch_sub(&d->used_bytes, size);
    if (gpu >= 0) atomic_fetch_sub(&st->devices[gpu].used_bytes, size);
    struct mock_proc *self = mock_state_self();
    if (self != NULL) {
        atomic_fetch_sub(&self->used_bytes[slot], size);
        if (gpu >= 0) atomic_fetch_sub(&self->used_bytes[gpu], size);
    }
}

/* The profile ids are NVML's: 1g = NVML_GPU_INSTANCE_PROFILE_1_SLICE, the
 * double-memory 1g = _1_SLICE_REV2, 2g = _2_SLICE, 3g = _3_SLICE, 4g =
 * _4_SLICE, 7g = _7_SLICE.  starts: bit s set when the profile may start at
 * memory slice s (libshared/migs.py). */
#define EIGHT_SLOTS(one, two, four, all)                                            \
    {                                                                               \
        {NVML_GPU_INSTANCE_PROFILE_1_SLICE, "1g." #one "gb", 1, 1, one, 0x7f},      \
        {NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, "1g." #two "gb", 1, 2, two, 0x55}, \
        {NVML_GPU_INSTANCE_PROFILE_2_SLICE, "2g." #two "gb", 2, 2, two, 0x15},      \
        {NVML_GPU_INSTANCE_PROFILE_3_SLICE, "3g." #four "gb", 3, 4, four, 0x11},    \
        {NVML_GPU_INSTANCE_PROFILE_4_SLICE, "4g." #four "gb", 4, 4, four, 0x01},    \
        {NVML_GPU_INSTANCE_PROFILE_7_SLICE, "7g." #all "gb", 7, 8, all, 0x01},      \
    }

static const struct mock_mig_profile A100_40GB[] = EIGHT_SLOTS(5, 10, 20, 40);
static const struct mock_mig_profile X100_80GB[] = EIGHT_SLOTS(10, 20, 40, 80);
static const struct mock_mig_profile H200_141GB[] = EIGHT_SLOTS(18, 35, 71, 141);
static const struct mock_mig_profile A30_24GB[] = {
    {NVML_GPU_INSTANCE_PROFILE_1_SLICE, "1g.6gb", 1, 1, 6, 0x0f},
    {NVML_GPU_INSTANCE_PROFILE_2_SLICE, "2g.12gb", 2, 2, 12, 0x05},
    {NVML_GPU_INSTANCE_PROFILE_4_SLICE, "4g.24gb", 4, 4, 24, 0x01},
};

#define GEOMETRY(model, slots, table) {model, slots, sizeof table / sizeof table[0], table}
static const struct mock_mig_geometry G_A100_40GB = GEOMETRY("A100-40GB", 8, A100_40GB);
static const struct mock_mig_geometry G_A100_80GB = GEOMETRY("A100-80GB", 8, X100_80GB);
static const struct mock_mig_geometry G_H100_80GB = GEOMETRY("H100-80GB", 8, X100_80GB);
static const struct mock_mig_geometry G_H200_141GB = GEOMETRY("H200-141GB", 8, H200_141GB);
static const struct mock_mig_geometry G_A30_24GB = GEOMETRY("A30-24GB", 4, A30_24GB);

/* The first rule whose every word the upper-cased product name holds decides
 * (libshared/migs.py _RULES); H100 NVL has another layout, not tabled. */
static const struct {
    const char *words[2];
    const struct mock_mig_geometry *geometry;
} RULES[] = {
    {{"A100", "80GB"}, &G_A100_80GB}, {{"A100", NULL}, &G_A100_40GB},
    {{"A30", NULL}, &G_A30_24GB},     {{"H200", NULL}, &G_H200_141GB},
    {{"H100", "94GB"}, NULL},         {{"H100", "NVL"}, NULL},
    {{"H100", NULL}, &G_H100_80GB},
};

const struct mock_mig_geometry *mock_mig_geometry(const char *product) {
    char upper[MOCK_NAME_LEN];
    size_t n = 0;
    for (; product[n] != '\0' && n + 1 < sizeof upper; n++) {
        char c = product[n];
        upper[n] = c >= 'a' && c <= 'z' ? (char)(c - 'a' + 'A') : c;
    }
    upper[n] = '\0';
    for (size_t r = 0; r < sizeof RULES / sizeof RULES[0]; r++) {
        int all = 1;
        for (int w = 0; w < 2 && RULES[r].words[w] != NULL; w++)
            all &= strstr(upper, RULES[r].words[w]) != NULL;
        if (all) return RULES[r].geometry;
    }
    return NULL;
}

const struct mock_mig_profile *mock_mig_profile(const struct mock_mig_geometry *g, uint32_t id) {
    for (uint32_t i = 0; g != NULL && i < g->count; i++)
        if (g->profiles[i].id == id) return &g->profiles[i];
    return NULL;
}

const struct mock_mig_profile *mock_slot_profile(const struct mock_state *st, unsigned int slot) {
    if (slot < st->device_count || slot >= MOCK_MAX_DEVICES) return NULL;
    const struct mock_device *d = &st->devices[slot];
    if (atomic_load(&d->gi_serial) == 0 || d->parent >= st->device_count) return NULL;
    return mock_mig_profile(mock_mig_geometry(st->devices[d->parent].name), d->profile_id);
}

int mock_is_mig_device(const struct mock_state *st, unsigned int slot) {
    return slot >= st->device_count && slot < MOCK_MAX_DEVICES &&
           atomic_load(&st->devices[slot].ci_serial) != 0;
}

void mock_device_name(const struct mock_state *st, unsigned int slot, char *buf, size_t len) {
    if (len == 0) return;
    if (slot < st->device_count) {
        snprintf(buf, len, "%s", st->devices[slot].name);
        return;
    }
    const struct mock_mig_profile *p = mock_slot_profile(st, slot);
    const struct mock_device *d = &st->devices[slot];
    if (p == NULL) {
        buf[0] = '\0';
        return;
    }
    snprintf(buf, len, "%s MIG %s", st->devices[d->parent].name, p->name);
}

int mock_find_mig(const struct mock_state *st, const char *prefix) {
    size_t n = strlen(prefix);
    int found = -1;
    for (unsigned int i = st->device_count; i < MOCK_MAX_DEVICES; i++) {
        if (!mock_is_mig_device(st, i) || strncmp(st->devices[i].uuid, prefix, n) != 0) continue;
        if (found >= 0) return -1; /* ambiguous prefix */
        found = (int)i;
    }
    return found;
}
