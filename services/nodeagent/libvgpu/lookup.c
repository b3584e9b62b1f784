/*
 * lookup.c - finding the real driver, and handing out libvgpu's wrappers to
 * every way a program can look a driver function up.
 *
 * Three paths reach a driver function: a direct call from a program linked
 * with libcuda (the dynamic linker finds libvgpu's export first, because it
 * is preloaded); cuGetProcAddress(_v2), as the CUDA runtime does; and
 * dlsym() on a handle from dlopen("libcuda.so.1") - which searches libcuda
 * and its dependencies only, so libvgpu must interpose dlsym to be seen
 * there.  The driver itself answers cuGetProcAddress, so the name, version
 * and _ptds/_ptsz flags pick exactly the variant the driver would have
 * picked; libvgpu swaps in its wrapper of that variant (HAMi-core #57).
 *
 * No glibc-private symbol is used (HAMi-core #174 broke on glibc 2.34 for
 * calling _dl_sym): the real dlsym is found with the public dlvsym.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <string.h>

#include "hooks.h"

#define VGPU_DEFINE_CUDA(name, params) CUresult(*vgpu_real_##name) params;
#define VGPU_DEFINE_NVML(name, params) nvmlReturn_t(*vgpu_real_##name) params;
VGPU_CUDA_HOOKS(VGPU_DEFINE_CUDA)
VGPU_NVML_HOOKS(VGPU_DEFINE_NVML)

cuCtxGetDevice_fn vgpu_real_cuCtxGetDevice;

/* Read by the dlsym entry stub (dlsym_x86_64.S), which jumps to it. */
VGPU_HIDDEN void *(*vgpu_real_dlsym)(void *, const char *);

struct hook {
    const char *name;
    void *wrapper;
    void **real;
    int nvml;
};

#define VGPU_CUDA_ENTRY(name, params) {#name, (void *)name, (void **)&vgpu_real_##name, 0},
#define VGPU_NVML_ENTRY(name, params) {#name, (void *)name, (void **)&vgpu_real_##name, 1},
static const struct hook g_hooks[] = {VGPU_CUDA_HOOKS(VGPU_CUDA_ENTRY)
                                          VGPU_NVML_HOOKS(VGPU_NVML_ENTRY)};
#define HOOK_COUNT (sizeof g_hooks / sizeof g_hooks[0])

static void *g_cuda;
static void *g_nvml;

static void *real_dlsym_fn(void) {
    void *(*fn)(void *, const char *) = __atomic_load_n(&vgpu_real_dlsym, __ATOMIC_ACQUIRE);
    if (fn != NULL) return (void *)fn;
    /* glibc >= 2.34 keeps dlsym in libc as GLIBC_2.34; older ones only have
     * the original version */
    static const char *const versions[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17"};
    for (size_t i = 0; i < sizeof versions / sizeof versions[0] && fn == NULL; i++)
        fn = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", versions[i]);
    __atomic_store_n(&vgpu_real_dlsym, fn, __ATOMIC_RELEASE);
    return (void *)fn;
}

static void *sym(void *handle, const char *name) {
    void *(*fn)(void *, const char *) = (void *(*)(void *, const char *))real_dlsym_fn();
    return fn != NULL && handle != NULL ? fn(handle, name) : NULL;
}

static void *open_library(const char *soname) {
    void *h = dlopen(soname, RTLD_NOW | RTLD_NOLOAD);
    return h != NULL ? h : dlopen(soname, RTLD_NOW | RTLD_GLOBAL);
}

void vgpu_resolve_driver(void) {
    g_cuda = open_library("libcuda.so.1");
    g_nvml = open_library("libnvidia-ml.so.1");
    if (g_cuda == NULL) VGPU_LOG(VGPU_LOG_WARN, "libcuda.so.1 not found: %s", dlerror());
    for (size_t i = 0; i < HOOK_COUNT; i++)
        *g_hooks[i].real = sym(g_hooks[i].nvml ? g_nvml : g_cuda, g_hooks[i].name);
    vgpu_real_cuCtxGetDevice = (cuCtxGetDevice_fn)sym(g_cuda, "cuCtxGetDevice");
}

void *vgpu_resolve_nvml(const char *name) { return sym(g_nvml, name); }
void *vgpu_driver_symbol(const char *name) { return sym(g_cuda, name); }

void *vgpu_wrapper_by_name(const char *name) {
    for (size_t i = 0; i < HOOK_COUNT; i++)
        if (strcmp(g_hooks[i].name, name) == 0) return g_hooks[i].wrapper;
    return NULL;
}

void *vgpu_wrapper_by_real(void *real) {
    for (size_t i = 0; i < HOOK_COUNT; i++)
        if (*g_hooks[i].real == real) return g_hooks[i].wrapper;
    return NULL;
}

/* ---- cuGetProcAddress ----------------------------------------------------------- */

static void swap_in_wrapper(void **pfn) {
    void *w = vgpu_wrapper_by_real(*pfn);
    if (w != NULL) *pfn = w;
}

VGPU_API CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, cuuint64_t flags) {
    vgpu_init();
    if (vgpu_real_cuGetProcAddress == NULL) return CUDA_ERROR_NOT_FOUND;
    CUresult r = vgpu_real_cuGetProcAddress(symbol, pfn, version, flags);
    if (r == CUDA_SUCCESS && pfn != NULL && *pfn != NULL) swap_in_wrapper(pfn);
    return r;
}

VGPU_API CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, cuuint64_t flags,
                                      CUdriverProcAddressQueryResult *status) {
    vgpu_init();
    if (vgpu_real_cuGetProcAddress_v2 == NULL) return CUDA_ERROR_NOT_FOUND;
    CUresult r = vgpu_real_cuGetProcAddress_v2(symbol, pfn, version, flags, status);
    if (r == CUDA_SUCCESS && pfn != NULL && *pfn != NULL) swap_in_wrapper(pfn);
    return r;
}

/* ---- dlsym ------------------------------------------------------------------------ */

static int is_driver_handle(void *handle) {
    struct link_map *lm = NULL;
    if (dlinfo(handle, RTLD_DI_LINKMAP, &lm) != 0 || lm == NULL || lm->l_name == NULL) return 0;
    const char *base = strrchr(lm->l_name, '/');
    base = base != NULL ? base + 1 : lm->l_name;
    return strncmp(base, "libcuda.so", 10) == 0 || strncmp(base, "libnvidia-ml.so", 15) == 0;
}

/*
 * Called by the exported dlsym stub.  Returns libvgpu's wrapper when a
 * program asks a libcuda or libnvidia-ml handle for a hooked function, NULL
 * when the stub should forward the call.  The stub forwards with a tail jump,
 * so the real dlsym sees the original caller's return address and RTLD_NEXT
 * keeps meaning "after the caller", not "after libvgpu" (HAMi#2903: a dlsym
 * interposer that broke RTLD_NEXT made `import torch` hang).
 */
VGPU_HIDDEN void *vgpu_dlsym_hook(void *handle, const char *name) {
    real_dlsym_fn();
    if (handle == RTLD_DEFAULT || handle == RTLD_NEXT || name == NULL) return NULL;
    if (strncmp(name, "cu", 2) != 0 && strncmp(name, "nvml", 4) != 0) return NULL;
    void *w = vgpu_wrapper_by_name(name);
    return w != NULL && is_driver_handle(handle) ? w : NULL;
}
