/*
 * lockholder.c - takes flock(LOCK_EX) on the shared cache and keeps it until
 * killed: a process following version 1's protocol (slot changes under the
 * file's flock) that never lets go.  Layout version 2 takes no lock, and a
 * test checks that such a holder delays no libvgpu process.
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/file.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    int fd = open(argv[1], O_RDWR | O_CREAT, 0666);
    if (fd < 0 || flock(fd, LOCK_EX) != 0) return 1;
    printf("locked\n");
    fflush(stdout);
    for (;;) pause();
}
