/*
 * launch.c - kernel launches and the compute limiter.
 *
 * Every launch path - cuLaunchKernel, cuLaunchKernelEx, cooperative launches
 * and graph launches (HAMi#1445), each with its _ptsz twin - passes one gate.
 * With no compute cap the gate is a predictable branch plus a store of the
 * launch time into this process's slot (the node agent reads it to see which
 * containers are active).
 *
 * ---- Theory of operation (CUDA_DEVICE_SM_LIMIT=P) ----------------------------
 *
 * The cap is on device time: the container's kernels may keep the device busy
 * P% of wall-clock time.  Costs are device time, never grid sizes or SM counts,
 * so the cap means the same on every card (HAMi-core #274 derived its cost from
 * the SM count).
 *
 * 1. A token bucket of device time, shared by the container's processes
 *    through the shared cache.  It refills at P% of wall-clock time.  Credit
 *    is capped at P% of CREDIT_NS (an idle container saves up at most that for
 *    a burst) and debt at P% of 2 x WINDOW_NS, or one kernel when that is
 *    longer (the longest kernel timed lately, sm_max_cost_ns): whatever the
 *    estimates did, no process is kept busy more than about 2 x WINDOW_NS
 *    above its share, and no launch waits more than 2 x WINDOW_NS (a single
 *    kernel longer than P% of that makes its successor wait its length
 *    x (100 - P) / P, as it must).  Launches waiting for tokens go one after
 *    another in the order they began to wait (tickets: a process could lose
 *    turn after turn to whoever looked first), each paying its kernel before
 *    the next: with n waiting the debt kept is what lets the newest of them
 *    wait AIM_NS (1.75 s) in all, less n - 1 of the longest kernels
 *    (sm_waiting counts them), so the last of them too waits no more than
 *    2 x WINDOW_NS (with 4 processes switching to 50 ms kernels at 10 %, 3.45 s
 *    before; to 25 ms kernels now, 1.68 s at most in 60 runs).  A launch is
 *    admitted while the bucket is positive and is charged its learned cost.
 *
 * 2. The cost per launch is learned per kind of launch (function, grid, block
 *    and shared memory, or graph), from completed work, not from NVML, whose
 *    per-process utilisation is a rounded percent per sample period and reads
 *    0 for short kernels (HAMi-core's limiter starves them for that reason).
 *    Now and then a launch is timed: an event is recorded on its stream just
 *    before it and one just after, and once the second has completed,
 *    cuEventElapsedTime is the kernel's run time.  If the device had already
 *    passed the first event when the kernel was submitted (an idle stream),
 *    the host time between the starts of the two calls is subtracted, as the
 *    device spent it waiting for the host (a sample whose submission took
 *    the host over 50 us is unclear and skipped).  The estimate follows the
 *    median of the last three samples (an exponential average over about
 *    four), so the odd lengthened sample does not move it; a jump is point 4.
 *    A kind's first sample is provisional: a first launch is often slow, and n
 *    processes switching kernels at once queue theirs back to back, so that a
 *    first sample may hold several; the next sample replaces it, and the
 *    launches charged it are settled.  A sample is crowded when another launch
 *    of the container was admitted while it was being submitted: it is an
 *    upper bound, which may lower an estimate, not raise it (unless eight in a
 *    row are), nor raise the longest kernel (below).
 *    One cost for all of a process's launches was wrong for any real loop: on
 *    an H200, a 4096^2 matmul (2.7 ms) with a norm and a division (tens of us)
 *    got 19 % busy for a 30 % limit, in 2 s windows from 5 to 33 %, as the one
 *    estimate swung between the kinds; charged per kind, 29.4 to 29.9 %.  A
 *    kind not yet timed is charged the process's average cost per launch, and
 *    the difference is settled once its first launch is timed.  An idle
 *    stream's sample may lower a kind's estimate but not raise it while busy
 *    streams' samples come in (see below).
 *    Events time 1 us to 1 s kernels alike (their resolution is about 0.5 us
 *    on a real card, where an idle stream's sample also holds part of the
 *    launch call: short kernels are then overestimated, never under; on an
 *    H200, a Python loop of 8 us element-wise kernels, each on an idle stream,
 *    got 16 to 19 % busy for a 30 % limit).
 *
 * 3. A starting estimate that cannot starve: there is none.  A process's first
 *    launch is timed and charged nothing; its next launch waits until the
 *    first has completed and its cost is known.  One process of the container
 *    at a time does so (sm_first_pid); the others start from the cost it
 *    learned, with one launch in flight until they have timed their own.
 *
 * 4. Bounded in-flight work.  A wrong estimate (5 us kernels followed by 50 ms
 *    ones) would otherwise admit thousands of long kernels before any of them
 *    completed.  So (a) the launches that may be unconfirmed - admitted after
 *    the last timed launch known to have completed - are enough for P% of
 *    KNOWN_QUEUE_NS (2 ms) of estimated work: so few that the same kernels
 *    turned JUMP (1000) times longer would run no more than P% of
 *    2 x WINDOW_NS, and enough that a host stalling the launching thread for
 *    a millisecond or two does not leave the device idle (the switch bound
 *    below allows 36 launches at 90 %: 36 us of 1 us kernels).  While the
 *    cost of the work is in doubt, no more may follow than P% of QUEUE_NS of
 *    work, nor more than a switch to SWITCH_NS (50 ms) kernels could run for
 *    P% of 2 x WINDOW_NS.  The cost is in doubt until the process has timed a
 *    kernel, after a sample four times the estimate, and after a launch of a
 *    kind of kernel new to the process (function, grid, block and shared
 *    memory, or graph) until that launch is seen completing: a switch to
 *    other kernels is such a launch, so it queues few of them.  Either window
 *    is at least MIN_INFLIGHT, shared out among the container's processes
 *    that launched lately (one each at least).  A new kind's launch is timed,
 *    and a timed launch is made every quarter of the window (at most every
 *    PROBE_EVERY launches), so completion is seen continuously; (b) the
 *    container's queue is modelled (sm_queue_end_ns: each admitted launch adds
 *    its estimate), and when a timed launch is more than LATE_NS past its
 *    modelled end, no launch is admitted until it completes.  Two samples in a
 *    row four times the estimate are a new kind of work: the estimate jumps,
 *    and the launches admitted since the first at the old estimate are charged
 *    the difference, up to three quarters of the debt cap (what is admitted
 *    past that is forgiven, the price of the bound on waiting).  So a switch
 *    from short kernels to 50 ms ones queues at most about P% of 2 s of them;
 *    to longer ones, as many launches of them.  A kernel of a known kind
 *    that turns long (the same function and grid, given more work) is not
 *    told by its kind: up to JUMP times longer, the window of known work
 *    bounds it as above; a longer jump queues up to that window of launches
 *    before the late launch of (b) and the jump stop it.
 *
 * Launches into a stream being captured into a graph run nothing: they pass
 * uncharged and untimed (events would become graph nodes); the graph's launch
 * is charged.  Timing assumes the timed stream's order stands for the
 * process's work; a program spreading work over many streams is confirmed by
 * whichever stream completes, and on a card time-sliced with other containers
 * a sample also holds the other containers' slices, so the estimate errs
 * high (the share comes out low, never high).
 *
 * GPU_CORE_UTILIZATION_POLICY: disable ignores the cap; default applies it
 * for 0 < P < 100; force applies it for 0 < P <= 100 (HAMi-core #350: the
 * default policy must engage by itself).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hooks.h"

#define WINDOW_NS 1000000000LL   /* debt cap: P% of 2 x this; the bound on waits */
#define AIM_NS (7 * WINDOW_NS / 4) /* launches waiting together: the newest waits about this */
#define CREDIT_NS 100000000LL    /* credit cap: P% of this */
#define QUEUE_NS 10000000LL      /* unconfirmed work in doubt may be P% of this... */
#define SWITCH_NS 50000000LL     /* ...in at most P% of 2 x WINDOW_NS / this launches */
#define JUMP 1000                /* known work: P% of 2 x WINDOW_NS / JUMP of it */
#define KNOWN_QUEUE_NS (2 * WINDOW_NS / JUMP)
#define MIN_INFLIGHT 4           /* launches, whatever their cost */
#define LATE_NS 200000LL         /* a timed launch this late stops admission */
#define REFILL_NS 20000LL        /* least time between refills of the bucket */
#define UNTIMED_COST_NS 100000LL /* the estimate when the driver cannot time kernels */
#define MAX_HOST_GAP_NS 50000LL  /* a sample whose submission took longer is unclear */
#define PROBES 16                /* timed launches in flight per process and device */
#define YIELD_NS 250000LL        /* shorter waits yield instead of sleeping */
/* a waiter that has not looked for this long is gone; a live one looks every 2 ms
 * or less, but a loaded host may keep it off a core for tens of ms (at 20 ms, four
 * processes at 10 % lost turns to each other and a launch waited 3 s, not 2) */
#define STALE_WAITER_NS 100000000LL
#define ACTIVE_NS 5000000000LL   /* a process launched this lately shares the window */
#define ACTIVE_EVERY_NS 100000000LL
#define KINDS 256                /* kinds of kernel a process remembers, per device */
#define PROBE_EVERY 64           /* launches between timed launches, at most */

int vgpu_sm_active;
static uint32_t g_percent[VGPU_MAX_DEVICES]; /* 0 = not limited */

typedef CUresult (*event_create_fn)(CUevent *, unsigned int);
typedef CUresult (*event_record_fn)(CUevent, CUstream);
typedef CUresult (*event_query_fn)(CUevent);
typedef CUresult (*event_elapsed_fn)(float *, CUevent, CUevent);
typedef CUresult (*capturing_fn)(CUstream, CUstreamCaptureStatus *);
typedef CUresult (*event_destroy_fn)(CUevent);
static event_create_fn g_event_create;
static event_destroy_fn g_event_destroy;
static event_record_fn g_event_record;
static event_query_fn g_event_query;
static event_elapsed_fn g_event_elapsed;
static capturing_fn g_is_capturing;

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_ACQ_REL)

/* One timed launch: events a (before) and b (after) on its stream. */
struct probe {
    CUevent a, b;
    uint64_t seq;        /* the process's launch number */
    int64_t charged_ns;  /* what the launch was charged */
    int64_t admitted_ns; /* host clock at admission */
    int64_t expected_ns; /* modelled end of the container's work then */
    int64_t gap_ns;      /* host time between the calls recording a and launching */
    int armed;           /* b recorded: may be polled */
    int cancelled;       /* the launch failed: drop it */
    int idle;            /* the device had passed a before the launch */
    int crowded;         /* another launch of the container was admitted between a and
                            this one's submission: the sample may hold its kernel too */
    uint64_t launches;   /* the container's launches (sm_launches) with this one */
    uint64_t kind;       /* the kind launched, and its slot in struct local's kinds */
    unsigned slot;
    uint64_t kind_seq;   /* launches of that kind admitted before this one */
};

/* What a process knows of one kind of launch (point 2): its own cost, so that a
 * loop of a 3 ms matmul and 20 us element-wise kernels charges each its length. */
struct kind {
    uint64_t hash;        /* the kind (0: the slot is free) */
    int64_t cost_ns;      /* learned device time per launch; 0 = not yet timed */
    uint64_t launches;    /* launches of it admitted */
    int64_t recent[3];    /* its last samples */
    unsigned recent_at;
    int suspect;          /* its last sample was four times the estimate... */
    uint64_t suspect_from; /* ...and the launches of it admitted before that one */
    uint64_t guessed;     /* launches of it charged before its cost was known... */
    int64_t guessed_ns;   /* ...and what they were charged */
    unsigned idle_run;    /* idle-stream samples since its last busy-stream one */
    unsigned crowd_run;   /* crowded samples in a row */
    int provisional;      /* its cost is from its first sample, or crowded ones, only... */
    uint64_t provisional_n; /* ...and the launches charged at it... */
    int64_t provisional_ns; /* ...and what they were charged in all */
};

/* This process's view of one device (under g_lock). */
struct local {
    int64_t cost_ns;  /* device time per launch, the process's average over kinds;
                         0 = not yet known */
    uint64_t issued;  /* launches admitted */
    uint64_t confirmed;    /* launches known complete (up to a completed probe) */
    uint64_t last_probe;   /* launch number of the last timed launch */
    unsigned head, count;  /* ring of probes, oldest at head */
    struct probe ring[PROBES];
    CUevent spare[2 * PROBES];
    int spares;
    int unclear;          /* samples dropped in a row for a slow submission */
    int timed;            /* the process has timed a kernel of its own */
    int suspect;          /* a kind's last sample was four times its estimate... */
    unsigned suspect_slot; /* ...this kind's */
    struct kind kinds[KINDS]; /* kinds launched, by hash slot */
    int novel;             /* a launch of a new kind was made... */
    uint64_t novel_first;  /* ...the first of a run of them not yet confirmed */
    uint64_t novel_last;   /* ...and the last */
};
static struct local g_local[VGPU_MAX_DEVICES];
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;

/* What the gate tells the launch path to do after the real launch. */
struct ticket {
    struct probe *probe; /* record its second event, or NULL */
    CUstream stream;
    int dev;
    int outer; /* this launch passed the gate (and set t_in_launch) */
};
/* Set between the gate and the real launch's return: a driver whose launch
 * entry points call each other through exported symbols (the mock's _ptsz
 * variants do) must not be gated, charged and timed twice. */
static __thread int t_in_launch;

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
    g_event_create = (event_create_fn)vgpu_driver_symbol("cuEventCreate");
    g_event_record = (event_record_fn)vgpu_driver_symbol("cuEventRecord");
    g_event_query = (event_query_fn)vgpu_driver_symbol("cuEventQuery");
    g_event_elapsed = (event_elapsed_fn)vgpu_driver_symbol("cuEventElapsedTime");
    g_is_capturing = (capturing_fn)vgpu_driver_symbol("cuStreamIsCapturing");
    g_event_destroy = (event_destroy_fn)vgpu_driver_symbol("cuEventDestroy_v2");
    if (g_event_create == NULL || g_event_record == NULL || g_event_query == NULL ||
        g_event_elapsed == NULL) {
        vgpu_log(VGPU_LOG_ERROR, "compute limit: the driver cannot time kernels with events; "
                 "each launch is charged %lld us", UNTIMED_COST_NS / 1000);
        g_event_create = NULL;
    }
    for (int d = 0; d < VGPU_MAX_DEVICES; d++)
        if (g_percent[d] != 0)
            VGPU_LOG(VGPU_LOG_INFO, "device %d: compute limited to %u%%", d, g_percent[d]);
}

/* ---- the bucket (shared) ------------------------------------------------------------ */

static int64_t debt_cap(struct vgpu_cache_device *dev, int64_t percent) {
    int64_t cap = 2 * WINDOW_NS / 100 * percent, cost = LOAD(&dev->sm_max_cost_ns);
    return cost > cap ? cost : cap;
}

static int64_t g_active = 1; /* processes of the container that launched lately */

/* The debt the bucket may carry now.  Launches waiting for tokens are served one
 * after another, each paying its kernel before the next may go: with n of them
 * waiting, the last would wait the debt plus n - 1 kernels, on top of what it has
 * waited already (n processes switching to long kernels at once wait while their
 * first ones run back to back, before any is charged).  So the debt kept is what
 * lets the newest of them wait AIM_NS in all: P% of that, less n - 1 of the
 * longest kernels lately and P% of the time it has waited (at least one kernel,
 * at most the cap).  AIM_NS is below 2 x WINDOW_NS so that a host's scheduling
 * delays stay within it: no launch waits more than 2 x WINDOW_NS whatever the
 * number of processes, unless n kernels take longer than that at P% (4 x 50 ms
 * at 10 % is 2 s a turn).  n is bounded by the processes launching lately, as a
 * killed waiter leaves the count high. */
static int64_t debt_now(struct vgpu_cache_device *dev, int64_t percent, int64_t now) {
    int64_t cap = debt_cap(dev, percent), cost = LOAD(&dev->sm_max_cost_ns);
    int64_t waiting = (int64_t)LOAD(&dev->sm_waiting);
    if (waiting > g_active) waiting = g_active;
    if (waiting <= 1) return cap;
    int64_t waited = now - LOAD(&dev->sm_newest_wait_ns);
    if (waited < 0 || waited > AIM_NS) waited = waited < 0 ? 0 : AIM_NS;
    int64_t debt = (AIM_NS - waited) / 100 * percent - (waiting - 1) * cost;
    if (debt > cap) debt = cap;
    return debt > cost ? debt : cost;
}

/* Adds the time since the last refill at P% and clamps the bucket to its caps.
 * One process refills at a time (the one that moves sm_tick_ns). */
static void refill(struct vgpu_cache_device *dev, int64_t percent, int64_t now) {
    int64_t last = LOAD(&dev->sm_tick_ns);
    if (now - last < REFILL_NS ||
        !__atomic_compare_exchange_n(&dev->sm_tick_ns, &last, now, 0, __ATOMIC_ACQ_REL,
                                     __ATOMIC_ACQUIRE))
        return;
    if (last == 0) return; /* a new bucket starts empty: no burst at start */
    int64_t dt = now - last > WINDOW_NS ? WINDOW_NS : now - last;
    int64_t credit = CREDIT_NS / 100 * percent, debt = debt_now(dev, percent, now);
    int64_t old = LOAD(&dev->sm_tokens_ns), next;
    do {
        next = old + dt / 100 * percent;
        if (next > credit) next = credit;
        if (next < -debt) next = -debt;
    } while (!__atomic_compare_exchange_n(&dev->sm_tokens_ns, &old, next, 0, __ATOMIC_ACQ_REL,
                                          __ATOMIC_ACQUIRE));
}

static void charge(struct vgpu_cache_device *dev, int64_t ns) {
    if (ns == 0) return;
    ADD(&dev->sm_tokens_ns, -ns);
    ADD(&dev->sm_observed_ns, ns);
}

/* ---- timed launches (this process) ---------------------------------------------------- */

/* Processes of the container that launched lately (under g_lock): the
 * in-flight window is the container's, shared out among them. */
static int64_t g_active_at;

static void count_active(int64_t now) {
    if (now - g_active_at < ACTIVE_EVERY_NS) return;
    g_active_at = now;
    int64_t n = 0;
    for (int i = 0; i < VGPU_MAX_SLOTS; i++) {
        const struct vgpu_cache_slot *slot = &vgpu_cache->slots[i];
        if (LOAD(&slot->pid) > 0 &&
            now - __atomic_load_n(&slot->last_kernel_ns, __ATOMIC_RELAXED) < ACTIVE_NS)
            n++;
    }
    g_active = n > 0 ? n : 1;
}

/* Whether a launch of a kind new to the process is not yet seen completing. */
static int novel_pending(const struct local *l) {
    return l->novel && l->confirmed <= l->novel_last;
}

/* Whether the cost of the process's launches in flight is in doubt (point 4). */
static int in_doubt(const struct local *l) {
    return !l->timed || l->suspect || novel_pending(l);
}

/* Launches that may be unconfirmed: enough for P% of KNOWN_QUEUE_NS of work,
 * so a host late by a millisecond or two does not leave the device idle; while
 * the cost is in doubt, P% of QUEUE_NS but never so many that a switch to
 * SWITCH_NS kernels queues more than P% of 2 x WINDOW_NS. */
static int64_t inflight_launches(const struct local *l, int64_t percent) {
    if (!l->timed) return 1; /* until the process has timed a kernel of its own */
    int64_t n = KNOWN_QUEUE_NS / 100 * percent / l->cost_ns;
    if (in_doubt(l)) {
        int64_t most = 2 * WINDOW_NS / 100 * percent / SWITCH_NS;
        n = QUEUE_NS / 100 * percent / l->cost_ns;
        n = n < most ? n : most;
    }
    n = (n < MIN_INFLIGHT ? MIN_INFLIGHT : n) / g_active;
    return n < 1 ? 1 : n;
}

/* Launches that count against that window: since the last confirmation, or
 * after a new kind only those from its first launch on (the known work
 * queued before it had its own, larger window). */
static int64_t unconfirmed(const struct local *l) {
    uint64_t from = l->confirmed;
    if (!l->suspect && novel_pending(l) && l->novel_first > from) from = l->novel_first;
    return (int64_t)(l->issued - from);
}

/* Notes the kind of the launch about to be made; 1 if it is new to the
 * process (or was forgotten: a slot holds the last kind hashed to it). */
static int note_kind(struct local *l, uint64_t kind) {
    struct kind *k = &l->kinds[kind % KINDS];
    if (k->hash == kind) return 0;
    if (l->suspect && l->suspect_slot == kind % KINDS) l->suspect = 0;
    memset(k, 0, sizeof *k);
    k->hash = kind;
    if (!novel_pending(l)) l->novel_first = l->issued;
    l->novel = 1;
    l->novel_last = l->issued;
    return 1;
}

static struct probe *oldest(struct local *l) {
    return l->count == 0 ? NULL : &l->ring[l->head];
}

static void forget_oldest(struct local *l) {
    struct probe *p = &l->ring[l->head];
    if (g_event_destroy != NULL) {
        g_event_destroy(p->a);
        g_event_destroy(p->b);
    }
    l->head = (l->head + 1) % PROBES;
    l->count--;
}

static void drop_oldest(struct local *l) {
    struct probe *p = &l->ring[l->head];
    if (l->spares + 2 <= 2 * PROBES) {
        l->spare[l->spares++] = p->a;
        l->spare[l->spares++] = p->b;
    }
    l->head = (l->head + 1) % PROBES;
    l->count--;
}

/* A difference between what launches were charged and what they cost, charged
 * (or given back), and the modelled queue lengthened by it.  At most three
 * quarters of the debt cap either way, so that with the time it took to tell,
 * paying it keeps the wait under twice the window.  Returns what was charged. */
static int64_t correct(struct vgpu_cache_device *dev, int64_t extra, int64_t now) {
    int64_t cap = 3 * debt_cap(dev, g_percent[dev - vgpu_cache->devices]) / 4;
    if (extra > cap) extra = cap;
    if (extra < -cap) extra = -cap;
    charge(dev, extra);
    if (extra <= 0) return extra;
    int64_t end = LOAD(&dev->sm_queue_end_ns);
    STORE(&dev->sm_queue_end_ns, (end > now ? end : now) + extra);
    return extra;
}

static void learn(struct vgpu_cache_device *dev, struct local *l, const struct probe *p,
                  int64_t sample, int64_t now) {
    struct kind *k = &l->kinds[p->slot];
    if (k->hash == p->kind) {
        /* an idle stream's sample also holds the device's start of the launch
         * (a few us on a real card, most of a short kernel's length): while
         * samples from a busy stream come in, it may lower the estimate only */
        if (!p->idle) k->idle_run = 0;
        else if (k->idle_run < 8) k->idle_run++;
        int64_t took = p->idle && k->idle_run < 8 && k->cost_ns > 0 && sample > k->cost_ns
                           ? k->cost_ns : sample;
        /* a crowded sample is this kernel and maybe others: an upper bound, which
         * says nothing new when above the estimate (a jump still shows; a run of
         * them is taken anyway) */
        if (!p->crowded) k->crowd_run = 0;
        else if (k->crowd_run < 8) k->crowd_run++;
        int crowded = p->crowded && k->crowd_run < 8;
        if (crowded && k->cost_ns > 0 && took > k->cost_ns && took <= 4 * k->cost_ns)
            took = k->cost_ns;
        if (k->cost_ns == 0) {
            /* its first sample: its launches so far were charged a guess (the
             * process's average, or nothing for the process's first launch) */
            k->cost_ns = took;
            k->recent[0] = k->recent[1] = k->recent[2] = took;
            k->recent_at = 3;
            int64_t extra = correct(dev, took * (int64_t)k->guessed - k->guessed_ns, now);
            k->provisional = 1;
            k->provisional_n = k->guessed;
            k->provisional_ns = k->guessed_ns + extra;
        } else if (k->provisional) {
            /* known from its first sample only, which may hold more than the
             * kernel: a first launch is often slow (module load, cold caches),
             * and n processes switching kernels at once queue theirs back to
             * back, so that a first sample holds up to n of them, told or not
             * (another process's launch admitted just before this one may be
             * submitted after its first event).  The next sample replaces the
             * estimate (a crowded one may only lower it), and what the
             * launches since were charged is settled */
            int64_t next = crowded && took > k->cost_ns ? k->cost_ns : took;
            int64_t settled = next * (int64_t)k->provisional_n - k->provisional_ns;
            settled = correct(dev, settled, now);
            k->cost_ns = next;
            k->recent[0] = k->recent[1] = k->recent[2] = next;
            k->provisional = crowded;
            /* still in doubt: settled against this estimate from now on */
            k->provisional_ns = k->provisional_ns + settled;
            if (!crowded) k->provisional_n = k->provisional_ns = 0;
        } else if (took > 4 * k->cost_ns) {
            /* one long sample may be the host or another context in the way: a
             * second in a row is a new kind of work.  The launches of this kind
             * admitted since the first at the old estimate most likely cost this
             * too */
            if (!k->suspect) {
                k->suspect = 1;
                k->suspect_from = p->kind_seq;
                l->suspect = 1;
                l->suspect_slot = p->slot;
                return;
            }
            correct(dev, (took - k->cost_ns) * (int64_t)(k->launches - k->suspect_from), now);
            k->cost_ns = took;
            k->recent[0] = k->recent[1] = k->recent[2] = took; /* the old length is over */
        } else {
            /* the median of the last three samples damps the odd sample that a
             * preempted host or a race with the queue lengthened */
            k->recent[k->recent_at++ % 3] = took;
            int64_t a = k->recent[0], b = k->recent[1], c = k->recent[2];
            int64_t median = a > b ? (b > c ? b : a > c ? c : a) : (a > c ? a : b > c ? c : b);
            if (k->recent_at < 3) median = took;
            k->cost_ns += (median - k->cost_ns) / 4;
            if (k->cost_ns < 1) k->cost_ns = 1;
        }
        k->guessed = 0;
        k->guessed_ns = 0;
        k->suspect = 0;
        if (l->suspect && l->suspect_slot == p->slot) l->suspect = 0;
    }
    if (!l->timed) l->cost_ns = sample; /* its first own sample */
    l->timed = 1;
    STORE(&dev->sm_cost_ns, l->cost_ns);
    /* the debt cap follows the longest kernel lately: it decays by a quarter a
     * sample, so one 1 s kernel does not keep the cap at 1 s for ever; a crowded
     * sample does not raise it (kept high, it would forgive the debt of n
     * processes waiting that this limit must keep, below) */
    int64_t top = LOAD(&dev->sm_max_cost_ns);
    if (sample > top && p->crowded && (k->hash != p->kind || k->crowd_run < 8)) sample = top;
    STORE(&dev->sm_max_cost_ns, sample > top ? sample : top - (top - sample) / 4);
    ADD(&dev->sm_samples, 1);
}

/* Takes in the timed launches that have completed, oldest first.  Unless
 * force, one is only polled once its modelled end has passed. */
static void reap(struct vgpu_cache_device *dev, struct local *l, int64_t now, int force) {
    struct probe *p;
    while ((p = oldest(l)) != NULL) {
        if (p->cancelled) {
            drop_oldest(l);
            continue;
        }
        if (!p->armed || (!force && now < p->expected_ns)) return;
        CUresult done = g_event_query(p->b);
        if (done == CUDA_ERROR_NOT_READY) return;
        if (done != CUDA_SUCCESS) {
            /* its context is gone (or the events were never valid there): it
             * confirms nothing and its events are not reused */
            forget_oldest(l);
            continue;
        }
        float ms = 0;
        if (g_event_elapsed(&ms, p->a, p->b) == CUDA_SUCCESS) {
            int64_t sample = (int64_t)((double)ms * 1e6);
            if (p->idle) sample -= p->gap_ns;
            if (sample < 1) sample = 1;
            /* a submission the host was slow to make may hold idle device time
             * that the sample cannot tell apart; a run of them is taken anyway */
            if (p->gap_ns <= MAX_HOST_GAP_NS || !l->timed || ++l->unclear >= 8) {
                l->unclear = 0;
                learn(dev, l, p, sample, now);
            }
        }
        if (p->seq + 1 > l->confirmed) l->confirmed = p->seq + 1;
        drop_oldest(l);
        force = 0;
    }
}

static int spare_event(struct local *l, CUevent *e) {
    if (l->spares > 0) {
        *e = l->spare[--l->spares];
        return 1;
    }
    return g_event_create(e, CU_EVENT_DEFAULT) == CUDA_SUCCESS;
}

/* Starts timing the launch about to be made: records the first event. */
static struct probe *arm(struct local *l, CUstream stream, int64_t charged, int64_t now,
                         int64_t expected) {
    if (l->count == PROBES) return NULL;
    struct probe *p = &l->ring[(l->head + l->count) % PROBES];
    if (!spare_event(l, &p->a)) return NULL;
    if (!spare_event(l, &p->b)) {
        l->spare[l->spares++] = p->a;
        return NULL;
    }
    p->gap_ns = vgpu_now_ns(); /* until the launch's submission, in gate() */
    if (g_event_record(p->a, stream) != CUDA_SUCCESS) {
        /* most likely events of another context: make new ones next time */
        if (g_event_destroy != NULL) {
            g_event_destroy(p->a);
            g_event_destroy(p->b);
        }
        return NULL;
    }
    p->idle = g_event_query(p->a) == CUDA_SUCCESS;
    p->seq = l->issued;
    p->charged_ns = charged;
    p->admitted_ns = now;
    p->expected_ns = expected;
    p->armed = 0;
    p->cancelled = 0;
    p->crowded = 0;
    l->last_probe = l->issued;
    l->count++;
    return p;
}

/* Waits below YIELD_NS yield the CPU rather than sleep: a sleep lasts at least
 * the timer slack (50 us), which is many short kernels. */
static void sleep_ns(int64_t ns) {
    if (ns < YIELD_NS) {
        sched_yield();
        return;
    }
    struct timespec ts = {.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* ---- the gate ------------------------------------------------------------------------ */

/* Whether this process, which knows no cost yet, may launch: one process at a
 * time times the container's first kernel (n processes starting together
 * would otherwise queue n uncharged kernels); the others start from the cost
 * it learned, one launch in flight until they have timed one of their own. */
static int first_kernel(struct vgpu_cache_device *dev, struct local *l, int64_t now) {
    int64_t known = LOAD(&dev->sm_cost_ns);
    if (known > 0) {
        l->cost_ns = known;
        return 1;
    }
    int32_t me = (int32_t)getpid(), owner = LOAD(&dev->sm_first_pid);
    if (owner != me && owner != 0 && now - LOAD(&dev->sm_first_seen_ns) < STALE_WAITER_NS)
        return 0;
    STORE(&dev->sm_first_pid, me);
    STORE(&dev->sm_first_seen_ns, now);
    return 1;
}

/* ---- the queue of launches waiting for tokens (shared) ---------------------------------
 *
 * First come, first served among the container's launches waiting for tokens:
 * whoever polled first when the bucket turned positive would otherwise win, and
 * a process could lose turn after turn of long kernels.  A waiting launch takes
 * a ticket (sm_ticket_next) and goes when its ticket is served
 * (sm_ticket_serving) and the bucket is positive; going, it serves the next.
 * The head of the queue says it is alive (sm_serving_seen_ns) each time it
 * looks while it waits for tokens; one silent for STALE_WAITER_NS (gone, kept
 * off a core, or waiting for something else: its own kernels to complete, or
 * another process to time the container's first kernel) is passed over by
 * whoever waits behind it, and when it comes back it goes as soon as the
 * bucket allows (it is older than every other waiter).  A launch that finds others waiting takes a ticket
 * even when the bucket is positive.  Tickets are compared by difference, so
 * they may wrap. */

/* Takes this launch's ticket; the head of an empty queue says it is alive at once,
 * so that nobody behind it takes it for stale. */
static uint32_t take_ticket(struct vgpu_cache_device *dev, int64_t now) {
    uint32_t ticket = ADD(&dev->sm_ticket_next, 1);
    STORE(&dev->sm_newest_wait_ns, now);
    if (ticket == LOAD(&dev->sm_ticket_serving)) STORE(&dev->sm_serving_seen_ns, now);
    return ticket;
}

/* Whether a launch must wait for others before it (holding a ticket, or not
 * yet), once the bucket is positive.  A head silent too long is passed over. */
static int in_line(struct vgpu_cache_device *dev, int holding, uint32_t ticket, int64_t now) {
    uint32_t serving = LOAD(&dev->sm_ticket_serving);
    int32_t ahead = holding ? (int32_t)(ticket - serving)
                            : (int32_t)(LOAD(&dev->sm_ticket_next) - serving);
    /* nobody waits, this launch is the head, or it was passed over */
    if (ahead <= 0) return 0;
    if (now - LOAD(&dev->sm_serving_seen_ns) >= STALE_WAITER_NS &&
        __atomic_compare_exchange_n(&dev->sm_ticket_serving, &serving, serving + 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        STORE(&dev->sm_serving_seen_ns, now); /* the next head has as long to show up */
    return 1;
}

/* A waiting launch goes: the next ticket is served (unless this one was passed over). */
static void served(struct vgpu_cache_device *dev, uint32_t ticket, int64_t now) {
    uint32_t mine = ticket;
    if (__atomic_compare_exchange_n(&dev->sm_ticket_serving, &mine, ticket + 1, 0,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        STORE(&dev->sm_serving_seen_ns, now);
}

static void gate(struct ticket *t, CUstream stream, uint64_t kind) {
    t->probe = NULL;
    t->outer = 0;
    if (t_in_launch) return;
    CUdevice d;
    if (vgpu_real_cuCtxGetDevice == NULL || vgpu_real_cuCtxGetDevice(&d) != CUDA_SUCCESS ||
        d < 0 || d >= VGPU_MAX_DEVICES || g_percent[d] == 0)
        return;
    CUstreamCaptureStatus capture = CU_STREAM_CAPTURE_STATUS_NONE;
    if (g_is_capturing != NULL && g_is_capturing(stream, &capture) == CUDA_SUCCESS &&
        capture != CU_STREAM_CAPTURE_STATUS_NONE)
        return; /* recorded into a graph, not run: the graph's launch pays */
    int64_t percent = g_percent[d];
    struct vgpu_cache_device *dev = &vgpu_cache->devices[d];
    struct local *l = &g_local[d];
    pthread_mutex_lock(&g_lock);
    if (g_event_create == NULL && l->cost_ns == 0) l->cost_ns = UNTIMED_COST_NS;
    int64_t now, waiting = 0; /* when this launch began to wait for tokens */
    uint32_t ticket = 0;      /* its place in the container's queue of waiting launches */
    for (;;) {
        now = vgpu_now_ns();
        refill(dev, percent, now);
        count_active(now);
        if (g_event_create != NULL) reap(dev, l, now, 0);
        int64_t tokens = LOAD(&dev->sm_tokens_ns);
        struct probe *p = oldest(l);
        int64_t wait = 0;
        if (l->cost_ns == 0 && !first_kernel(dev, l, now)) {
            wait = 1000000; /* another process is timing the container's first kernel */
        } else if (tokens <= 0 || in_line(dev, waiting != 0, ticket, now)) {
            if (waiting == 0) {
                waiting = now;
                ticket = take_ticket(dev, now);
                __atomic_fetch_add(&dev->sm_waiting, 1, __ATOMIC_ACQ_REL);
            } else if (ticket == LOAD(&dev->sm_ticket_serving)) {
                STORE(&dev->sm_serving_seen_ns, now); /* the head, alive */
            }
            wait = tokens <= 0 ? -tokens * 100 / percent + 1 : YIELD_NS;
        } else if (p != NULL && (unconfirmed(l) >= inflight_launches(l, percent) ||
                                 now > p->expected_ns + LATE_NS)) {
            /* too much unconfirmed work, or the oldest timed launch is late:
             * wait for it to complete */
            reap(dev, l, now, 1);
            if (oldest(l) == p) {
                int64_t until = p->expected_ns - now;
                int64_t overdue = (now - p->admitted_ns) / 8;
                wait = until > 0 ? until : overdue;
                if (wait < 2000) wait = 2000;
            }
        }
        if (wait == 0) break;
        pthread_mutex_unlock(&g_lock);
        sleep_ns(wait > 2000000 ? 2000000 : wait);
        pthread_mutex_lock(&g_lock);
    }
    if (waiting != 0) {
        __atomic_fetch_sub(&dev->sm_waiting, 1, __ATOMIC_ACQ_REL);
        served(dev, ticket, now);
    }
    /* a launch is charged its kind's cost; a kind not yet timed, the process's
     * average (corrected once it is timed) */
    int novel = note_kind(l, kind);
    struct kind *k = &l->kinds[kind % KINDS];
    int64_t cost = k->cost_ns > 0 ? k->cost_ns : l->cost_ns;
    if (k->cost_ns == 0) {
        k->guessed++;
        k->guessed_ns += cost;
    }
    uint64_t kind_seq = k->launches++;
    /* the process's average follows what its launches cost, over about 16 */
    if (l->timed) {
        l->cost_ns += (cost - l->cost_ns) / 16;
        if (l->cost_ns < 1) l->cost_ns = 1;
    }
    if (k->cost_ns > 0 && k->provisional) {
        k->provisional_n++;
        k->provisional_ns += k->cost_ns;
    }
    charge(dev, cost);
    uint64_t launches = ADD(&dev->sm_launches, 1) + 1;
    int64_t end = LOAD(&dev->sm_queue_end_ns);
    end = (end > now ? end : now) + cost;
    STORE(&dev->sm_queue_end_ns, end);
    /* time this launch if the cost is unknown, it is of a new kind, or a
     * quarter of the in-flight window has gone untimed, so that completions
     * confirm the window steadily */
    int64_t every = inflight_launches(l, percent) / 4;
    if (every > PROBE_EVERY) every = PROBE_EVERY;
    if (g_event_create != NULL &&
        (!l->timed || novel || (int64_t)(l->issued - l->last_probe) >= every))
        t->probe = arm(l, stream, cost, now, end);
    if (t->probe != NULL) {
        t->probe->kind = kind;
        t->probe->slot = kind % KINDS;
        t->probe->kind_seq = kind_seq;
        t->probe->launches = launches;
    }
    if (t->probe == NULL && l->count == 0) l->confirmed = l->issued; /* cannot confirm: trust */
    if (t->probe == NULL && l->cost_ns == 0) l->cost_ns = UNTIMED_COST_NS;
    l->issued++;
    t->dev = d;
    t->stream = stream;
    t->outer = t_in_launch = 1;
    pthread_mutex_unlock(&g_lock);
    /* both ends of the gap are taken as their calls begin, so the time from a
     * call's start to its submission cancels out */
    if (t->probe != NULL) t->probe->gap_ns = vgpu_now_ns() - t->probe->gap_ns;
}

/* After the real launch: finish timing it, or give back its charge if it failed. */
static void settle(struct ticket *t, CUresult r) {
    if (t->outer) t_in_launch = 0;
    struct probe *p = t->probe;
    if (p == NULL) return;
    pthread_mutex_lock(&g_lock);
    if (r == CUDA_SUCCESS && g_event_record(p->b, t->stream) == CUDA_SUCCESS) {
        p->armed = 1;
        p->crowded = LOAD(&vgpu_cache->devices[t->dev].sm_launches) != p->launches;
    } else {
        p->cancelled = 1;
        if (r != CUDA_SUCCESS) charge(&vgpu_cache->devices[t->dev], -p->charged_ns);
    }
    pthread_mutex_unlock(&g_lock);
}

/* ---- the launch paths ------------------------------------------------------------- */

/* A kind of launch: what is launched and its shape, hashed (never 0). */
static inline uint64_t mix(uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h * 0xbf58476d1ce4e5b9ULL;
}

static inline uint64_t kind_of(const void *what, unsigned gx, unsigned gy, unsigned gz,
                               unsigned bx, unsigned by, unsigned bz, unsigned shmem) {
    uint64_t h = mix((uint64_t)(uintptr_t)what, (uint64_t)gx << 32 | gy);
    h = mix(h, (uint64_t)gz << 32 | bx);
    h = mix(h, (uint64_t)by << 32 | bz);
    h = mix(h, shmem);
    h ^= h >> 31;
    return h != 0 ? h : 1;
}

static inline uint64_t config_kind(const CUlaunchConfig *c, CUfunction f) {
    if (c == NULL) return kind_of(f, 0, 0, 0, 0, 0, 0, 0);
    return kind_of(f, c->gridDimX, c->gridDimY, c->gridDimZ, c->blockDimX, c->blockDimY,
                   c->blockDimZ, c->sharedMemBytes);
}

/* Marks the launch in this process's slot (the node agent sees active
 * containers by it). */
static inline void mark_launched(void) {
    struct vgpu_cache_slot *s = vgpu_slot();
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME_COARSE, &ts);
    __atomic_store_n(&s->last_kernel_ns, (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec,
                     __ATOMIC_RELAXED);
    /* approximate under thread races: an atomic add would cost the hot path */
    __atomic_store_n(&s->launches, __atomic_load_n(&s->launches, __ATOMIC_RELAXED) + 1,
                     __ATOMIC_RELAXED);
}

/* The gate, then the mark; the kind is hashed only under a limit, so the
 * unlimited path pays nothing for it. */
#define BEFORE_LAUNCH(t, stream, kind)                                                             \
    do {                                                                                           \
        vgpu_init();                                                                               \
        if (UNLIKELY(vgpu_sm_active)) gate(&(t), (stream), (kind));                                \
        mark_launched();                                                                           \
    } while (0)

static inline CUresult after_launch(struct ticket *t, CUresult r) {
    if (UNLIKELY(vgpu_sm_active)) settle(t, r);
    return r;
}

/* The _ptsz variants' null stream is the calling thread's default stream; the
 * events that time their kernels must go to the same one. */
static inline CUstream per_thread(CUstream stream) {
    return stream == NULL ? CU_STREAM_PER_THREAD : stream;
}

static inline CUstream config_stream(const CUlaunchConfig *config) {
    return config != NULL ? config->hStream : NULL;
}

#define NO_DRIVER(fn)                                                                              \
    if (UNLIKELY(vgpu_real_##fn == NULL)) return after_launch(&t, CUDA_ERROR_NOT_FOUND)

VGPU_API CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                 unsigned int bx, unsigned int by, unsigned int bz,
                                 unsigned int shmem, CUstream stream, void **params, void **extra) {
    struct ticket t;
    BEFORE_LAUNCH(t, stream, kind_of(f, gx, gy, gz, bx, by, bz, shmem));
    NO_DRIVER(cuLaunchKernel);
    return after_launch(
        &t, vgpu_real_cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, stream, params, extra));
}

VGPU_API CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy,
                                      unsigned int gz, unsigned int bx, unsigned int by,
                                      unsigned int bz, unsigned int shmem, CUstream stream,
                                      void **params, void **extra) {
    struct ticket t;
    BEFORE_LAUNCH(t, per_thread(stream), kind_of(f, gx, gy, gz, bx, by, bz, shmem));
    NO_DRIVER(cuLaunchKernel_ptsz);
    return after_launch(&t, vgpu_real_cuLaunchKernel_ptsz(f, gx, gy, gz, bx, by, bz, shmem, stream,
                                                          params, extra));
}

VGPU_API CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params,
                                   void **extra) {
    struct ticket t;
    BEFORE_LAUNCH(t, config_stream(config), config_kind(config, f));
    NO_DRIVER(cuLaunchKernelEx);
    return after_launch(&t, vgpu_real_cuLaunchKernelEx(config, f, params, extra));
}

VGPU_API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **params,
                                        void **extra) {
    struct ticket t;
    BEFORE_LAUNCH(t, per_thread(config_stream(config)), config_kind(config, f));
    NO_DRIVER(cuLaunchKernelEx_ptsz);
    return after_launch(&t, vgpu_real_cuLaunchKernelEx_ptsz(config, f, params, extra));
}

VGPU_API CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gx, unsigned int gy,
                                            unsigned int gz, unsigned int bx, unsigned int by,
                                            unsigned int bz, unsigned int shmem, CUstream stream,
                                            void **params) {
    struct ticket t;
    BEFORE_LAUNCH(t, stream, kind_of(f, gx, gy, gz, bx, by, bz, shmem));
    NO_DRIVER(cuLaunchCooperativeKernel);
    return after_launch(&t, vgpu_real_cuLaunchCooperativeKernel(f, gx, gy, gz, bx, by, bz, shmem,
                                                                stream, params));
}

VGPU_API CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy,
                                                 unsigned int gz, unsigned int bx, unsigned int by,
                                                 unsigned int bz, unsigned int shmem,
                                                 CUstream stream, void **params) {
    struct ticket t;
    BEFORE_LAUNCH(t, per_thread(stream), kind_of(f, gx, gy, gz, bx, by, bz, shmem));
    NO_DRIVER(cuLaunchCooperativeKernel_ptsz);
    return after_launch(&t, vgpu_real_cuLaunchCooperativeKernel_ptsz(f, gx, gy, gz, bx, by, bz,
                                                                     shmem, stream, params));
}

VGPU_API CUresult cuGraphLaunch(CUgraphExec graph, CUstream stream) {
    struct ticket t;
    BEFORE_LAUNCH(t, stream, kind_of(graph, 0, 0, 0, 0, 0, 0, 0));
    NO_DRIVER(cuGraphLaunch);
    CUresult r = after_launch(&t, vgpu_real_cuGraphLaunch(graph, stream));
    vgpu_graph_launched(); /* its memory nodes may have grown the graph memory pool */
    return r;
}

VGPU_API CUresult cuGraphLaunch_ptsz(CUgraphExec graph, CUstream stream) {
    struct ticket t;
    BEFORE_LAUNCH(t, per_thread(stream), kind_of(graph, 0, 0, 0, 0, 0, 0, 0));
    NO_DRIVER(cuGraphLaunch_ptsz);
    CUresult r = after_launch(&t, vgpu_real_cuGraphLaunch_ptsz(graph, stream));
    vgpu_graph_launched(); /* its memory nodes may have grown the graph memory pool */
    return r;
}
