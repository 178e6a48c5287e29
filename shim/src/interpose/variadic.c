/* execl, execlp, execle: collect the variable argument list into an argv array and call
 * execv, execvp or execve — which resolve to migshim's wrappers (exec.rs jumps here from
 * the exported execl/execlp/execle). */
#include <alloca.h>
#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

/* Counts the arguments after `arg` up to and including the terminating NULL. */
#define COLLECT(argv, arg, ap)                                         \
    do {                                                               \
        size_t n_ = 1;                                                 \
        if (arg != NULL) {                                             \
            va_list c_;                                                \
            va_copy(c_, ap);                                           \
            while (va_arg(c_, const char *) != NULL) n_++;             \
            va_end(c_);                                                \
            n_++;                                                      \
        }                                                              \
        argv = alloca(n_ * sizeof *argv);                              \
        argv[0] = arg;                                                 \
        for (size_t i_ = 1; arg != NULL && i_ < n_; i_++)              \
            argv[i_] = va_arg(ap, const char *);                       \
    } while (0)

int migshim_execl(const char *path, const char *arg, ...) {
    const char **argv;
    va_list ap;
    va_start(ap, arg);
    COLLECT(argv, arg, ap);
    va_end(ap);
    return execv(path, (char *const *)argv);
}

int migshim_execlp(const char *file, const char *arg, ...) {
    const char **argv;
    va_list ap;
    va_start(ap, arg);
    COLLECT(argv, arg, ap);
    va_end(ap);
    return execvp(file, (char *const *)argv);
}

int migshim_execle(const char *path, const char *arg, ...) {
    const char **argv;
    va_list ap;
    va_start(ap, arg);
    COLLECT(argv, arg, ap);
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, (char *const *)argv, envp);
}
