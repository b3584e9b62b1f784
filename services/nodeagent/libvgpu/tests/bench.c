/*
 * bench.c - per-call costs of the driver paths libvgpu sits on.
 *
 *   bench launch N          ns per cuLaunchKernel of a zero-length kernel
 *   bench allocfree N SIZE  ns per cuMemAlloc_v2 + cuMemFree_v2 pair
 *   bench contend P N SIZE  us per allocation (alloc + free pair) while P
 *                           processes allocate at the same moment
 *   bench refused P N HOLD SIZE
 *                           p50 and p99 latency (us) of a refused allocation:
 *                           this process holds HOLD bytes, then P processes
 *                           each ask N times for SIZE bytes that do not fit
 * Each figure is the best of 5 rounds, to keep scheduler noise out of a
 * difference of a few nanoseconds.  Run it with and without libvgpu
 * preloaded (benchmarks/libvgpu.py does both).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../mockgpu/mockgpu.h"

CUresult cuInit(unsigned int);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, CUstream, void **, void **);

#define ROUNDS 5

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void setup(void) {
    CUcontext ctx;
    if (cuInit(0) != CUDA_SUCCESS || cuDevicePrimaryCtxRetain(&ctx, 0) != CUDA_SUCCESS ||
        cuCtxSetCurrent(ctx) != CUDA_SUCCESS) {
        fprintf(stderr, "bench: no device\n");
        exit(2);
    }
}

static double launch_ns(long n) {
    struct vslice_mock_kernel k = {VSLICE_MOCK_KERNEL_MAGIC, 0};
    CUfunction f = (CUfunction)(void *)&k;
    double best = 1e30;
    for (int r = 0; r < ROUNDS; r++) {
        double t0 = now_s();
        for (long i = 0; i < n; i++)
            if (cuLaunchKernel(f, 1, 1, 1, 1, 1, 1, 0, NULL, NULL, NULL) != CUDA_SUCCESS) exit(3);
        double per = (now_s() - t0) / (double)n * 1e9;
        if (per < best) best = per;
    }
    return best;
}

static double allocfree_ns(long n, size_t size) {
    double best = 1e30;
    for (int r = 0; r < ROUNDS; r++) {
        double t0 = now_s();
        for (long i = 0; i < n; i++) {
            CUdeviceptr p;
            if (cuMemAlloc_v2(&p, size) != CUDA_SUCCESS || cuMemFree_v2(p) != CUDA_SUCCESS) exit(3);
        }
        double per = (now_s() - t0) / (double)n * 1e9;
        if (per < best) best = per;
    }
    return best;
}

static double contend_us(int procs, long n, size_t size) {
    int go[2], out[2];
    if (pipe(go) != 0 || pipe(out) != 0) exit(2);
    for (int p = 0; p < procs; p++) {
        if (fork() == 0) {
            close(go[1]);
            setup();
            char c;
            if (read(go[0], &c, 1) < 0) exit(2); /* all start together on EOF */
            double t0 = now_s();
            for (long i = 0; i < n; i++) {
                CUdeviceptr ptr;
                if (cuMemAlloc_v2(&ptr, size) != CUDA_SUCCESS || cuMemFree_v2(ptr) != CUDA_SUCCESS)
                    _exit(3);
            }
            double per = (now_s() - t0) / (double)n * 1e6;
            if (write(out[1], &per, sizeof per) != sizeof per) _exit(2);
            _exit(0);
        }
    }
    close(go[0]);
    usleep(200000);
    close(go[1]);
    double sum = 0;
    for (int p = 0; p < procs; p++) {
        double per;
        if (read(out[0], &per, sizeof per) != sizeof per) exit(2);
        sum += per;
    }
    for (int p = 0; p < procs; p++) wait(NULL);
    return sum / procs;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void refused_us(int procs, long n, size_t hold, size_t size, double *p50, double *p99) {
    setup();
    CUdeviceptr held;
    if (cuMemAlloc_v2(&held, hold) != CUDA_SUCCESS) exit(3);
    size_t count = (size_t)procs * (size_t)n;
    double *lat = mmap(NULL, count * sizeof *lat, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (lat == MAP_FAILED) exit(2);
    int go[2];
    if (pipe(go) != 0) exit(2);
    for (int p = 0; p < procs; p++) {
        if (fork() == 0) {
            close(go[1]);
            CUdeviceptr ptr;
            if (cuMemAlloc_v2(&ptr, size) == CUDA_SUCCESS) _exit(3); /* warm-up, refused */
            char c;
            if (read(go[0], &c, 1) < 0) _exit(2); /* all start together on EOF */
            for (long i = 0; i < n; i++) {
                double t0 = now_s();
                if (cuMemAlloc_v2(&ptr, size) == CUDA_SUCCESS) _exit(3);
                lat[(size_t)p * (size_t)n + (size_t)i] = (now_s() - t0) * 1e6;
            }
            _exit(0);
        }
    }
    close(go[0]);
    usleep(200000);
    close(go[1]);
    int failed = 0;
    for (int p = 0; p < procs; p++) {
        int status;
        wait(&status);
        failed |= !WIFEXITED(status) || WEXITSTATUS(status) != 0;
    }
    if (failed) {
        fprintf(stderr, "bench: an allocation that should not fit was granted\n");
        exit(3);
    }
    qsort(lat, count, sizeof *lat, by_value);
    *p50 = lat[count / 2];
    *p99 = lat[count * 99 / 100];
    cuMemFree_v2(held);
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "launch") == 0) {
        setup();
        printf("launch_ns=%.2f\n", launch_ns(atol(argv[2])));
    } else if (argc >= 4 && strcmp(argv[1], "allocfree") == 0) {
        setup();
        printf("allocfree_ns=%.2f\n", allocfree_ns(atol(argv[2]), strtoull(argv[3], NULL, 10)));
    } else if (argc >= 5 && strcmp(argv[1], "contend") == 0) {
        double best = 1e30;
        for (int r = 0; r < 3; r++) {
            double v = contend_us(atoi(argv[2]), atol(argv[3]), strtoull(argv[4], NULL, 10));
            if (v < best) best = v;
        }
        printf("contend_us=%.3f\n", best);
    } else if (argc >= 6 && strcmp(argv[1], "refused") == 0) {
        double p50, p99;
        refused_us(atoi(argv[2]), atol(argv[3]), strtoull(argv[4], NULL, 10),
                   strtoull(argv[5], NULL, 10), &p50, &p99);
        printf("refused_p50_us=%.3f refused_p99_us=%.3f\n", p50, p99);
    } else {
        fprintf(stderr, "usage: bench launch N | allocfree N SIZE | contend PROCS N SIZE | "
                        "refused PROCS N HOLD SIZE\n");
        return 2;
    }
    return 0;
}
