/* Raw TCP ping-pong on loopback: the baseline of the "4-byte push_pull round trip" target.
 * Two processes (fork), blocking sockets, TCP_NODELAY, SIZE-byte messages bounced ITERS times.
 * Prints the median, p99 and minimum round trip in microseconds.
 * Usage: tcp_pingpong [SIZE=4] [ITERS=2000] */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void full(int fd, char *buf, size_t n, int rd) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = rd ? read(fd, buf + got, n - got) : write(fd, buf + got, n - got);
        if (r <= 0) { perror(rd ? "read" : "write"); exit(1); }
        got += (size_t)r;
    }
}

int main(int argc, char **argv) {
    size_t size = argc > 1 ? (size_t)atol(argv[1]) : 4;
    int iters = argc > 2 ? atoi(argv[2]) : 2000;
    int one = 1;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1)) { perror("listen"); return 1; }
    socklen_t al = sizeof a;
    getsockname(l, (struct sockaddr *)&a, &al);
    char *buf = calloc(1, size);
    pid_t pid = fork();
    if (pid == 0) {
        int c = accept(l, NULL, NULL);
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        for (int i = 0; i < iters + 100; i++) { full(c, buf, size, 1); full(c, buf, size, 0); }
        return 0;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (struct sockaddr *)&a, sizeof a)) { perror("connect"); return 1; }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    double *rt = malloc(sizeof(double) * iters);
    for (int i = 0; i < iters + 100; i++) {
        double t0 = now_us();
        full(s, buf, size, 0);
        full(s, buf, size, 1);
        if (i >= 100) rt[i - 100] = now_us() - t0;
    }
    waitpid(pid, NULL, 0);
    qsort(rt, iters, sizeof(double), cmp);
    printf("tcp_pingpong size=%zu iters=%d median_us=%.1f p99_us=%.1f min_us=%.1f\n", size, iters,
           rt[iters / 2], rt[(int)(iters * 0.99)], rt[0]);
    return 0;
}
