/* sparsemem: a large private mapping of which little is used, as a program that reserves
 * a big heap does: one page in 64 holds data, one in 64 was written with zeros, one in 64
 * was only read (the shared zero page); the rest never touched. Each tick it checks those
 * pages and the ones it wrote since, reads one page never touched before (zeros), writes
 * data into one more page, and prints "tick N rss KIB" (its resident memory); "BAD ..." on
 * damage. With GIB, it also reserves that many GiB it never touches but for their last
 * page (as runtimes reserve heaps), which it checks too.
 * usage: sparsemem [MiB [GIB]] */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096

static unsigned char *mem;
static unsigned char *val; /* each page's data byte; 0: none (reads as zeros) */

static void put(size_t p, unsigned char v) {
    val[p] = v;
    memset(mem + p * PAGE, v, 64);
    memset(mem + p * PAGE + PAGE - 64, v, 64);
}

static long rss_kib(void) {
    long size = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &size, &resident) != 2) resident = -1;
    if (f) fclose(f);
    return resident * (PAGE / 1024);
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
    size_t pages = (mib << 20) / PAGE;
    mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    val = calloc(pages, 1);
    if (mem == MAP_FAILED || !val || pages < 128) return 2;
    size_t far = argc > 2 ? strtoul(argv[2], NULL, 10) << 30 : 0;
    unsigned char *reserved = NULL;
    if (far) {
        reserved = mmap(NULL, far, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (reserved == MAP_FAILED) return 2;
        memset(reserved + far - PAGE, 0x5a, PAGE);
    }
    volatile unsigned char sink = 0;
    for (size_t p = 0; p < pages; p += 64) {
        put(p, (unsigned char)(p / 64 % 250 + 1));
        if (p + 1 < pages) memset(mem + (p + 1) * PAGE, 0, PAGE);
        if (p + 2 < pages) sink += mem[(p + 2) * PAGE];
    }
    struct timespec d = {0, 50 * 1000 * 1000};
    for (unsigned long tick = 1;; tick++) {
        size_t fresh = (tick * 64 + 4) % pages;
        for (size_t p = 0; p < pages; p++) {
            if (p % 64 > 2 && !val[p] && p != fresh) continue;
            const unsigned char *at = mem + p * PAGE;
            unsigned char v = val[p];
            if (at[0] != v || at[63] != v || at[PAGE - 1] != v || at[PAGE / 2] != 0) {
                printf("BAD page %zu: %u, %u, %u, %u where %u\n", p, at[0], at[63],
                       at[PAGE - 1], at[PAGE / 2], v);
                break;
            }
        }
        if (reserved && (reserved[far - 1] != 0x5a || reserved[far / 2] != 0)) printf("BAD reserved memory\n");
        size_t q = (tick * 64 * 7 + 5) % pages;
        put(q, (unsigned char)(tick % 250 + 1));
        printf("tick %lu rss %ld\n", tick, rss_kib());
        fflush(stdout);
        nanosleep(&d, NULL);
    }
}
