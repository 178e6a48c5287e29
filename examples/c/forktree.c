/* forktree: a small process tree that cross-checks what it is told about pids.
 * The parent forks three children; child 0 forks a grandchild and reaps it, child 1 waits
 * for SIGUSR1 from the parent, child 2 exits at once. Every process reports getpid() and
 * getppid() through a pipe; the parent checks them against fork's return values, kills and
 * reaps by pid, and checks system() and popen() children see it as their parent.
 * Prints "pids parent=P children=A,B,C grandchild=G" and "forktree: N checks passed",
 * or "FAIL: ..." and exits 1. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int checks;
#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            printf("FAIL: " __VA_ARGS__);                                  \
            printf("\n");                                                  \
            fflush(stdout);                                                \
            exit(1);                                                       \
        }                                                                  \
        checks++;                                                          \
    } while (0)

static volatile sig_atomic_t got_usr1;
static void on_usr1(int sig) { (void)sig; got_usr1 = 1; }

static void report(int fd, const char *who, int extra) {
    char line[128];
    int n = snprintf(line, sizeof line, "%s %d %d %d\n", who, getpid(), getppid(), extra);
    if (write(fd, line, n) != n) _exit(99);
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    signal(SIGUSR1, on_usr1);
    sigset_t usr1, old;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_BLOCK, &usr1, &old);

    int p[2];
    CHECK(pipe(p) == 0, "pipe");
    pid_t me = getpid(), kids[3], grandchild = 0;
    for (int i = 0; i < 3; i++) {
        pid_t c = fork();
        CHECK(c >= 0, "fork: %s", strerror(errno));
        if (c == 0) {
            close(p[0]);
            report(p[1], "child", i);
            if (i == 0) {
                pid_t g = fork();
                if (g == 0) {
                    report(p[1], "grandchild", 0);
                    _exit(7);
                }
                int st;
                pid_t w = waitpid(g, &st, 0);
                report(p[1], "reaped", w == g && WIFEXITED(st) && WEXITSTATUS(st) == 7 ? g : -1);
                _exit(0);
            }
            if (i == 1) {
                while (!got_usr1) sigsuspend(&old);
                _exit(42);
            }
            _exit(3);
        }
        kids[i] = c;
    }
    close(p[1]);

    FILE *in = fdopen(p[0], "r");
    char who[32];
    int pid, ppid, extra, reports = 0;
    while (fscanf(in, "%31s %d %d %d", who, &pid, &ppid, &extra) == 4) {
        reports++;
        if (strcmp(who, "child") == 0) {
            CHECK(pid == kids[extra], "child %d says pid %d, fork said %d", extra, pid, kids[extra]);
            CHECK(ppid == me, "child %d says parent %d, parent is %d", extra, ppid, me);
            if (extra == 1) CHECK(kill(kids[1], SIGUSR1) == 0, "kill child 1: %s", strerror(errno));
        } else if (strcmp(who, "grandchild") == 0) {
            grandchild = pid;
            CHECK(ppid == kids[0], "grandchild's parent %d, child 0 is %d", ppid, kids[0]);
        } else if (strcmp(who, "reaped") == 0) {
            CHECK(extra == grandchild && extra > 0, "child 0 reaped %d, grandchild is %d", extra, grandchild);
        }
    }
    CHECK(reports == 5, "%d reports, expected 5", reports);

    int want[3] = {0, 42, 3};
    for (int i = 2; i >= 0; i--) {
        int st;
        pid_t w = waitpid(kids[i], &st, 0);
        CHECK(w == kids[i], "waitpid(%d) returned %d (%s)", kids[i], w, strerror(errno));
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == want[i], "child %d status %#x", i, st);
    }
    CHECK(kill(kids[2], 0) == -1 && errno == ESRCH, "a reaped child is gone");
    CHECK(waitpid(-1, NULL, WNOHANG) == -1 && errno == ECHILD, "no children left");

    int st = system("exit 5");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 5, "system status %#x", st);
    FILE *pp = popen("echo $PPID", "r");
    CHECK(pp != NULL, "popen");
    int popen_parent = 0;
    CHECK(fscanf(pp, "%d", &popen_parent) == 1, "popen output");
    pclose(pp);
    CHECK(popen_parent == me, "popen's shell says its parent is %d, we are %d", popen_parent, me);

    printf("pids parent=%d children=%d,%d,%d grandchild=%d\n", me, kids[0], kids[1], kids[2], grandchild);
    printf("forktree: %d checks passed\n", checks);
    return 0;
}
