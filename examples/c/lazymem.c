/* lazymem: keeps a block of patterned memory and changes its own address space all the
 * time, as a lazily restored process may while its pages are still being filled in: each
 * tick it verifies the block, forks a child that verifies it too, frees a chunk with
 * madvise(MADV_DONTNEED) (which must then read as zeros) and fills it again, and moves
 * another chunk away with mremap and back. Prints "tick N" per tick, "BAD ..." on damage.
 * usage: lazymem [MiB] */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define CHUNK (256 * PAGE)

static unsigned char *mem;
static uint32_t *gen;
static size_t pages;

static unsigned char expected(size_t p, size_t j) { return (unsigned char)(p * 29 + gen[p] * 11 + j); }

static void fill(size_t p) {
    for (size_t j = 0; j < PAGE; j++) mem[p * PAGE + j] = expected(p, j);
}

/* Every page, a few bytes each: the first damaged page, or -1. */
static long check(const unsigned char *at, size_t first, size_t n) {
    for (size_t p = first; p < first + n; p++)
        for (size_t j = 0; j < PAGE; j += 1021)
            if (at[(p - first) * PAGE + j] != expected(p, j)) return (long)p;
    return -1;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    pages = (mib << 20) / PAGE;
    size_t chunk_pages = CHUNK / PAGE, chunks = pages / chunk_pages;
    mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    gen = calloc(pages, sizeof *gen);
    unsigned char *away = mmap(NULL, CHUNK, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED || away == MAP_FAILED || !gen || chunks < 2) return 2;
    for (size_t p = 0; p < pages; p++) fill(p);
    struct timespec d = {0, 50 * 1000 * 1000};
    for (unsigned long tick = 1;; tick++) {
        long bad = check(mem, 0, pages);
        if (bad >= 0) printf("BAD memory at page %ld\n", bad);
        pid_t c = fork();
        if (c == 0) _exit(check(mem, 0, pages) >= 0);
        int st = 0;
        waitpid(c, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) printf("BAD memory in a forked child\n");
        size_t k = tick % chunks, first = k * chunk_pages;
        madvise(mem + first * PAGE, CHUNK, MADV_DONTNEED);
        for (size_t i = 0; i < CHUNK; i += 509)
            if (mem[first * PAGE + i] != 0) {
                printf("BAD freed memory not zero at page %zu\n", first + i / PAGE);
                break;
            }
        for (size_t p = first; p < first + chunk_pages; p++) gen[p]++, fill(p);
        size_t m = (tick + chunks / 2) % chunks, mfirst = m * chunk_pages;
        unsigned char *at = mremap(mem + mfirst * PAGE, CHUNK, CHUNK, MREMAP_MAYMOVE | MREMAP_FIXED, away);
        if (at != away || check(away, mfirst, chunk_pages) >= 0) printf("BAD moved memory\n");
        if (mremap(away, CHUNK, CHUNK, MREMAP_MAYMOVE | MREMAP_FIXED, mem + mfirst * PAGE) == MAP_FAILED)
            printf("BAD moving back\n");
        away = mmap(away, CHUNK, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        printf("tick %lu\n", tick);
        fflush(stdout);
        nanosleep(&d, NULL);
    }
}
