/*
 * after.c - libafter.so, a library that a program loads after libvgpu and
 * that depends on the driver (as a framework's CUDA backend does): it looks
 * driver functions up "after itself", with dlsym(RTLD_NEXT, ...),
 * which glibc answers from the libraries that follow it - libcuda, not the
 * preloaded libvgpu before it.  Built without sibling calls: a tail call to
 * dlsym would make the program, not this library, the caller.
 */
#define _GNU_SOURCE
#include <dlfcn.h>

void *after_dlsym(const char *name) { return dlsym(RTLD_NEXT, name); }
