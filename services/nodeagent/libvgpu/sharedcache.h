/*
 * sharedcache.h - layout of the shared cache file, version 2.
 *
 * One file per container ($CUDA_DEVICE_MEMORY_SHARED_CACHE), mmap'd by every
 * process of the container that loads libvgpu and read by the node agent
 * (services/nodeagent/core/sharedcaches.py decodes exactly this layout; keep
 * the two and LAYOUT.md in step).  Little-endian, naturally aligned, no
 * implicit padding:
 *
 *   offset 0                     struct vgpu_cache_header   (64 bytes)
 *   offset 64                    struct vgpu_cache_device   x VGPU_MAX_DEVICES (128 bytes each)
 *   offset 64 + 16 * 128 = 2112  struct vgpu_cache_account  x VGPU_MAX_DEVICES (16 bytes each)
 *   offset 2112 + 16 * 16 = 2368 struct vgpu_cache_slot     x VGPU_MAX_SLOTS   (352 bytes each)
 *   total 2368 + 1024 * 352 = 362816 bytes
 *
 * Each charge lands exactly once, however its process ends: a device's
 * account (bytes used, tag of the last change) and a process's ledger entry
 * (bytes charged, tag of the last change) are each one 16-byte word changed
 * by a 16-byte compare-and-swap, and a process writes the change it is making
 * into its slot's journal before it moves the account, so whoever next
 * touches that account finishes a change whose process died between the two
 * steps.  No lock is held across processes.  The protocol is in
 * sharedcache.c and LAYOUT.md.  magic is written last when a file is
 * created, so a reader that sees it sees a complete header.
 */
#ifndef VSLICE_SHAREDCACHE_H
#define VSLICE_SHAREDCACHE_H

#include <stdint.h>

#define VGPU_CACHE_MAGIC 0x434c5356U /* "VSLC" */
#define VGPU_CACHE_VERSION 2U
#define VGPU_MAX_DEVICES 16
#define VGPU_MAX_SLOTS 1024

/* GPU_CORE_UTILIZATION_POLICY values as stored in the header. */
enum { VGPU_POLICY_DEFAULT = 0, VGPU_POLICY_FORCE = 1, VGPU_POLICY_DISABLE = 2 };

struct vgpu_cache_header {
    uint32_t magic;        /* VGPU_CACHE_MAGIC once the file is complete */
    uint32_t version;      /* VGPU_CACHE_VERSION */
    uint32_t header_bytes; /* sizeof(struct vgpu_cache_header) */
    uint32_t device_count; /* entries in the device table: VGPU_MAX_DEVICES */
    uint32_t slot_count;   /* entries in the slot table: VGPU_MAX_SLOTS */
    uint32_t device_bytes; /* sizeof(struct vgpu_cache_device) */
    uint32_t slot_bytes;   /* sizeof(struct vgpu_cache_slot) */
    uint32_t sm_policy;    /* VGPU_POLICY_*, from the creating process's env */
    int32_t creator_pid;   /* the process whose env set the limits */
    uint32_t reserved0;
    int64_t created_ns;    /* CLOCK_REALTIME, nanoseconds */
    uint8_t reserved[16];
};

struct vgpu_cache_device {
    uint64_t limit_bytes;      /* memory cap; 0 = no cap */
    uint64_t reserved1;        /* version 1's used_bytes: now in struct vgpu_cache_account */
    uint32_t sm_limit_percent; /* compute cap, percent; 0 = none */
    uint32_t reserved0;
    /* compute limiter state, shared so the cap holds for the container (launch.c) */
    int64_t sm_tick_ns;       /* CLOCK_REALTIME of the last refill of the bucket, ns */
    int64_t sm_tokens_ns;     /* device time the container may still queue, ns (< 0: debt) */
    int64_t sm_queue_end_ns;  /* when the work admitted so far should end, CLOCK_REALTIME ns */
    int64_t sm_max_cost_ns;   /* largest per-launch cost learned lately (sets the debt cap) */
    int64_t sm_cost_ns;       /* the last per-launch cost a process learned, ns */
    uint64_t sm_launches;     /* launches through the limiter, all processes */
    uint64_t sm_samples;      /* kernels timed with events, all processes */
    uint32_t sm_ticket_next;  /* launches waiting for tokens take tickets in turn... */
    uint32_t sm_ticket_serving; /* ...and go in that order: the ticket at the head now */
    int64_t sm_serving_seen_ns; /* when the head's launch last looked (a dead one goes stale) */
    int64_t sm_observed_ns;   /* device time charged to the container, from timed kernels, ns */
    int32_t sm_first_pid;     /* the process timing the container's first kernel */
    uint32_t sm_waiting;      /* launches waiting for tokens now, all processes (a killed
                                 waiter leaves it high: read it bounded, launch.c) */
    int64_t sm_first_seen_ns; /* when it last looked (a dead one goes stale) */
    int64_t sm_newest_wait_ns; /* when the newest launch waiting for tokens began to wait */
};

/* A 16-byte word changed only by a 16-byte compare-and-swap: a count of bytes
 * and the tag of the change that set it.  A tag is (slot index + 1) << 48 |
 * that slot's op_seq: unique for the life of the file, so a word never
 * returns to an earlier value. */
struct vgpu_cache_counter {
    uint64_t bytes;
    uint64_t tag; /* 0 = never changed */
} __attribute__((aligned(16)));

/* A device's account: bytes charged by all processes of the container. */
struct vgpu_cache_account {
    struct vgpu_cache_counter used;
};

/* The one change a process has in flight: written before the account moves,
 * so another process can finish it (apply it to the target's ledger). */
struct vgpu_cache_op {
    uint64_t tag;       /* 0 while being written */
    uint32_t target;    /* slot whose ledger changes */
    uint32_t device;
    int64_t delta;      /* bytes: > 0 charge, < 0 credit */
    struct {
        uint64_t bytes;
        uint64_t tag;
    } before;           /* the target ledger entry the change starts from */
};

struct vgpu_cache_slot {
    int32_t pid;            /* 0 = free */
    uint32_t generation;    /* bumped on every claim; pid and generation are one 8-byte word */
    uint64_t start_ticks;   /* /proc/<pid>/stat starttime, to tell a reused pid */
    int64_t last_kernel_ns; /* CLOCK_REALTIME of the last launch, ~4 ms resolution */
    uint64_t launches;      /* kernel launches (approximate under thread races) */
    uint64_t op_seq;        /* last sequence number this slot's tags used */
    uint64_t reserved0;
    struct vgpu_cache_op op;
    uint64_t reserved1;
    struct vgpu_cache_counter charged[VGPU_MAX_DEVICES]; /* the process's ledger */
};

struct vgpu_cache {
    struct vgpu_cache_header header;
    struct vgpu_cache_device devices[VGPU_MAX_DEVICES];
    struct vgpu_cache_account accounts[VGPU_MAX_DEVICES];
    struct vgpu_cache_slot slots[VGPU_MAX_SLOTS];
};

/* The bytes charged on device d by all processes of the container. */
#define VGPU_CACHE_USED(c, d) ((c)->accounts[(d)].used.bytes)

_Static_assert(sizeof(struct vgpu_cache_header) == 64, "header layout");
_Static_assert(sizeof(struct vgpu_cache_device) == 128, "device layout");
_Static_assert(sizeof(struct vgpu_cache_account) == 16, "account layout");
_Static_assert(sizeof(struct vgpu_cache_op) == 40, "op layout");
_Static_assert(sizeof(struct vgpu_cache_slot) == 352, "slot layout");
_Static_assert(__builtin_offsetof(struct vgpu_cache_slot, op) == 48, "slot layout");
_Static_assert(__builtin_offsetof(struct vgpu_cache_slot, charged) == 96, "slot layout");
_Static_assert(__builtin_offsetof(struct vgpu_cache, accounts) == 2112, "file layout");
_Static_assert(__builtin_offsetof(struct vgpu_cache, slots) == 2368, "file layout");
_Static_assert(sizeof(struct vgpu_cache) == 362816, "file layout");

#endif
