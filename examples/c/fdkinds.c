/* fdkinds: opens one fd of every kind the state table knows, prints what each one is
 * ("fd N KIND key=value ..."), then "ready", and waits for a signal. A test compares the
 * lines with `mig table --json`.  usage: fdkinds DIR   (DIR: where to make files) */
#define _GNU_SOURCE
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int unix_listener(struct sockaddr_un *a, socklen_t len) {
    int l = socket(AF_UNIX, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)a, len) || listen(l, 4)) die("unix listener");
    return l;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: fdkinds DIR\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    const char *dir = argv[1];
    char path[512];

    snprintf(path, sizeof path, "%s/data.txt", dir);
    int f = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (f < 0 || write(f, "hello world\n", 12) != 12) die("file");
    lseek(f, 6, SEEK_SET);
    printf("fd %d file path=%s offset=6\n", f, path);

    snprintf(path, sizeof path, "%s/log.txt", dir);
    int ap = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (ap < 0 || write(ap, "abc", 3) != 3) die("append");
    printf("fd %d file path=%s offset=3 append=1 cloexec=1\n", ap, path);

    snprintf(path, sizeof path, "%s/gone.txt", dir);
    int gone = open(path, O_RDWR | O_CREAT, 0600);
    if (gone < 0 || unlink(path)) die("unlinked");
    printf("fd %d file path=%s deleted=1\n", gone, path);

    int d = open(dir, O_RDONLY | O_DIRECTORY);
    if (d < 0) die("dir");
    printf("fd %d directory path=%s\n", d, dir);

    int null = open("/dev/null", O_RDWR);
    printf("fd %d device path=/dev/null\n", null);

    int dupped = dup(f);
    printf("fd %d file offset=6 same_as=%d\n", dupped, f);

    int p[2];
    if (pipe(p) || write(p[1], "12345", 5) != 5) die("pipe");
    printf("fd %d pipe end=read pipe_of=%d\n", p[0], p[1]);
    printf("fd %d pipe end=write\n", p[1]);

    snprintf(path, sizeof path, "%s/fifo", dir);
    if (mkfifo(path, 0600)) die("mkfifo");
    int fifo = open(path, O_RDWR);
    printf("fd %d fifo path=%s\n", fifo, path);

    int sp[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp)) die("socketpair");
    printf("fd %d socket domain=1 peer_fd=%d\n", sp[0], sp[1]);
    printf("fd %d socket domain=1 peer_fd=%d\n", sp[1], sp[0]);

    struct sockaddr_un ua = {.sun_family = AF_UNIX};
    snprintf(ua.sun_path, sizeof ua.sun_path, "%s/sock", dir);
    int ul = unix_listener(&ua, sizeof ua);
    int uc = socket(AF_UNIX, SOCK_STREAM, 0);
    if (connect(uc, (struct sockaddr *)&ua, sizeof ua)) die("unix connect");
    int us = accept(ul, NULL, NULL);
    printf("fd %d socket domain=1 listening=1 local=%s\n", ul, ua.sun_path);
    printf("fd %d socket domain=1 peer_fd=%d\n", uc, us);
    printf("fd %d socket domain=1 peer_fd=%d\n", us, uc);

    struct sockaddr_un ab = {.sun_family = AF_UNIX};
    int abn = snprintf(ab.sun_path + 1, sizeof ab.sun_path - 1, "fdkinds:%s", dir);
    int abl = unix_listener(&ab, offsetof(struct sockaddr_un, sun_path) + 1 + abn);
    printf("fd %d socket domain=1 listening=1 local=@%s\n", abl, ab.sun_path + 1);

    struct sockaddr_in in = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t inlen = sizeof in;
    int tl = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(tl, (struct sockaddr *)&in, sizeof in) || listen(tl, 4) ||
        getsockname(tl, (struct sockaddr *)&in, &inlen))
        die("tcp listener");
    int tc = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(tc, (struct sockaddr *)&in, sizeof in)) die("tcp connect");
    int ts = accept(tl, NULL, NULL);
    if (write(tc, "ping", 4) != 4) die("tcp write");
    printf("fd %d socket domain=2 listening=1 port=%d\n", tl, ntohs(in.sin_port));
    printf("fd %d socket domain=2 peer_fd=%d\n", tc, ts);
    printf("fd %d socket domain=2 peer_fd=%d\n", ts, tc);

    struct sockaddr_in ud = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int u = socket(AF_INET, SOCK_DGRAM, 0);
    if (bind(u, (struct sockaddr *)&ud, sizeof ud)) die("udp");
    printf("fd %d socket domain=2 type=2\n", u);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 77};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &ev)) die("epoll");
    printf("fd %d epoll interest_fd=%d interest_data=77 cloexec=1\n", ep, p[0]);

    int efd = eventfd(0, EFD_NONBLOCK);
    uint64_t five = 5;
    if (efd < 0 || write(efd, &five, 8) != 8) die("eventfd");
    printf("fd %d eventfd count=5\n", efd);

    int tfd = timerfd_create(CLOCK_MONOTONIC, 0);
    struct itimerspec its = {.it_value = {100, 0}, .it_interval = {1, 0}};
    if (tfd < 0 || timerfd_settime(tfd, 0, &its, NULL)) die("timerfd");
    printf("fd %d timerfd interval_ns=1000000000\n", tfd);

    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGUSR2);
    sigprocmask(SIG_BLOCK, &m, NULL);
    int sfd = signalfd(-1, &m, 0);
    printf("fd %d signalfd mask=%llu\n", sfd, 1ULL << (SIGUSR2 - 1));

    int mfd = memfd_create("fdkinds-mem", 0);
    if (mfd < 0 || ftruncate(mfd, 4096)) die("memfd");
    printf("fd %d memfd name=fdkinds-mem size=4096\n", mfd);

    int ino = inotify_init1(0);
    if (ino < 0 || inotify_add_watch(ino, dir, IN_CREATE) < 0) die("inotify");
    printf("fd %d inotify watch_path=%s\n", ino, dir);

    int ptm = posix_openpt(O_RDWR | O_NOCTTY);
    if (ptm < 0 || grantpt(ptm) || unlockpt(ptm)) die("pty");
    printf("fd %d pty-master\n", ptm);
    int pts = open(ptsname(ptm), O_RDWR | O_NOCTTY);
    printf("fd %d device path=%s tty=1\n", pts, ptsname(ptm));

    void *map = mmap(NULL, 12, PROT_READ, MAP_SHARED, f, 0);
    if (map == MAP_FAILED) die("mmap");
    snprintf(path, sizeof path, "%s/data.txt", dir);
    printf("mapping %s\n", path);

    printf("ready\n");
    for (;;) pause();
}
