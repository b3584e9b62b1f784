/*
 * killstress.c - SIGKILL at random instructions must never skew the shared cache.
 *
 *   killstress ITERATIONS WORKERS HOLD_BYTES SEED
 *
 * Holds HOLD_BYTES itself, then per iteration forks WORKERS processes whose
 * two threads each allocate and free random sizes (4 KiB .. 1 MiB, up to 8
 * live each) as fast as they can, kills them all with SIGKILL after a random 0..1.5 ms (every
 * other iteration first stops them all with SIGSTOP at that moment, allocates
 * and frees 1 MiB itself - finishing any change a stopped worker left half
 * done - and lets them run on for another random 0..0.5 ms), reaps
 * them, and has libvgpu reclaim the dead (an allocation that fits the
 * limit but not what is left is refused only after a reclaim).  Then the container's charge in the shared
 * cache ($CUDA_DEVICE_MEMORY_SHARED_CACHE) must equal what is really held:
 * HOLD_BYTES.  Prints "killstress iterations=N mismatches=M first_bad=B" with
 * B the charge seen at the first mismatch (0 if none).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../mockgpu/mockgpu.h"
#include "../sharedcache.h"

CUresult cuInit(unsigned int);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemFree_v2(CUdeviceptr);

static uint64_t cache_used(const struct vgpu_cache *c) {
    return __atomic_load_n(&VGPU_CACHE_USED(c, 0), __ATOMIC_ACQUIRE);
}

static CUcontext g_ctx;

static void *work_thread(void *arg);

static void work(unsigned seed) {
    pthread_t other;
    if (pthread_create(&other, NULL, work_thread, (void *)(uintptr_t)(seed ^ 0x9e3779b9u)) != 0)
        _exit(2);
    work_thread((void *)(uintptr_t)seed);
}

static void *work_thread(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    if (cuCtxSetCurrent(g_ctx) != CUDA_SUCCESS) _exit(2);
    CUdeviceptr live[8] = {0};
    for (unsigned n = 0;; n++) {
        seed = seed * 1103515245u + 12345u;
        CUdeviceptr *p = &live[n % 8];
        if (*p != 0) cuMemFree_v2(*p);
        *p = 0;
        size_t size = ((size_t)(seed >> 8) % 256 + 1) * 4096;
        if (cuMemAlloc_v2(p, size) != CUDA_SUCCESS) *p = 0;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: killstress ITERATIONS WORKERS HOLD_BYTES SEED\n");
        return 2;
    }
    int iterations = atoi(argv[1]), workers = atoi(argv[2]);
    size_t hold = strtoull(argv[3], NULL, 10);
    srand((unsigned)atoi(argv[4]));
    CUdeviceptr held;
    if (cuInit(0) != CUDA_SUCCESS || cuDevicePrimaryCtxRetain(&g_ctx, 0) != CUDA_SUCCESS ||
        cuCtxSetCurrent(g_ctx) != CUDA_SUCCESS || cuMemAlloc_v2(&held, hold) != CUDA_SUCCESS) {
        fprintf(stderr, "killstress: cannot hold %zu bytes\n", hold);
        return 2;
    }
    int fd = open(getenv("CUDA_DEVICE_MEMORY_SHARED_CACHE"), O_RDONLY);
    const struct vgpu_cache *c =
        fd < 0 ? MAP_FAILED : mmap(NULL, sizeof *c, PROT_READ, MAP_SHARED, fd, 0);
    if (c == MAP_FAILED) {
        perror("killstress: shared cache");
        return 2;
    }
    int mismatches = 0;
    uint64_t first_bad = 0;
    pid_t pids[64];
    for (int it = 0; it < iterations; it++) {
        for (int w = 0; w < workers && w < 64; w++) {
            pids[w] = fork();
            if (pids[w] == 0) work((unsigned)rand());
        }
        struct timespec pause = {0, (long)(rand() % 1500) * 1000L};
        nanosleep(&pause, NULL);
        if (it % 2 == 1) {
            for (int w = 0; w < workers && w < 64; w++) kill(pids[w], SIGSTOP);
            CUdeviceptr mine;
            if (cuMemAlloc_v2(&mine, 1 << 20) == CUDA_SUCCESS) cuMemFree_v2(mine);
            for (int w = 0; w < workers && w < 64; w++) kill(pids[w], SIGCONT);
            pause.tv_nsec = (long)(rand() % 500) * 1000L;
            nanosleep(&pause, NULL);
        }
        for (int w = 0; w < workers && w < 64; w++) kill(pids[w], SIGKILL);
        for (int w = 0; w < workers && w < 64; w++) waitpid(pids[w], NULL, 0);
        CUdeviceptr refused;
        size_t past = c->devices[0].limit_bytes - hold + 1;
        if (cuMemAlloc_v2(&refused, past) == CUDA_SUCCESS) cuMemFree_v2(refused);
        uint64_t used = cache_used(c);
        if (used != hold) {
            if (mismatches == 0) first_bad = used;
            mismatches++;
        }
    }
    printf("killstress iterations=%d mismatches=%d first_bad=%llu\n", iterations, mismatches,
           (unsigned long long)first_bad);
    cuMemFree_v2(held);
    return 0;
}
