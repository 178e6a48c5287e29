/* openclose: N open/close pairs on a file, then "done N" and wait for a signal (or, with
 * --exit, exit). Shows that the journal stays flat; with --exit, a subject for counting
 * instructions (valgrind --tool=callgrind).  usage: openclose FILE N [--exit] */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    long n = atol(argv[2]);
    for (long i = 0; i < n; i++) {
        int fd = open(argv[1], O_RDONLY | O_CREAT, 0644);
        if (fd < 0) {
            perror("open");
            return 1;
        }
        close(fd);
    }
    printf("done %ld\n", n);
    fflush(stdout);
    if (argc > 3 && strcmp(argv[3], "--exit") == 0) return 0;
    for (;;) pause();
}
