/* sighandler: signal handlers that open and close files while the main loop allocates and
 * opens files flat out (a timer fires every 50 us). Under a shim whose wrappers were not
 * async-signal-safe this deadlocks in malloc. Also checks that sigaction() and signal()
 * report the app's own handlers back.  Prints "handled N signals, handlers reported ok". */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t handled;

static void on_alarm(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)si; (void)uc;
    int fd = open("/dev/null", O_RDONLY);
    if (fd >= 0) close(fd);
    handled++;
}

static void on_usr2(int sig) { (void)sig; }

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_alarm;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    struct sigaction old;
    sigaction(SIGALRM, NULL, &old);
    if (old.sa_sigaction != on_alarm || !(old.sa_flags & SA_SIGINFO)) {
        printf("FAIL: sigaction reports another handler\n");
        return 1;
    }
    signal(SIGUSR2, on_usr2);
    if (signal(SIGUSR2, SIG_DFL) != on_usr2) {
        printf("FAIL: signal() reports another handler\n");
        return 1;
    }
    struct itimerval it = {{0, 50}, {0, 50}};
    setitimer(ITIMER_REAL, &it, NULL);
    time_t end = time(NULL) + 2;
    while (time(NULL) < end) {
        for (int i = 0; i < 1000; i++) {
            void *p = malloc(64 + (i % 7) * 100);
            int fd = open("/dev/null", O_RDONLY);
            free(p);
            if (fd >= 0) close(fd);
        }
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("handled %d signals, handlers reported ok\n", (int)handled);
    return handled > 100 ? 0 : 1;
}
