/*
 * lookup.c - finding the real driver, and handing out libvgpu's wrappers to
 * every way a program can look a driver function up.
 *
 * Paths that reach a driver function: a direct call from a program linked
 * with libcuda (the dynamic linker finds libvgpu's export first, because it
 * is preloaded); cuGetProcAddress(_v2), as the CUDA runtime does; and
 * dlsym()/dlvsym() - on a handle of libcuda, of a library that depends on it,
 * of a renamed copy of it, on RTLD_DEFAULT, or on RTLD_NEXT from a library
 * loaded after libvgpu, which glibc answers from the libraries after the
 * caller: the driver, not libvgpu.  libvgpu interposes dlsym and dlvsym
 * (dlsym_stub.S) to answer each of these with its wrapper.  The driver itself
 * answers cuGetProcAddress, so the name, version and _ptds/_ptsz flags pick
 * exactly the variant the driver would have picked; libvgpu swaps in its
 * wrapper of that variant (HAMi-core #57).
 *
 * A driver is recognised by what it is, never by its file name: its DT_SONAME
 * (libcuda.so.*, libnvidia-ml.so.*) or an export of cuInit / nvmlInit_v2.  A
 * lookup on a copy of the driver is answered from the driver libvgpu holds
 * (wrappers for the capped functions, the driver's own for the rest), so the
 * copy's context calls and libvgpu's agree.
 *
 * What no interposer can stop, and the node agent's host-side check catches
 * (services/nodeagent/core/usages.py, tests/nodeagent/test_escapes.py): a
 * program that finds a driver function by reading libcuda's symbol table
 * itself, one that loads the driver with dlmopen into a new link-map
 * namespace (preloads are not loaded there), a static binary (the dynamic
 * linker never runs), and a process started without LD_PRELOAD where the
 * image has no /etc/ld.so.preload.
 *
 * No glibc-private symbol is used (HAMi-core #174 broke on glibc 2.34 for
 * calling _dl_sym): the real dlsym and dlvsym are read from the dynamic
 * symbol table of the glibc library that defines them (libc.so.6 from 2.34,
 * libdl.so.2 before), found in the dynamic linker's list of objects.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdint.h>

#include "hooks.h"

#define VGPU_DEFINE_CUDA(name, params) CUresult(*vgpu_real_##name) params;
#define VGPU_DEFINE_NVML(name, params) nvmlReturn_t(*vgpu_real_##name) params;
VGPU_CUDA_HOOKS(VGPU_DEFINE_CUDA)
VGPU_NVML_HOOKS(VGPU_DEFINE_NVML)

cuCtxGetDevice_fn vgpu_real_cuCtxGetDevice;

/* Read by the dlsym and dlvsym entry stubs (dlsym_stub.S), which jump to them. */
VGPU_HIDDEN void *(*vgpu_real_dlsym)(void *, const char *);
VGPU_HIDDEN void *(*vgpu_real_dlvsym)(void *, const char *, const char *);

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

/* ---- a loaded object's dynamic symbol table ---------------------------------- */

/* String tests of this file's own: the sanitizer runtimes intercept strcmp and
 * call dlsym (so this file) before their interceptors can serve. */
static int str_eq(const char *a, const char *b) {
    while (*a != '\0' && *a == *b) a++, b++;
    return *a == *b;
}

static int str_prefix(const char *s, const char *prefix) {
    while (*prefix != '\0' && *s == *prefix) s++, prefix++;
    return *prefix == '\0';
}

struct elf_object {
    ElfW(Addr) base;
    const ElfW(Sym) * symtab;
    const char *strtab;
    const uint32_t *gnu_hash;
    const uint32_t *hash;
    const ElfW(Half) * versym;
    const char *soname;
};

/* glibc relocates the dynamic section's addresses in place where it is
 * writable (x86-64, aarch64); an address below the load base is unrelocated. */
static const void *dyn_ptr(ElfW(Addr) base, ElfW(Addr) p) {
    return (const void *)(p < base ? p + base : p);
}

static int elf_open(ElfW(Addr) base, const ElfW(Dyn) * dyn, struct elf_object *o) {
    *o = (struct elf_object){.base = base};
    size_t soname = SIZE_MAX;
    for (; dyn != NULL && dyn->d_tag != DT_NULL; dyn++) {
        switch (dyn->d_tag) {
        case DT_SYMTAB: o->symtab = dyn_ptr(base, dyn->d_un.d_ptr); break;
        case DT_STRTAB: o->strtab = dyn_ptr(base, dyn->d_un.d_ptr); break;
        case DT_GNU_HASH: o->gnu_hash = dyn_ptr(base, dyn->d_un.d_ptr); break;
        case DT_HASH: o->hash = dyn_ptr(base, dyn->d_un.d_ptr); break;
        case DT_VERSYM: o->versym = dyn_ptr(base, dyn->d_un.d_ptr); break;
        case DT_SONAME: soname = dyn->d_un.d_val; break;
        default: break;
        }
    }
    if (o->symtab == NULL || o->strtab == NULL || (o->gnu_hash == NULL && o->hash == NULL))
        return 0;
    if (soname != SIZE_MAX) o->soname = o->strtab + soname;
    return 1;
}

/* Symbol i if it is a definition of name: 2 at its default version, 1 at a
 * hidden (compat) one, 0 not. */
static int elf_match(const struct elf_object *o, uint32_t i, const char *name) {
    const ElfW(Sym) *s = &o->symtab[i];
    if (s->st_shndx == SHN_UNDEF || !str_eq(o->strtab + s->st_name, name)) return 0;
    return o->versym != NULL && (o->versym[i] & 0x8000) ? 1 : 2;
}

/* The address object o defines name at (its default version first), or NULL:
 * a lookup in o alone, not its dependencies (System V ABI, "Hash Table";
 * the GNU hash layout as binutils and glibc write it). */
static void *elf_symbol(const struct elf_object *o, const char *name) {
    uint32_t best = 0;
    int best_rank = 0;
    if (o->gnu_hash != NULL) {
        uint32_t h = 5381;
        for (const unsigned char *c = (const unsigned char *)name; *c; c++) h = h * 33 + *c;
        uint32_t nbuckets = o->gnu_hash[0], symoffset = o->gnu_hash[1], bloom = o->gnu_hash[2];
        const uint32_t *buckets =
            (const uint32_t *)((const ElfW(Addr) *)(o->gnu_hash + 4) + bloom);
        const uint32_t *chain = buckets + nbuckets;
        uint32_t i = nbuckets != 0 ? buckets[h % nbuckets] : 0;
        for (; i >= symoffset && i != 0 && best_rank < 2; i++) {
            uint32_t h2 = chain[i - symoffset];
            int rank = (h | 1) == (h2 | 1) ? elf_match(o, i, name) : 0;
            if (rank > best_rank) best = i, best_rank = rank;
            if (h2 & 1) break;
        }
    } else {
        uint32_t h = 0;
        for (const unsigned char *c = (const unsigned char *)name; *c; c++) {
            h = (h << 4) + *c;
            uint32_t g = h & 0xf0000000U;
            if (g != 0) h ^= g >> 24;
            h &= ~g;
        }
        uint32_t nbucket = o->hash[0];
        const uint32_t *bucket = o->hash + 2, *chain = bucket + nbucket;
        for (uint32_t i = nbucket != 0 ? bucket[h % nbucket] : 0; i != 0 && best_rank < 2;
             i = chain[i]) {
            int rank = elf_match(o, i, name);
            if (rank > best_rank) best = i, best_rank = rank;
        }
    }
    return best_rank > 0 ? (void *)(o->base + o->symtab[best].st_value) : NULL;
}

static int link_map_object(const struct link_map *lm, struct elf_object *o) {
    return lm != NULL && elf_open(lm->l_addr, lm->l_ld, o);
}

/* ---- the real dlsym and dlvsym ---------------------------------------------------- */

/* Walks the dynamic linker's list of loaded objects (_r_debug, the debugger
 * interface of <link.h>) rather than calling dl_iterate_phdr, which the
 * sanitizer runtimes intercept and cannot serve while they start - and they
 * call dlsym then. */
static void resolve_dl(void) {
    if (__atomic_load_n(&vgpu_real_dlvsym, __ATOMIC_ACQUIRE) != NULL) return;
    for (const struct link_map *lm = _r_debug.r_map; lm != NULL; lm = lm->l_next) {
        struct elf_object o;
        if (!link_map_object(lm, &o) || o.soname == NULL) continue;
        if (!str_eq(o.soname, "libc.so.6") && !str_eq(o.soname, "libdl.so.2")) continue;
        void *dlsym_fn = elf_symbol(&o, "dlsym"), *dlvsym_fn = elf_symbol(&o, "dlvsym");
        if (dlsym_fn == NULL || dlvsym_fn == NULL) continue;
        __atomic_store_n(&vgpu_real_dlsym, (void *(*)(void *, const char *))dlsym_fn,
                         __ATOMIC_RELEASE);
        __atomic_store_n(&vgpu_real_dlvsym, (void *(*)(void *, const char *, const char *))dlvsym_fn,
                         __ATOMIC_RELEASE);
        return;
    }
}

static void *real_dlsym_fn(void) {
    resolve_dl();
    return (void *)__atomic_load_n(&vgpu_real_dlsym, __ATOMIC_ACQUIRE);
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
        if (str_eq(g_hooks[i].name, name)) return g_hooks[i].wrapper;
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

/* ---- dlsym and dlvsym ------------------------------------------------------------ */

enum driver { NOT_DRIVER, CUDA_DRIVER, NVML_DRIVER };

static enum driver driver_of(const struct link_map *lm) {
    struct elf_object o;
    if (!link_map_object(lm, &o)) return NOT_DRIVER;
    if (o.soname != NULL && str_prefix(o.soname, "libcuda.so")) return CUDA_DRIVER;
    if (o.soname != NULL && str_prefix(o.soname, "libnvidia-ml.so")) return NVML_DRIVER;
    if (elf_symbol(&o, "cuInit") != NULL) return CUDA_DRIVER;
    if (elf_symbol(&o, "nvmlInit_v2") != NULL) return NVML_DRIVER;
    return NOT_DRIVER;
}

static struct link_map *link_map_of(void *handle) {
    struct link_map *lm = NULL;
    return handle != NULL && dlinfo(handle, RTLD_DI_LINKMAP, &lm) == 0 ? lm : NULL;
}

static void *real_lookup(void *handle, const char *name, const char *version) {
    resolve_dl();
    if (version != NULL)
        return vgpu_real_dlvsym != NULL ? vgpu_real_dlvsym(handle, name, version) : NULL;
    return vgpu_real_dlsym != NULL ? vgpu_real_dlsym(handle, name) : NULL;
}

/*
 * What libvgpu answers a lookup of name (at version, for dlvsym) on handle
 * with, or NULL when the stub should forward the call to glibc unchanged.
 *
 * RTLD_NEXT depends on the caller, which only the forwarded call keeps
 * (HAMi#2903: a dlsym interposer that broke RTLD_NEXT made `import torch`
 * hang), so libvgpu cannot ask glibc what the caller would get: a capped
 * function the driver defines is answered with its wrapper, as a lookup in
 * the global scope, where the preloaded wrapper comes before the driver, is.
 * Every other handle is looked up here first; a function of the driver
 * libvgpu holds becomes its wrapper, and one of a copy of the driver is
 * answered from the driver libvgpu holds.
 */
static void *answer(void *handle, const char *name, const char *version) {
    if (name == NULL || (!str_prefix(name, "cu") && !str_prefix(name, "nvml"))) return NULL;
    int nvml = name[0] == 'n';
    if (handle == RTLD_NEXT) {
        void *w = vgpu_wrapper_by_name(name);
        if (w == NULL) return NULL;
        vgpu_init();
        void *held = nvml ? g_nvml : g_cuda;
        return held != NULL && real_lookup(held, name, version) != NULL ? w : NULL;
    }
    void *found = real_lookup(handle, name, version);
    Dl_info info;
    struct link_map *owner = NULL;
    if (found == NULL || dladdr1(found, &info, (void **)&owner, RTLD_DL_LINKMAP) == 0) return NULL;
    enum driver kind = driver_of(owner);
    if (kind == NOT_DRIVER) return NULL;
    vgpu_init();
    void *w = vgpu_wrapper_by_real(found);
    if (w != NULL) return w;
    void *held = kind == NVML_DRIVER ? g_nvml : g_cuda;
    if (held == NULL || owner == link_map_of(held)) return NULL;
    w = vgpu_wrapper_by_name(name);
    return w != NULL ? w : sym(held, name);
}

/* Called by the exported dlsym stub, which forwards the call with a tail jump
 * when this answers NULL, so that glibc sees the original caller. */
VGPU_HIDDEN void *vgpu_dlsym_hook(void *handle, const char *name) {
    resolve_dl();
    return answer(handle, name, NULL);
}

/* The same for the exported dlvsym stub. */
VGPU_HIDDEN void *vgpu_dlvsym_hook(void *handle, const char *name, const char *version) {
    resolve_dl();
    return version != NULL ? answer(handle, name, version) : NULL;
}
