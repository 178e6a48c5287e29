/* threadfork: a chain of 13 processes, each starting a thread and forking the next at once
 * (a little later at each step; a fork copies whatever another thread holds at that instant: the first thread an app
 * starts starts the shim's control thread too). Each prints "pK N ok" every 100 ms.
 * usage: threadfork */
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <unistd.h>

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) pause();
    return NULL;
}

int main(void) {
    int k = 0;
    while (k < 12) {
        pthread_t t;
        pthread_create(&t, NULL, sleeper, NULL);
        // A little later at each step, so that some fork meets the new threads at work.
        for (int i = 0; i < k; i++) sched_yield();
        if (fork() != 0) break;
        k++;
    }
    for (long n = 1;; n++) {
        char line[64];
        int len = snprintf(line, sizeof line, "p%d %ld ok\n", k, n);
        write(1, line, len);
        usleep(100000);
    }
}
