/*
 * glibcfloor.h - keep libvgpu loadable on glibc 2.17 and later.
 *
 * Force-included into every libvgpu source (the Makefile's -include).  glibc
 * 2.34 moved libdl and libpthread into libc and gave their functions new
 * default versions (dlopen@@GLIBC_2.34, pthread_once@@GLIBC_2.34, ...); a
 * library linked against it needs 2.34 and does not load on UBI 8 (2.28) or
 * Ubuntu 20.04 (2.31), where /etc/ld.so.preload only warns and the container
 * runs unsliced.  Each .symver below binds a reference to the oldest version
 * of the function, which every glibc since keeps: the same function, found in
 * libdl/libpthread on glibc < 2.34 (both are linked, so they are DT_NEEDED)
 * and in libc after.  fstat (GLIBC_2.33) is defined in glibcfloor.c.
 *
 * Versions from `objdump -T libc.so.6` of glibc 2.36: x86-64's oldest is
 * GLIBC_2.2.5 (2.3.3 / 2.3.4 / 2.12 for functions added later), aarch64's is
 * GLIBC_2.17 for all.  A new call to a function whose default version is
 * above 2.17 fails tests/libvgpu (objdump -T) until it is pinned here.
 * glibc >= 2.38 with _GNU_SOURCE redirects strtol & co. to __isoc23_*, which
 * have no old version: build on glibc <= 2.37 (the image builds on 2.36).
 */
#ifndef VSLICE_GLIBCFLOOR_H
#define VSLICE_GLIBCFLOOR_H
#ifndef __ASSEMBLER__ /* dlsym_stub.S calls nothing of glibc's by name */

#if defined(__x86_64__)
#define VGPU_GLIBC_PIN(name, x86_64_version)                                                       \
    __asm__(".symver " #name "," #name "@" x86_64_version);
#elif defined(__aarch64__)
#define VGPU_GLIBC_PIN(name, x86_64_version) __asm__(".symver " #name "," #name "@GLIBC_2.17");
#else
#error "libvgpu's glibc floor is set for x86_64 and aarch64"
#endif

VGPU_GLIBC_PIN(dlopen, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(dlclose, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(dlsym, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(dlvsym, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(dlerror, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(dladdr, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(dladdr1, "GLIBC_2.3.3")
VGPU_GLIBC_PIN(dlinfo, "GLIBC_2.3.3")
VGPU_GLIBC_PIN(pthread_once, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(pthread_key_create, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(pthread_getspecific, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(pthread_setspecific, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(pthread_mutexattr_init, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(pthread_mutexattr_setpshared, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(pthread_mutexattr_setrobust, "GLIBC_2.12")
VGPU_GLIBC_PIN(pthread_mutex_consistent, "GLIBC_2.12")
VGPU_GLIBC_PIN(pthread_sigmask, "GLIBC_2.2.5")
VGPU_GLIBC_PIN(pthread_mutex_trylock, "GLIBC_2.2.5")

#endif

#endif
