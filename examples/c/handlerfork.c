/* handlerfork: a worker started from a signal handler, as postgres's postmaster starts its
 * children (from its SIGUSR1 and SIGCHLD handlers): the child of that fork never returns
 * from the handler. The worker opens a file there and, each tick, appends a line to it and
 * prints "worker N SIZE" (N its tick, SIZE the file's size after the write, which must
 * equal N lines of its fixed length: "BAD" otherwise). The parent waits in select, printing
 * "parent N", and reaps the worker when it ends.
 * Usage: handlerfork FILE [TICK_MS] */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *path;
static int tick_ms = 50;

#define LINE 16

static void worker(void) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (fd < 0) {
        printf("BAD open %s: %s\n", path, strerror(errno));
        _exit(1);
    }
    char *line = malloc(32);
    for (long n = 1;; n++) {
        snprintf(line, 32, "%-15ld\n", n % 1000000000L);
        struct stat st;
        if (write(fd, line, LINE) != LINE || fstat(fd, &st) != 0) {
            printf("BAD write: %s\n", strerror(errno));
            _exit(1);
        }
        printf("worker %ld %lld%s\n", n, (long long)st.st_size,
               st.st_size == n * LINE ? "" : " BAD");
        usleep(tick_ms * 1000);
    }
}

static void on_usr1(int sig) {
    (void)sig;
    if (fork() == 0) worker(); /* never returns: the worker lives inside this handler */
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: handlerfork FILE [TICK_MS]\n");
        return 2;
    }
    path = argv[1];
    if (argc > 2) tick_ms = atoi(argv[2]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    raise(SIGUSR1);
    for (long n = 1;; n++) {
        struct timeval tv = {0, tick_ms * 1000};
        select(0, NULL, NULL, NULL, &tv);
        printf("parent %ld\n", n);
        int st;
        if (waitpid(-1, &st, WNOHANG) > 0) {
            printf("worker ended\n");
            return 1;
        }
    }
}
