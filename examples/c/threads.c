/* threads: workers that count under a mutex and wait on a condition variable; the main
 * thread wakes them each tick, pthread_kill()s each (a SIGUSR1 handler counts per thread),
 * and prints "tick N work=a,b,c sig=x,y,z tids=..." . At tick STOP it tells them to end,
 * pthread_join()s each, checks what they returned, prints "joined rseq=a,b,c,m" (1 where
 * the thread's rseq area is registered with the kernel, as glibc left it) and exits 0.
 * With MiB, it also holds that much patterned memory and verifies it every tick.
 * usage: threads [STOP] [HZ] [MiB] */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <errno.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <unistd.h>

#define N 3
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long work[N], round_no;
static int stop;
static volatile sig_atomic_t sigs[N];
static __thread int me = -1;
static pid_t tids[N];
static int rseq_ok[N + 1];

/* Whether the calling thread's rseq area is registered: registering it again says EBUSY
 * then (if it was not, it was registered by this probe, and is taken back). */
static int rseq_registered(void) {
    if (__rseq_size == 0) return 1; /* glibc registered none: nothing to keep */
    void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
    if (syscall(SYS_rseq, area, 32, 0, RSEQ_SIG) == 0) {
        syscall(SYS_rseq, area, 32, 1 /* RSEQ_FLAG_UNREGISTER */, RSEQ_SIG);
        return 0;
    }
    return errno == EBUSY;
}

static void on_usr1(int s) {
    (void)s;
    if (me >= 0) sigs[me]++;
}

static void *worker(void *arg) {
    me = (int)(long)arg;
    tids[me] = gettid();
    long seen = 0;
    pthread_mutex_lock(&mu);
    while (!stop) {
        while (round_no == seen && !stop) pthread_cond_wait(&cv, &mu);
        seen = round_no;
        work[me]++;
    }
    pthread_mutex_unlock(&mu);
    rseq_ok[me] = rseq_registered();
    return (void *)(100L + me);
}

int main(int argc, char **argv) {
    long stop_at = argc > 1 ? atol(argv[1]) : 40;
    double hz = argc > 2 ? atof(argv[2]) : 20;
    size_t mem_len = (argc > 3 ? strtoul(argv[3], NULL, 10) : 0) << 20;
    unsigned char *mem = mem_len ? malloc(mem_len) : NULL;
    for (size_t i = 0; i < mem_len; i++) mem[i] = (unsigned char)(i * 31 + 7);
    signal(SIGUSR1, on_usr1);
    pthread_t th[N];
    for (long i = 0; i < N; i++) pthread_create(&th[i], NULL, worker, (void *)i);
    struct timespec d = {0, (long)(1e9 / hz)};
    for (long tick = 1; tick <= stop_at; tick++) {
        nanosleep(&d, NULL);
        for (size_t i = 0; i < mem_len; i += 4093)
            if (mem[i] != (unsigned char)(i * 31 + 7)) {
                printf("FAIL: memory damaged at %zu\n", i);
                return 1;
            }
        pthread_mutex_lock(&mu);
        round_no++;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
        for (int i = 0; i < N; i++) pthread_kill(th[i], SIGUSR1);
        pthread_mutex_lock(&mu);
        printf("tick %ld work=%ld,%ld,%ld sig=%d,%d,%d tids=%d,%d,%d\n", tick, work[0], work[1], work[2],
               (int)sigs[0], (int)sigs[1], (int)sigs[2], tids[0], tids[1], tids[2]);
        pthread_mutex_unlock(&mu);
        fflush(stdout);
    }
    pthread_mutex_lock(&mu);
    stop = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < N; i++) {
        void *ret;
        if (pthread_join(th[i], &ret) != 0 || ret != (void *)(100L + i)) {
            printf("FAIL: join %d\n", i);
            return 1;
        }
    }
    rseq_ok[N] = rseq_registered();
    printf("joined rseq=%d,%d,%d,%d\n", rseq_ok[0], rseq_ok[1], rseq_ok[2], rseq_ok[3]);
    return 0;
}
