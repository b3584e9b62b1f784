/*
 * sharedcache.c - the container's accounting file (layout: sharedcache.h).
 *
 * Exactly-once accounting without a lock between processes.
 *
 * Every change of a charge moves two 16-byte words: the device's account
 * (bytes used by the container, tag of the last change) and one ledger entry
 * of a slot (bytes charged by that process, tag of the last change).  A
 * change is made by the process that owns a slot, and goes:
 *
 *   1. finish the account's last change if its process did not (help);
 *   2. read the target ledger entry, check the target slot is still the one
 *      meant (pid and generation), compute the change (a charge that would
 *      pass the cap is refused here);
 *   3. write the change (target, device, delta, the ledger entry it starts
 *      from, a fresh tag) into this process's journal, in its own slot;
 *   4. compare-and-swap the account from what was read to (used + delta, tag):
 *      if anything changed the account since 1, start again;
 *   5. compare-and-swap the ledger entry from what was read to
 *      (charged + delta, tag); if that fails, a helper already did it.
 *
 * Every change of a ledger entry on device d passes through step 4 on d's
 * account, so while the account carries tag T no other change of any entry
 * on d can have happened since T; and tags never repeat, so step 5 (and a
 * helper's step 5) applies a change at most once.  A process killed at any
 * instruction leaves either nothing (before 4), or an account that names its
 * journal (after 4), which the next change on that device, or the reclaim of
 * the dead slot, applies first.  A process stopped at any instruction (SIGSTOP,
 * a hang) blocks nobody: its compare-and-swap fails when it resumes, and it
 * starts again.
 *
 * A process's own charges are given back exactly once, by its free or by its
 * end, whichever comes first: the exit destructor drains the slot and closes
 * this process's accounting, so a free after it (a thread still running, the
 * destructor of a library unloaded later) finds nothing to credit; a forked
 * child or an exec'd image owns another slot (or a new generation of this
 * one), so an allocation charged before the fork or exec is never credited by
 * them.  A dead process's slot (SIGKILL, or an exec that replaced it) is
 * drained by any live process that notices - at attach, before refusing an
 * allocation, and on cuMemGetInfo - with the same protocol, so two processes
 * draining the same slot at once give each byte back once.
 *
 * HAMi-core's global lock cost 12.7 ms per allocation under contention, and a
 * lock held by a killed or stopped process blocked the container (HAMi#2500,
 * HAMi-core #86, #273); here the only locks are this process's own mutexes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "vgpu.h"

struct vgpu_cache *vgpu_cache;
static uint64_t g_limit[VGPU_MAX_DEVICES];   /* copied from the file: fixed once created */
static struct vgpu_cache_slot *g_slot;       /* this process's slot; NULL until claimed */
static int g_index = -1;                     /* its index */
static uint64_t g_owner;                     /* VGPU_OWNER of this process's slot claim */
static int g_closed;                         /* the exit destructor has drained the slot */
static struct vgpu_cache_slot g_orphan_slot; /* when every slot is taken: launches only */
static int64_t g_full_check_ns;              /* last reclaim pass that read /proc */
static dev_t g_cache_dev;                    /* the file's device and inode, as */
static ino_t g_cache_ino;                    /* /proc/<pid>/maps shows a mapping of it */
/* One change in flight per process (its journal has room for one); also
 * guards the slot's claim and release. */
static pthread_mutex_t g_op_lock = PTHREAD_MUTEX_INITIALIZER;

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define TAG_SEQ_BITS 48
#define FULL_CHECK_NS 1000000000LL /* read /proc start times at most once a second */

/* ---- 16-byte words ----------------------------------------------------------- */

typedef unsigned __int128 u128;

static inline u128 pack(uint64_t bytes, uint64_t tag) { return (u128)tag << 64 | bytes; }
static inline uint64_t lo(u128 v) { return (uint64_t)v; }
static inline uint64_t hi(u128 v) { return (uint64_t)(v >> 64); }

#if defined(__x86_64__)
#define CAS16_TARGET __attribute__((target("cx16")))
#else
#define CAS16_TARGET
#endif

/* Returns what *p held; the swap happened iff that equals expected.  x86-64:
 * lock cmpxchg16b; aarch64: an exclusive pair or LSE casp.  Never a lock
 * (libatomic's fallback locks are private to a process). */
CAS16_TARGET static u128 cas16(struct vgpu_cache_counter *p, u128 expected, u128 desired) {
    return __sync_val_compare_and_swap((u128 *)(void *)p, expected, desired);
}

/* An atomic read of both halves (a compare-and-swap that changes nothing). */
static inline u128 load16(struct vgpu_cache_counter *p) { return cas16(p, 0, 0); }

/* Both halves read one after the other, without writing the line (an
 * account is the one word every process of the container changes): the
 * pair may be torn, which only makes the compare-and-swap that expects it
 * fail and start again. */
static inline u128 peek16(struct vgpu_cache_counter *p) {
    uint64_t tag = LOAD(&p->tag);
    return pack(LOAD(&p->bytes), tag);
}

/* ---- process liveness ------------------------------------------------------- */

/* starttime of pid from /proc/<pid>/stat, 0 if it cannot be read; *zombie is
 * set when the process has exited but is not yet reaped. */
static uint64_t start_ticks_of(int32_t pid, int *zombie) {
    char path[64], buf[1024];
    *zombie = 0;
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');
    if (p == NULL || p[1] == '\0') return 0;
    *zombie = p[2] == 'Z' || p[2] == 'X';
    /* starttime is field 22; field 3 follows the ')' of the command name */
    int field = 2;
    for (; *p != '\0' && field < 22; p++)
        if (*p == ' ') field++;
    return strtoull(p, NULL, 10);
}

/* Whether pid still maps the shared cache.  A libvgpu process maps it from
 * attach to exit; one that does not has exec'd into an image without
 * libvgpu.  1 when it cannot be told (another user's process). */
static int maps_cache(int32_t pid) {
    char path[64], buf[8192];
    snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || g_cache_ino == 0) {
        if (fd >= 0) close(fd);
        return 1;
    }
    char want[64];
    int want_len = snprintf(want, sizeof want, " %02x:%02x %llu ", major(g_cache_dev),
                            minor(g_cache_dev), (unsigned long long)g_cache_ino);
    int found = 0, readable = 0;
    size_t have = 0;
    for (;;) {
        ssize_t n = read(fd, buf + have, sizeof buf - 1 - have);
        if (n <= 0) break;
        readable = 1;
        have += (size_t)n;
        buf[have] = '\0';
        if (strstr(buf, want) != NULL) {
            found = 1;
            break;
        }
        /* keep the tail, in case a line is split between two reads */
        size_t keep = have > (size_t)want_len ? (size_t)want_len : have;
        memmove(buf, buf + have - keep, keep);
        have = keep;
    }
    close(fd);
    return found || !readable;
}

/* Whether the process that claimed slot s as pid is gone.  full: also read
 * /proc, to tell a reused pid, a zombie, and an exec into a program without
 * libvgpu (slower: at attach, and at most once a second otherwise). */
static int owner_dead(const struct vgpu_cache_slot *s, int32_t pid, int full) {
    if (pid == (int32_t)getpid()) return s != g_slot; /* an image this one exec'd over */
    if (kill(pid, 0) == -1 && errno == ESRCH) return 1;
    if (!full) return 0;
    int zombie;
    uint64_t recorded = LOAD(&s->start_ticks);
    uint64_t now = start_ticks_of(pid, &zombie);
    return zombie || (recorded != 0 && now != 0 && now != recorded) || !maps_cache(pid);
}

/* ---- the change protocol -------------------------------------------------------- */

static inline uint64_t slot_word(const struct vgpu_cache_slot *s) {
    return __atomic_load_n((const uint64_t *)(const void *)&s->pid, __ATOMIC_ACQUIRE);
}
static inline uint64_t make_word(int32_t pid, uint32_t generation) {
    return (uint64_t)generation << 32 | (uint32_t)pid;
}
static inline int cas_word(struct vgpu_cache_slot *s, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n((uint64_t *)(void *)&s->pid, &expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

/* Finishes the change tagged tag on device d if its process has not: applies
 * its journal to the target ledger entry, at most once (the entry moves only
 * from the value the change started from). */
static void help(int d, uint64_t tag) {
    uint64_t index = (tag >> TAG_SEQ_BITS) - 1;
    if (tag == 0 || index >= VGPU_MAX_SLOTS) return;
    struct vgpu_cache_op *op = &vgpu_cache->slots[index].op;
    if (LOAD(&op->tag) != tag) return; /* its process moved on: it was applied */
    uint32_t target = LOAD(&op->target);
    uint32_t device = LOAD(&op->device);
    int64_t delta = LOAD(&op->delta);
    uint64_t before_bytes = LOAD(&op->before.bytes);
    uint64_t before_tag = LOAD(&op->before.tag);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (LOAD(&op->tag) != tag || target >= VGPU_MAX_SLOTS || device != (uint32_t)d) return;
    cas16(&vgpu_cache->slots[target].charged[d], pack(before_bytes, before_tag),
          pack(before_bytes + (uint64_t)delta, tag));
}

enum change { CHARGE, CREDIT, DRAIN };
enum { DONE, REFUSED, GONE };

/*
 * One change of slot target's ledger entry on device d, and of d's account,
 * as described at the top.  want: bytes to charge (CHARGE, refused past
 * limit when limit != 0) or credit (CREDIT, at most what the entry holds);
 * DRAIN credits whatever the entry holds.  word: the target slot's pid and
 * generation the change is meant for (GONE when the slot no longer holds
 * them).  Caller holds g_op_lock and owns a slot (the journal).
 */
static int change(int target, uint64_t word, int d, enum change kind, uint64_t want,
                  uint64_t limit) {
    struct vgpu_cache_counter *account = &vgpu_cache->accounts[d].used;
    struct vgpu_cache_slot *t = &vgpu_cache->slots[target];
    struct vgpu_cache_op *op = &g_slot->op;
    for (;;) {
        u128 a = peek16(account);
        help(d, hi(a));
        u128 entry = load16(&t->charged[d]);
        if (slot_word(t) != word) return GONE;
        int64_t delta;
        if (kind == CHARGE) {
            if (limit != 0 && (want > limit || lo(a) > limit - want)) return REFUSED;
            delta = (int64_t)want;
        } else {
            uint64_t held = lo(entry);
            delta = -(int64_t)(kind == DRAIN || want > held ? held : want);
        }
        if (delta == 0) return DONE;
        uint64_t tag = (uint64_t)(g_index + 1) << TAG_SEQ_BITS |
                       (__atomic_add_fetch(&g_slot->op_seq, 1, __ATOMIC_ACQ_REL) &
                        ((1ULL << TAG_SEQ_BITS) - 1));
        __atomic_store_n(&op->tag, 0, __ATOMIC_SEQ_CST);
        STORE(&op->target, (uint32_t)target);
        STORE(&op->device, (uint32_t)d);
        STORE(&op->delta, delta);
        STORE(&op->before.bytes, lo(entry));
        STORE(&op->before.tag, hi(entry));
        __atomic_store_n(&op->tag, tag, __ATOMIC_SEQ_CST);
        /* a container's charge cannot go below zero, even in a file someone edited */
        uint64_t used = delta < 0 && lo(a) < (uint64_t)-delta ? 0 : lo(a) + (uint64_t)delta;
        if (cas16(account, a, pack(used, tag)) != a) continue;
        cas16(&t->charged[d], entry, pack(lo(entry) + (uint64_t)delta, tag));
        return DONE;
    }
}

/* Gives back every charge of a dead process's slot and frees it.  Any number
 * of processes may do this at once; each byte comes back once. */
static void drain_dead(int index, uint64_t word) {
    struct vgpu_cache_slot *s = &vgpu_cache->slots[index];
    for (int d = 0; d < VGPU_MAX_DEVICES; d++)
        if (change(index, word, d, DRAIN, 0, 0) == GONE) return;
    if (cas_word(s, word, make_word(0, (uint32_t)(word >> 32))))
        VGPU_LOG(VGPU_LOG_INFO, "reclaimed the shared-cache slot of dead process %d",
                 (int)(int32_t)word);
}

/* Whether slot s holds a charge on dev (on any device when dev < 0). */
static int holds_charge(struct vgpu_cache_slot *s, int dev) {
    for (int d = dev < 0 ? 0 : dev; d < (dev < 0 ? VGPU_MAX_DEVICES : dev + 1); d++)
        if (LOAD(&s->charged[d].bytes) != 0) return 1;
    return 0;
}

/* Drains the slots of dead processes; returns how many.  dev >= 0: only
 * slots holding a charge on dev (all that matter to a refused charge there),
 * dev == -1: slots holding any charge, dev == -2: every slot.  Caller holds
 * g_op_lock and owns a slot. */
static int reclaim_dead_locked(int full, int dev) {
    int reclaimed = 0;
    for (int i = 0; i < VGPU_MAX_SLOTS; i++) {
        struct vgpu_cache_slot *s = &vgpu_cache->slots[i];
        uint64_t word = slot_word(s);
        int32_t pid = (int32_t)word;
        if (pid <= 0 || s == g_slot || (dev > -2 && !holds_charge(s, dev)) ||
            !owner_dead(s, pid, full))
            continue;
        drain_dead(i, word);
        reclaimed++;
    }
    return reclaimed;
}

static int reclaim_dead(int dev) {
    int64_t now = vgpu_now_ns();
    int full = now - LOAD(&g_full_check_ns) >= FULL_CHECK_NS;
    if (full) STORE(&g_full_check_ns, now);
    pthread_mutex_lock(&g_op_lock);
    int n = g_slot != NULL && g_index >= 0 && !g_closed ? reclaim_dead_locked(full, dev) : 0;
    pthread_mutex_unlock(&g_op_lock);
    return n;
}

/* ---- slots -------------------------------------------------------------------- */

/* Claims a free slot, or adopts a dead process's (its charges then drain as
 * this process's own).  Caller holds g_op_lock. */
static void claim_slot_locked(void) {
    int32_t me = (int32_t)getpid();
    int zombie;
    uint64_t ticks = start_ticks_of(me, &zombie);
    for (int pass = 0; pass < 2 && g_slot == NULL; pass++) {
        for (int i = 0; i < VGPU_MAX_SLOTS; i++) {
            struct vgpu_cache_slot *s = &vgpu_cache->slots[i];
            uint64_t word = slot_word(s);
            int32_t pid = (int32_t)word;
            if (pid != 0 && (pass == 0 || pid < 0 || !owner_dead(s, pid, 1))) continue;
            if (!cas_word(s, word, make_word(me, (uint32_t)(word >> 32) + 1))) continue;
            STORE(&s->start_ticks, ticks);
            STORE(&s->last_kernel_ns, 0);
            STORE(&s->launches, 0);
            g_index = i;
            g_owner = VGPU_OWNER((uint64_t)i, (uint32_t)(word >> 32) + 1);
            STORE(&g_slot, s);
            /* a journal of the previous owner may name a change not yet applied:
             * finish every device's last change before this slot's journal is reused */
            for (int d = 0; d < VGPU_MAX_DEVICES; d++)
                help(d, hi(peek16(&vgpu_cache->accounts[d].used)));
            /* an adopted slot's charges belong to a dead process */
            uint64_t mine = slot_word(s);
            for (int d = 0; d < VGPU_MAX_DEVICES; d++) change(i, mine, d, DRAIN, 0, 0);
            return;
        }
    }
    vgpu_log(VGPU_LOG_ERROR,
             "all %d shared-cache slots are taken: this process's charges are made without "
             "a ledger and are not given back if it dies",
             VGPU_MAX_SLOTS);
    g_orphan_slot.pid = me;
    g_owner = VGPU_OWNER_ORPHAN;
    STORE(&g_slot, &g_orphan_slot);
}

struct vgpu_cache_slot *vgpu_slot(void) {
    struct vgpu_cache_slot *s = LOAD(&g_slot);
    if (LIKELY(s != NULL)) return s;
    pthread_mutex_lock(&g_op_lock);
    if (g_slot == NULL) claim_slot_locked();
    s = g_slot;
    pthread_mutex_unlock(&g_op_lock);
    return s;
}

/* The driver frees a process's memory when it exits; so does the slice.  A
 * free after this finds the accounting closed and credits nothing. */
__attribute__((destructor)) static void release_slot(void) {
    pthread_mutex_lock(&g_op_lock);
    struct vgpu_cache_slot *s = g_slot;
    if (s != NULL && g_index >= 0 && !g_closed) {
        uint64_t word = slot_word(s);
        for (int d = 0; d < VGPU_MAX_DEVICES; d++) change(g_index, word, d, DRAIN, 0, 0);
        cas_word(s, word, make_word(0, (uint32_t)(word >> 32)));
        /* launches from threads still running land in a private slot */
        g_orphan_slot.pid = (int32_t)getpid();
        g_index = -1;
        STORE(&g_slot, &g_orphan_slot);
    }
    g_closed = 1;
    pthread_mutex_unlock(&g_op_lock);
}

static void before_fork(void) { pthread_mutex_lock(&g_op_lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&g_op_lock); }
/* The child is another process: its charges go to a slot of its own, and the
 * parent's allocations it inherited are the parent's to give back. */
static void after_fork_child(void) {
    g_slot = NULL;
    g_index = -1;
    g_owner = 0;
    g_closed = 0;
    pthread_mutex_init(&g_op_lock, NULL);
}

__attribute__((constructor)) static void install_fork_handler(void) {
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

/* ---- attach ------------------------------------------------------------------ */

#define FILL(field, value) __atomic_compare_exchange_n(&(field), &(__typeof__(field)){0}, \
                                                        (value), 0, __ATOMIC_ACQ_REL,       \
                                                        __ATOMIC_ACQUIRE)

/* Fills a new file's header and limits.  Processes that find the file empty
 * at the same moment may all do this: each field is set only from zero, so
 * none overwrites a file already in use, and magic is set last. */
static void fill_new(struct vgpu_cache *c) {
    FILL(c->header.version, VGPU_CACHE_VERSION);
    FILL(c->header.header_bytes, (uint32_t)sizeof(struct vgpu_cache_header));
    FILL(c->header.device_count, (uint32_t)VGPU_MAX_DEVICES);
    FILL(c->header.slot_count, (uint32_t)VGPU_MAX_SLOTS);
    FILL(c->header.device_bytes, (uint32_t)sizeof(struct vgpu_cache_device));
    FILL(c->header.slot_bytes, (uint32_t)sizeof(struct vgpu_cache_slot));
    FILL(c->header.sm_policy, vgpu_cfg.sm_policy);
    FILL(c->header.creator_pid, (int32_t)getpid());
    FILL(c->header.created_ns, vgpu_now_ns());
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) {
        FILL(c->devices[d].limit_bytes, vgpu_cfg.limit_bytes[d]);
        FILL(c->devices[d].sm_limit_percent, vgpu_cfg.sm_limit_percent[d]);
    }
    FILL(c->header.magic, VGPU_CACHE_MAGIC);
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
}

/* Maps the file, creating it if needed.  No lock: a process holding the
 * file's flock (version 1's protocol) or stopped half way through this
 * cannot delay another. */
void vgpu_cache_attach(void) {
    int fd = open(vgpu_cfg.cache_path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    struct stat sb;
    void *m = MAP_FAILED;
    /* ftruncate only ever grows a short file with zeros, so racing creators agree */
    int known = fd >= 0 && fstat(fd, &sb) == 0;
    if (known) {
        g_cache_dev = sb.st_dev;
        g_cache_ino = sb.st_ino;
    }
    if (known &&
        ((size_t)sb.st_size >= sizeof(struct vgpu_cache) ||
         ftruncate(fd, sizeof(struct vgpu_cache)) == 0))
        m = mmap(NULL, sizeof(struct vgpu_cache), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int err = errno;
    if (fd >= 0) close(fd);
    if (m == MAP_FAILED) {
        use_private(strerror(err));
    } else {
        struct vgpu_cache *c = m;
        uint32_t magic = LOAD(&c->header.magic);
        if (magic == 0) {
            fill_new(c);
            VGPU_LOG(VGPU_LOG_INFO, "created shared cache %s", vgpu_cfg.cache_path);
        }
        if (LOAD(&c->header.magic) != VGPU_CACHE_MAGIC || !layout_matches(c)) {
            munmap(m, sizeof(struct vgpu_cache));
            use_private("not a version 2 vslice shared cache");
        } else {
            vgpu_cache = c;
            if (magic != 0) follow_file(c);
        }
    }
    for (int d = 0; d < VGPU_MAX_DEVICES; d++) g_limit[d] = vgpu_cache->devices[d].limit_bytes;
    vgpu_slot();
    STORE(&g_full_check_ns, vgpu_now_ns());
    pthread_mutex_lock(&g_op_lock);
    if (g_index >= 0) reclaim_dead_locked(1, -2);
    pthread_mutex_unlock(&g_op_lock);
}

/* ---- charging ----------------------------------------------------------------- */

/* Without a ledger (every slot taken): the account alone, tag unchanged. */
static int orphan_change(int dev, int64_t delta, uint64_t limit) {
    struct vgpu_cache_counter *account = &vgpu_cache->accounts[dev].used;
    for (;;) {
        u128 a = peek16(account);
        uint64_t used = lo(a);
        if (delta > 0 && limit != 0 && ((uint64_t)delta > limit || used > limit - (uint64_t)delta))
            return 0;
        uint64_t next = delta < 0 && used < (uint64_t)-delta ? 0 : used + (uint64_t)delta;
        if (cas16(account, a, pack(next, hi(a))) == a) return 1;
    }
}

static int charge_once(int dev, uint64_t bytes, uint64_t limit, uint64_t *owner) {
    pthread_mutex_lock(&g_op_lock);
    if (g_slot == NULL) claim_slot_locked();
    int r;
    if (g_closed) {
        r = REFUSED; /* the process is exiting: its accounting is closed */
    } else if (g_index < 0) {
        r = orphan_change(dev, (int64_t)bytes, limit) ? DONE : REFUSED;
    } else {
        r = change(g_index, slot_word(g_slot), dev, CHARGE, bytes, limit);
    }
    *owner = g_owner;
    pthread_mutex_unlock(&g_op_lock);
    return r;
}

uint64_t vgpu_charge(int dev, uint64_t bytes) {
    if (dev < 0 || dev >= VGPU_MAX_DEVICES || bytes == 0) return VGPU_OWNER_NONE;
    uint64_t limit = g_limit[dev], owner = 0;
    int r = charge_once(dev, bytes, limit, &owner);
    /* memory of processes that died without freeing belongs to nobody */
    if (r == REFUSED && !g_closed && bytes <= limit && reclaim_dead(dev) > 0)
        r = charge_once(dev, bytes, limit, &owner);
    return r == DONE ? owner : 0;
}

uint64_t vgpu_charge_taken(int dev, uint64_t bytes) {
    if (dev < 0 || dev >= VGPU_MAX_DEVICES || bytes == 0) return VGPU_OWNER_NONE;
    uint64_t owner = 0;
    return charge_once(dev, bytes, 0, &owner) == DONE ? owner : 0;
}

uint64_t vgpu_owner(void) {
    vgpu_slot();
    pthread_mutex_lock(&g_op_lock);
    uint64_t owner = g_closed ? 0 : g_owner;
    pthread_mutex_unlock(&g_op_lock);
    return owner;
}

void vgpu_credit(int dev, uint64_t bytes, uint64_t owner) {
    if (dev < 0 || dev >= VGPU_MAX_DEVICES || owner == VGPU_OWNER_NONE || owner == 0) return;
    pthread_mutex_lock(&g_op_lock);
    /* only the claim that charged it gives a charge back, and only while open:
     * after the exit destructor, in a forked child or after exec there is
     * nothing left to credit */
    if (!g_closed && owner == g_owner) {
        if (g_index >= 0)
            change(g_index, slot_word(g_slot), dev, CREDIT, bytes, 0);
        else
            orphan_change(dev, -(int64_t)bytes, 0);
    }
    pthread_mutex_unlock(&g_op_lock);
}

void vgpu_reclaim_dead(void) {
    if (vgpu_cache != NULL) reclaim_dead(-1);
}

uint64_t vgpu_used(int dev) {
    return dev >= 0 && dev < VGPU_MAX_DEVICES ? LOAD(&vgpu_cache->accounts[dev].used.bytes) : 0;
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
