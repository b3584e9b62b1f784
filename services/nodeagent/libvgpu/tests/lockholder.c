/*
 * lockholder.c - takes the shared cache's lock and keeps it until killed.
 *
 * Follows the documented protocol (LAYOUT.md: slot changes are made under
 * flock(LOCK_EX) on the file), so a test can kill a lock holder with SIGKILL
 * at a moment it chooses and time how long libvgpu processes stay blocked.
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
