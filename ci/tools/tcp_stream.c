/* Plain blocking TCP stream on loopback: a second baseline for the "TCP transport, 64 MiB
 * messages" target, doing the same work as bps (iperf3 cannot: its largest block is 1 MiB, which
 * stays in the CPU caches, while 64 MiB messages come from and land in main memory).
 * Two processes (fork): the child writes COUNT messages of SIZE bytes from one SIZE-byte buffer
 * with blocking write(); the parent reads each into one SIZE-byte buffer with blocking read().
 * The first message is not timed. Prints the throughput in Gbit/s.
 * Usage: tcp_stream [SIZE=67108864] [COUNT=40] */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

int main(int argc, char **argv) {
    size_t size = argc > 1 ? strtoull(argv[1], NULL, 0) : (size_t)64 << 20;
    int count = argc > 2 ? atoi(argv[2]) : 40;
    if (size == 0 || count < 2) {
        fprintf(stderr, "usage: tcp_stream [SIZE>0] [COUNT>=2]\n");
        return 2;
    }
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) || getsockname(ls, (struct sockaddr *)&a, &len) ||
        listen(ls, 1))
        die("listen");
    pid_t child = fork();
    if (child < 0) die("fork");
    if (child == 0) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a)) die("connect");
        char *b = malloc(size);
        if (!b) die("malloc");
        memset(b, 1, size);
        for (int i = 0; i < count; i++)
            for (size_t o = 0; o < size;) {
                ssize_t n = write(s, b + o, size - o);
                if (n <= 0) die("write");
                o += (size_t)n;
            }
        char c;
        if (read(s, &c, 1) != 1) die("read ack");
        _exit(0);
    }
    int s = accept(ls, NULL, NULL);
    if (s < 0) die("accept");
    char *b = malloc(size);
    if (!b) die("malloc");
    memset(b, 0, size);
    double t0 = 0;
    for (int i = 0; i < count; i++) {
        for (size_t o = 0; o < size;) {
            ssize_t n = read(s, b + o, size - o);
            if (n <= 0) die("read");
            o += (size_t)n;
        }
        if (i == 0) t0 = now_s();
    }
    double t = now_s() - t0;
    if (write(s, "x", 1) != 1) die("write ack");
    int st = 0;
    waitpid(child, &st, 0);
    printf("tcp_stream size=%zu count=%d gbits=%.3f\n", size, count, (double)size * (count - 1) * 8 / t / 1e9);
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : 1;
}
