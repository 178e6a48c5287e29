/* counter: counts up, one line per tick, and keeps a block of patterned memory it verifies
 * on every tick. The demo subject.  usage: counter [ticks_per_second] [MiB] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    double hz = argc > 1 ? atof(argv[1]) : 5;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 16;
    size_t n = mib << 20;
    unsigned char *mem = malloc(n ? n : 1);
    for (size_t i = 0; i < n; i++) mem[i] = (unsigned char)(i * 31 + 7);
    struct timespec d = {0, (long)(1e9 / (hz > 0 ? hz : 5))};
    if (hz <= 1) d = (struct timespec){(time_t)(1 / hz), 0};
    for (unsigned long count = 1;; count++) {
        for (size_t i = 0; i < n; i += 4093)
            if (mem[i] != (unsigned char)(i * 31 + 7)) {
                printf("memory damaged at %zu\n", i);
                return 1;
            }
        printf("count %lu pid %d\n", count, getpid());
        fflush(stdout);
        nanosleep(&d, NULL);
    }
}
