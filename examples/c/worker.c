/* worker: keeps MiB of patterned memory and checks all of it every 50 ms, printing
 * "tick N"; on SIGUSR1 it forks a worker that goes on the same way with its copy, printing
 * "worker tick N", until it is ended. Prints "BAD ..." on damage. usage: worker [MiB] */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static volatile sig_atomic_t asked;

static void on_usr1(int sig) {
    (void)sig;
    asked = 1;
}

int main(int argc, char **argv) {
    size_t pages = ((argc > 1 ? strtoul(argv[1], NULL, 10) : 64) << 20) / PAGE;
    unsigned char *mem = malloc(pages * PAGE);
    if (!mem) return 2;
    for (size_t i = 0; i < pages * PAGE; i++) mem[i] = (unsigned char)(i * 7 + i / PAGE);
    signal(SIGUSR1, on_usr1);
    const char *who = "tick";
    struct timespec d = {0, 50 * 1000 * 1000};
    for (unsigned long tick = 1;; tick++) {
        for (size_t i = 0; i < pages * PAGE; i += 509)
            if (mem[i] != (unsigned char)(i * 7 + i / PAGE)) {
                printf("BAD memory at %zu in the %s\n", i, who);
                break;
            }
        if (asked && who[0] == 't') {
            asked = 0;
            if (fork() == 0) who = "worker tick", tick = 0;
        }
        printf("%s %lu\n", who, tick);
        fflush(stdout);
        nanosleep(&d, NULL);
    }
}
