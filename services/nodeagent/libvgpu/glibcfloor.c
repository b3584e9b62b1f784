/*
 * glibcfloor.c - functions whose only glibc version is too new for libvgpu's
 * floor (GLIBC_2.17, see glibcfloor.h), defined here, hidden, so libvgpu's
 * calls bind to them instead of libc's.
 *
 * fstat became a libc export (GLIBC_2.33) in glibc 2.33; before it, sys/stat.h
 * made it an inline call to __fxstat.  The system call is what both do.
 */
#define _GNU_SOURCE
#include <features.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#if __GLIBC_PREREQ(2, 33)
int fstat(int fd, struct stat *sb) { return (int)syscall(SYS_fstat, fd, sb); }
#endif
