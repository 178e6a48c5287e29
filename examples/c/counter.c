/* counter: counts up, one line per tick, and keeps a block of patterned memory it verifies
 * on every tick. The demo subject.  usage: counter [ticks_per_second] [MiB] [MiB_written_per_second]
 *
 * Each page holds its number and its generation, and a pattern of both; a separate table
 * holds the generations too; with a write rate, pages are written anew (next generation) round-robin.
 * A page that came back older or newer than the table says is "damaged". */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

/* A page begins with its number and its generation (8 bytes each: no two pages are alike,
 * as in a real program's memory), then a pattern of both. */
static unsigned char expected(size_t page, uint32_t gen, size_t j) {
    if (j < 8) return (unsigned char)((uint64_t)page >> (8 * j));
    if (j < 16) return (unsigned char)((uint64_t)gen >> (8 * (j - 8)));
    return (unsigned char)(page * 131 + gen * 7 + j);
}

static void fill(unsigned char *p, size_t page, uint32_t gen) {
    for (size_t j = 0; j < PAGE; j++) p[j] = expected(page, gen, j);
}

int main(int argc, char **argv) {
    double hz = argc > 1 ? atof(argv[1]) : 5;
    size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 16;
    double rate = argc > 3 ? atof(argv[3]) : 0;
    size_t pages = (mib << 20) / PAGE;
    unsigned char *mem = malloc(pages ? pages * PAGE : 1);
    uint32_t *gen = calloc(pages ? pages : 1, sizeof *gen);
    for (size_t p = 0; p < pages; p++) fill(mem + p * PAGE, p, 0);
    struct timespec d = {0, (long)(1e9 / (hz > 0 ? hz : 5))};
    if (hz <= 1) d = (struct timespec){(time_t)(1 / hz), 0};
    size_t per_tick = (size_t)(rate * 256 / (hz > 0 ? hz : 5)), cursor = 0;
    for (unsigned long count = 1;; count++) {
        for (size_t i = 0; i < pages * PAGE; i += 4093) {
            size_t p = i / PAGE;
            if (mem[i] != expected(p, gen[p], i % PAGE)) {
                printf("memory damaged at %zu (page %zu, generation %u)\n", i, p, gen[p]);
                return 1;
            }
        }
        for (size_t k = 0; k < per_tick && pages; k++, cursor = (cursor + 1) % pages)
            fill(mem + cursor * PAGE, cursor, ++gen[cursor]);
        printf("count %lu pid %d\n", count, getpid());
        fflush(stdout);
        nanosleep(&d, NULL);
    }
}
