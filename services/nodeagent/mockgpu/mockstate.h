/*
 * mockstate.h - the mock GPU's cross-process state.
 *
 * A real driver knows every process on the card; the mock's processes learn
 * about each other through one small mmap'd file, so that the physical total is
 * enforced across processes and mock NVML can report memory used and
 * utilization for all of them.  Path: $VSLICE_MOCKGPU_STATE, default
 * /tmp/vslice-mockgpu-<uid>.state.  Devices: $VSLICE_MOCKGPU_DEVICES,
 * "<uuid>:<memory_mib>[,...]", default one 16384 MiB device; every process
 * sharing a state file must use the same device list.
 */
#ifndef VSLICE_MOCKSTATE_H
#define VSLICE_MOCKSTATE_H

#include <stdatomic.h>
#include <stdint.h>

#define MOCK_STATE_MAGIC 0x4b434f4d47505576ULL
#define MOCK_STATE_VERSION 2U
#define MOCK_MAX_DEVICES 16
#define MOCK_MAX_PROCS 256
#define MOCK_RING 16384 /* kernel intervals remembered per device */
#define MOCK_XIDS 64     /* XID events remembered per device */

struct mock_interval {
    _Atomic uint64_t seq; /* ring index + 1 once the entry is complete */
    int64_t start_ns;     /* CLOCK_REALTIME */
    int64_t end_ns;
    int32_t pid;
    int32_t pad;
};

struct mock_device {
    char uuid[80];
    uint64_t total_bytes;
    _Atomic uint64_t used_bytes;
    _Atomic int64_t busy_until_ns; /* end of the last queued kernel */
    _Atomic uint64_t ring_head;    /* next ring index to fill */
    struct mock_interval ring[MOCK_RING];
};

struct mock_proc {
    _Atomic int32_t pid; /* 0 = free */
    int32_t pad;
    _Atomic uint64_t used_bytes[MOCK_MAX_DEVICES];
};

/* XID errors injected with vsliceMockInjectXid, delivered by mock NVML's
 * event sets: entry k of the ring holds the k-th XID (count is how many). */
struct mock_xids {
    _Atomic uint64_t count;
    uint64_t xid[MOCK_XIDS];
};

struct mock_state {
    uint64_t magic;
    uint32_t version;
    uint32_t device_count;
    struct mock_proc procs[MOCK_MAX_PROCS];
    struct mock_device devices[MOCK_MAX_DEVICES];
    struct mock_xids xids[MOCK_MAX_DEVICES];
};

/* The mapped state of this process, attached on first use; NULL if the file
 * cannot be opened (then every call fails with an initialization error). */
struct mock_state *mock_state_get(void);
/* This process's slot in the state, claimed on first use. */
struct mock_proc *mock_state_self(void);
int64_t mock_now_ns(void);
/* This process's pid as the host sees it, which a real driver reports in NVML
 * whatever PID namespace the process runs in: the first NSpid entry of
 * /proc/self/status (the host's pid when /proc is the host's, as under
 * `unshare -p -f` without a new /proc), else getpid(). */
int32_t mock_host_pid(void);
/* Give dead processes' device memory back to the card, as the real driver does
 * when a process exits (run on attach, and by NVML before it reports). */
void mock_reclaim_dead(struct mock_state *st);
/* Device busy time (ns) of pid (0 = every process) in [lo_ns, hi_ns). */
int64_t mock_busy_ns(const struct mock_device *dev, int32_t pid, int64_t lo_ns, int64_t hi_ns);
/* The pids that ran kernels on dev in [lo_ns, hi_ns); returns how many. */
int mock_busy_pids(const struct mock_device *dev, int64_t lo_ns, int64_t hi_ns, int32_t *pids,
                   int max_pids);

#endif
