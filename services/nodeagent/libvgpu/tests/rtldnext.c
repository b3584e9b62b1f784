/* rtldnext.c - checks that RTLD_NEXT lookups still resolve past libvgpu. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void) {
    pid_t expected = (pid_t)syscall(SYS_getppid);
    pid_t got = getppid();
    int (*calls)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "nextshim_calls");
    void *from_main = dlsym(RTLD_NEXT, "getppid");
    Dl_info info;
    const char *lib = from_main != NULL && dladdr(from_main, &info) ? info.dli_fname : "-";
    printf("getppid ok=%d shim_calls=%d next_from_main=%s\n", got == expected,
           calls != NULL ? calls() : -1, lib);
    return got == expected ? 0 : 1;
}
