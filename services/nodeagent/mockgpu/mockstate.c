/* mockstate.c - attach to, initialize and query the mock GPU's shared state. */
#define _GNU_SOURCE
#include "mockstate.h"

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

static void parse_devices(struct mock_state *st) {
    const char *spec = getenv("VSLICE_MOCKGPU_DEVICES");
    if (spec == NULL || *spec == '\0') spec = DEFAULT_DEVICES;
    char *copy = strdup(spec);
    if (copy == NULL) return;
    char *save = NULL;
    uint32_t n = 0;
    for (char *tok = strtok_r(copy, ",", &save); tok != NULL && n < MOCK_MAX_DEVICES;
         tok = strtok_r(NULL, ",", &save)) {
        char *colon = strrchr(tok, ':');
        if (colon == NULL) {
            fprintf(stderr, "mockgpu: ignoring device '%s' (want <uuid>:<memory_mib>)\n", tok);
            continue;
        }
        *colon = '\0';
        unsigned long long mib = strtoull(colon + 1, NULL, 10);
        struct mock_device *d = &st->devices[n++];
        snprintf(d->uuid, sizeof d->uuid, "%s", tok);
        d->total_bytes = mib << 20;
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
        for (uint32_t d = 0; d < st->device_count; d++) {
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
    struct stat sb;
    if (fstat(fd, &sb) == 0 && (size_t)sb.st_size < sizeof(struct mock_state) &&
        ftruncate(fd, sizeof(struct mock_state)) != 0) {
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
    if (st->magic != MOCK_STATE_MAGIC || st->version != MOCK_STATE_VERSION) {
        memset(st, 0, sizeof *st);
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
