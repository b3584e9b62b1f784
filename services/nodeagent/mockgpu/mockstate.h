/*
 * mockstate.h - the mock GPU's cross-process state.
 *
 * A real driver knows every process on the card; the mock's processes learn
 * about each other through one small mmap'd file, so that the physical total is
 * enforced across processes and mock NVML can report memory used and
 * utilization for all of them.  Path: $VSLICE_MOCKGPU_STATE, default
 * /tmp/vslice-mockgpu-<uid>.state.  Devices: $VSLICE_MOCKGPU_DEVICES,
 * "<uuid>:<memory_mib>[:<product name>[:mig]][,...]", default one 16384 MiB
 * device; every process sharing a state file must use the same device list.
 *
 * MIG: the GPU instances NVML creates live here too, so that every process
 * sees them.  Physical devices are devices[0, device_count); a GPU instance
 * takes a free slot of devices[device_count, MOCK_MAX_DEVICES), which carries
 * its memory (total and used), its kernel ring and, once it has its compute
 * instance, the MIG device's UUID: the per-process accounting, the dead
 * process reclaim and the kernel queue work on a MIG device as on a GPU.
 * Creating and destroying instances is serialized by mock_lock.
 */
#ifndef VSLICE_MOCKSTATE_H
#define VSLICE_MOCKSTATE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define MOCK_STATE_MAGIC 0x4b434f4d47505576ULL
#define MOCK_STATE_VERSION 3U
#define MOCK_MAX_GPUS 16    /* physical devices */
#define MOCK_MAX_DEVICES 64 /* physical devices and GPU instances together */
#define MOCK_NAME_LEN 64    /* product name, NUL included */
#define MOCK_DEFAULT_NAME "vslice mock GPU"
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
    char uuid[80]; /* a GPU's; a GPU instance's MIG UUID while it has a compute instance */
    char name[MOCK_NAME_LEN]; /* a GPU's product name */
    uint64_t total_bytes;
    _Atomic uint64_t used_bytes;
    _Atomic int64_t busy_until_ns; /* end of the last queued kernel */
    _Atomic uint64_t ring_head;    /* next ring index to fill */
    /* MIG on a GPU (mock_lock held to change them) */
    uint32_t mig_current; /* NVML_DEVICE_MIG_ENABLE or _DISABLE */
    uint32_t mig_pending;
    uint64_t mig_created; /* compute instances ever created here: part of MIG UUIDs */
    /* a GPU instance's slot: gi_serial 0 = free; fields below are written
     * before gi_serial is published and stay until the instance is destroyed */
    _Atomic uint64_t gi_serial;
    _Atomic uint64_t ci_serial; /* its compute instance (0 = none): a MIG device */
    uint32_t parent;            /* index of the GPU */
    uint32_t gi_id;             /* NVML GPU instance id, >= 1 */
    uint32_t profile_id;        /* NVML GPU instance profile id */
    uint32_t start;             /* placement: memory slices [start, start + size) */
    uint32_t size;
    uint32_t compute; /* compute slices */
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
    uint32_t device_count;     /* physical devices */
    _Atomic int32_t lock;      /* mock_lock: the holder's pid, 0 = free */
    uint32_t pad;
    _Atomic uint64_t serial;   /* last serial given to a GPU or compute instance */
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
/* Serialize changes to the MIG instances across processes (a spin lock in
 * the state; a holder that died is replaced).  Not recursive. */
void mock_lock(struct mock_state *st);
void mock_unlock(struct mock_state *st);

/* Charge size bytes to device slot for this process: a MIG device's charge
 * goes to its GPU as well, and fails unless the slot still holds the compute
 * instance `serial` names (0 for a GPU).  Returns 0 when it does not fit. */
int mock_charge(struct mock_state *st, unsigned int slot, uint64_t serial, uint64_t size);
/* Give back what mock_charge(st, slot, ...) took. */
void mock_credit(struct mock_state *st, unsigned int slot, uint64_t size);

/* ---- MIG geometry ----------------------------------------------------------
 * The GPU instance profiles of each MIG model, from the product name, with the
 * rules and table of libshared/migs.py (NVIDIA "Multi-Instance GPU User
 * Guide", "Supported MIG Profiles"); ids are NVML's profile ids. */
struct mock_mig_profile {
    uint32_t id;           /* NVML_GPU_INSTANCE_PROFILE_* */
    const char *name;      /* "1g.10gb" */
    uint32_t compute;      /* compute slices (the g) */
    uint32_t size;         /* memory slices taken */
    uint32_t memory_gb;    /* the name's GB: memory is memory_gb x 1024 MiB */
    uint32_t starts;       /* bit s: may start at memory slice s */
};

#define MOCK_SMS_PER_SLICE 14 /* multiprocessors per compute slice */

struct mock_mig_geometry {
    const char *model; /* "A100-40GB" */
    uint32_t slots;    /* memory slices */
    uint32_t count;
    const struct mock_mig_profile *profiles;
};

/* The geometry of a product name; NULL: no MIG. */
const struct mock_mig_geometry *mock_mig_geometry(const char *product);
/* Profile `id` of g; NULL: g has none. */
const struct mock_mig_profile *mock_mig_profile(const struct mock_mig_geometry *g, uint32_t id);
/* The profile of the GPU instance in slot (live, mock_lock or a serial check
 * guarding it); NULL if none. */
const struct mock_mig_profile *mock_slot_profile(const struct mock_state *st, unsigned int slot);
/* Whether slot holds a MIG device (a GPU instance with its compute instance). */
int mock_is_mig_device(const struct mock_state *st, unsigned int slot);
/* The name NVML and CUDA give device slot: a GPU's product name, a MIG
 * device's "<GPU's name> MIG <profile>". */
void mock_device_name(const struct mock_state *st, unsigned int slot, char *buf, size_t len);
/* The MIG device slot whose UUID starts with prefix; -1 if none or several. */
int mock_find_mig(const struct mock_state *st, const char *prefix);

/* Device busy time (ns) of pid (0 = every process) in [lo_ns, hi_ns). */
int64_t mock_busy_ns(const struct mock_device *dev, int32_t pid, int64_t lo_ns, int64_t hi_ns);
/* The pids that ran kernels on dev in [lo_ns, hi_ns); returns how many. */
int mock_busy_pids(const struct mock_device *dev, int64_t lo_ns, int64_t hi_ns, int32_t *pids,
                   int max_pids);

#endif
