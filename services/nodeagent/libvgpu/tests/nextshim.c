/*
 * nextshim.c - a preloaded library that wraps getppid the usual way, with
 * dlsym(RTLD_NEXT, ...).  Loaded after libvgpu, it finds libc's getppid only
 * if libvgpu's dlsym resolves RTLD_NEXT relative to this library; relative to
 * libvgpu it would find itself and recurse (HAMi#2903).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <unistd.h>

static int calls;

pid_t getppid(void) {
    static pid_t (*next)(void);
    if (next == NULL) next = (pid_t(*)(void))dlsym(RTLD_NEXT, "getppid");
    if (next == NULL || next == getppid) return -1;
    calls++;
    return next();
}

int nextshim_calls(void) { return calls; }
