/*
 * lookups.c - a program that looks the driver up every way an interposer
 * can be bypassed (or not), and says whose functions it got.
 *
 *   lookups MODE [CUDA_PATH NVML_PATH]
 *
 * MODE: next (dlsym(RTLD_NEXT) from libafter.so, loaded after libvgpu),
 * default (RTLD_DEFAULT), handle (a dlopen("libcuda.so.1") handle), copy
 * (dlopen of CUDA_PATH and NVML_PATH, renamed copies of the driver and NVML),
 * vcopy (the same, with dlvsym at version VSLICE_MOCK_1: CUDA_PATH is a build
 * of the mock driver whose symbols carry that version), dependent (a handle
 * of libafter.so, which depends on the driver).  Every function, the context set-up ones
 * included, is found that way.  Prints one "lookup name=N library=L" line per
 * capped function (L: the file its address lies in), then "alloc rc=R" for
 * two 60 MiB cuMemAlloc_v2 calls.  Linked with libcuda and NVML, as
 * frameworks are.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../mockgpu/mockgpu.h"

void *after_dlsym(const char *name);

static const char *mode;
static void *cuda_handle;
static void *nvml_handle;

static void *find(const char *name) {
    void *lib = strncmp(name, "nvml", 4) == 0 ? nvml_handle : cuda_handle;
    if (strcmp(mode, "next") == 0) return after_dlsym(name);
    if (strcmp(mode, "default") == 0) return dlsym(RTLD_DEFAULT, name);
    if (strcmp(mode, "vcopy") == 0 && lib == cuda_handle) return dlvsym(lib, name, "VSLICE_MOCK_1");
    return dlsym(lib, name);
}

static const char *library_of(void *fn) {
    Dl_info info;
    if (fn == NULL || dladdr(fn, &info) == 0 || info.dli_fname == NULL) return "-";
    const char *slash = strrchr(info.dli_fname, '/');
    return slash != NULL ? slash + 1 : info.dli_fname;
}

static void *must(const char *name) {
    void *fn = find(name);
    if (fn == NULL) {
        fprintf(stderr, "lookups: %s not found\n", name);
        exit(2);
    }
    return fn;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) return 2;
    mode = argv[1];
    const char *cuda = "libcuda.so.1", *nvml = "libnvidia-ml.so.1";
    if ((strcmp(mode, "copy") == 0 || strcmp(mode, "vcopy") == 0) && argc >= 4) cuda = argv[2], nvml = argv[3];
    if (strcmp(mode, "dependent") == 0) cuda = nvml = "libafter.so";
    cuda_handle = dlopen(cuda, RTLD_NOW | RTLD_LOCAL);
    nvml_handle = dlopen(nvml, RTLD_NOW | RTLD_LOCAL);
    if (cuda_handle == NULL || nvml_handle == NULL) {
        fprintf(stderr, "lookups: %s\n", dlerror());
        return 2;
    }
    static const char *const capped[] = {"cuMemAlloc_v2", "cuMemGetInfo_v2", "cuLaunchKernel",
                                         "cuGetProcAddress_v2", "nvmlDeviceGetMemoryInfo"};
    for (size_t i = 0; i < sizeof capped / sizeof capped[0]; i++)
        printf("lookup name=%s library=%s\n", capped[i], library_of(find(capped[i])));

    CUresult (*init)(unsigned int) = (CUresult(*)(unsigned int))must("cuInit");
    CUresult (*retain)(CUcontext *, CUdevice) =
        (CUresult(*)(CUcontext *, CUdevice))must("cuDevicePrimaryCtxRetain");
    CUresult (*set_current)(CUcontext) = (CUresult(*)(CUcontext))must("cuCtxSetCurrent");
    CUresult (*alloc)(CUdeviceptr *, size_t) =
        (CUresult(*)(CUdeviceptr *, size_t))must("cuMemAlloc_v2");
    CUcontext ctx;
    if (init(0) != CUDA_SUCCESS || retain(&ctx, 0) != CUDA_SUCCESS || set_current(ctx) != CUDA_SUCCESS) {
        fprintf(stderr, "lookups: no context\n");
        return 2;
    }
    for (int i = 0; i < 2; i++) {
        CUdeviceptr p = 0;
        printf("alloc rc=%d\n", alloc(&p, 60u << 20));
    }
    return 0;
}
