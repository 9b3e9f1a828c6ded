/*
 * A wall clock of its own for one process: loaded with LD_PRELOAD, it adds an offset to what
 * clock_gettime() says for CLOCK_REALTIME (and its coarse twin), and leaves every other clock,
 * the monotonic ones above all, alone. The machine's clock is never touched.
 *
 * The offset lives in the file HERD_CLOCK_DIR/<pid>: eight bytes, a signed number of
 * nanoseconds in the machine's byte order. The file is made (zero) when the process starts and
 * mapped shared, so a test that writes the file in place (never truncating it) moves the
 * process's clock from its next reading on. Without HERD_CLOCK_DIR the clock is the machine's.
 *
 * Built by tests/chaos.rs with the C compiler Rust links with: cc -shared -fPIC.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int (*clock_gettime_fn)(clockid_t, struct timespec *);

static clock_gettime_fn real_clock_gettime;
static const volatile int64_t *offset_ns;

static clock_gettime_fn real(void) {
    if (!real_clock_gettime) {
        real_clock_gettime = (clock_gettime_fn)dlsym(RTLD_NEXT, "clock_gettime");
    }
    return real_clock_gettime;
}

__attribute__((constructor)) static void clock_shift_init(void) {
    real();
    const char *dir = getenv("HERD_CLOCK_DIR");
    if (!dir || !*dir) {
        return;
    }
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%ld", dir, (long)getpid()) >= (int)sizeof path) {
        return;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        return;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || (st.st_size < 8 && ftruncate(fd, 8) != 0)) {
        close(fd);
        return;
    }
    void *p = mmap(NULL, 8, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (p != MAP_FAILED) {
        offset_ns = (const volatile int64_t *)p;
    }
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    clock_gettime_fn f = real();
    if (!f) {
        return -1;
    }
    int r = f(clock, ts);
    if (r != 0 || !offset_ns || (clock != CLOCK_REALTIME && clock != CLOCK_REALTIME_COARSE)) {
        return r;
    }
    int64_t off = *offset_ns;
    int64_t ns = (int64_t)ts->tv_nsec + off % 1000000000;
    ts->tv_sec += off / 1000000000;
    if (ns < 0) {
        ns += 1000000000;
        ts->tv_sec -= 1;
    } else if (ns >= 1000000000) {
        ns -= 1000000000;
        ts->tv_sec += 1;
    }
    ts->tv_nsec = ns;
    return r;
}
