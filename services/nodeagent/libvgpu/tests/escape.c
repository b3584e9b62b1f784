/*
 * escape.c - a program that reaches the driver past any interposer, for the
 * node agent's host-side check to catch.
 *
 *   escape MODE SIZE
 *
 * MODE: symtab (finds cuMemAlloc_v2 by reading libcuda.so.1's symbol table
 * from its file and adding the load base), dlmopen (loads libafter.so, and so
 * the driver, into a new link-map namespace, where no preload is loaded, and
 * looks the driver up from there), linked (calls the driver directly: with
 * LD_PRELOAD cleared, or built static with the mock driver inside as
 * escape-static, the dynamic linker never loads libvgpu).  Allocates SIZE
 * (k/m/g suffixes) in one cuMemAlloc_v2, prints "alloc rc=R pid=P", then
 * waits for a line on stdin before it exits.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../../mockgpu/mockgpu.h"

CUresult cuInit(unsigned int);
CUresult cuDevicePrimaryCtxRetain(CUcontext *, CUdevice);
CUresult cuCtxSetCurrent(CUcontext);
CUresult cuMemAlloc_v2(CUdeviceptr *, size_t);

typedef void *(*finder)(const char *);

static void die(const char *what) {
    fprintf(stderr, "escape: %s\n", what);
    exit(2);
}

#ifndef ESCAPE_STATIC
static struct link_map *g_cuda;

/* The symbol's address from the file's .dynsym: no dlsym involved. */
static void *from_symtab(const char *name) {
    int fd = open(g_cuda->l_name, O_RDONLY);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) die("cannot open libcuda's file");
    const unsigned char *file = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (file == MAP_FAILED) die("cannot map libcuda's file");
    const ElfW(Ehdr) *eh = (const ElfW(Ehdr) *)file;
    const ElfW(Shdr) *sh = (const ElfW(Shdr) *)(file + eh->e_shoff);
    void *found = NULL;
    for (int i = 0; i < eh->e_shnum && found == NULL; i++) {
        if (sh[i].sh_type != SHT_DYNSYM) continue;
        const ElfW(Sym) *syms = (const ElfW(Sym) *)(file + sh[i].sh_offset);
        const char *names = (const char *)(file + sh[sh[i].sh_link].sh_offset);
        for (size_t k = 0; k < sh[i].sh_size / sizeof *syms; k++)
            if (syms[k].st_shndx != SHN_UNDEF && strcmp(names + syms[k].st_name, name) == 0)
                found = (void *)(g_cuda->l_addr + syms[k].st_value);
    }
    munmap((void *)file, (size_t)sb.st_size);
    return found;
}

static void *(*g_after_dlsym)(const char *);
static void *from_namespace(const char *name) { return g_after_dlsym(name); }
#endif

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 3) die("usage: escape MODE SIZE");
    const char *mode = argv[1];
    char *end;
    size_t size = strtoull(argv[2], &end, 10);
    size <<= *end == 'k' ? 10 : *end == 'm' ? 20 : *end == 'g' ? 30 : 0;
    CUresult (*init)(unsigned int) = cuInit;
    CUresult (*retain)(CUcontext *, CUdevice) = cuDevicePrimaryCtxRetain;
    CUresult (*set_current)(CUcontext) = cuCtxSetCurrent;
    CUresult (*alloc)(CUdeviceptr *, size_t) = cuMemAlloc_v2;
#ifndef ESCAPE_STATIC
    finder find = NULL;
    if (strcmp(mode, "symtab") == 0) {
        void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        if (h == NULL || dlinfo(h, RTLD_DI_LINKMAP, &g_cuda) != 0) die("libcuda not loaded");
        find = from_symtab;
    } else if (strcmp(mode, "dlmopen") == 0) {
        void *h = dlmopen(LM_ID_NEWLM, "libafter.so", RTLD_NOW);
        if (h == NULL) die(dlerror());
        g_after_dlsym = (void *(*)(const char *))dlsym(h, "after_dlsym");
        if (g_after_dlsym == NULL) die("no after_dlsym");
        find = from_namespace;
    } else if (strcmp(mode, "linked") != 0) {
        die("unknown mode");
    }
    if (find != NULL) {
        init = (CUresult(*)(unsigned int))find("cuInit");
        retain = (CUresult(*)(CUcontext *, CUdevice))find("cuDevicePrimaryCtxRetain");
        set_current = (CUresult(*)(CUcontext))find("cuCtxSetCurrent");
        alloc = (CUresult(*)(CUdeviceptr *, size_t))find("cuMemAlloc_v2");
        if (init == NULL || retain == NULL || set_current == NULL || alloc == NULL)
            die("driver functions not found");
    }
#else
    if (strcmp(mode, "linked") != 0) die("a static build only calls the driver directly");
#endif
    CUcontext ctx;
    if (init(0) != CUDA_SUCCESS || retain(&ctx, 0) != CUDA_SUCCESS || set_current(ctx) != CUDA_SUCCESS)
        die("no context");
    CUdeviceptr p = 0;
    printf("alloc rc=%d pid=%d\n", alloc(&p, size), (int)getpid());
    char line[16];
    if (fgets(line, sizeof line, stdin) == NULL) line[0] = '\0';
    return 0;
}
