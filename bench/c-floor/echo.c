/*
 * The floor of the peer benchmarks (bench/compare.sh): a minimal pre-forking epoll uppercase
 * echo, to show how close forkpool comes to what the kernel allows.
 *
 *   cc -O3 -o echo bench/c-floor/echo.c && ./echo 127.0.0.1:0 2
 *
 * Prints "listening on HOST:PORT" once every worker listens. Each worker has its own
 * SO_REUSEPORT listener (the kernel balances connections over them) and a level-triggered
 * epoll loop: one read into a per-worker buffer, uppercase ASCII in place, one write. A
 * connection holds no buffer while idle; only a reply the socket could not take at once is
 * kept (and reading from that connection stops until it is sent).
 *
 * Deliberately not a server: ASCII only (multi-byte UTF-8 goes back unchanged, so a checking
 * client counts those lines as wrong), no configuration, no timeouts, no graceful shutdown.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define READ_BYTES (64 * 1024)
#define EVENTS 256

/* A reply the socket did not take at once, kept until EPOLLOUT. */
struct pending {
    size_t len, off;
    char data[];
};

static void die(const char *what) {
    perror(what);
    exit(1);
}

static int listen_on(const struct sockaddr_in *addr) {
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0) die("SO_REUSEADDR");
    if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) die("SO_REUSEPORT");
    if (bind(fd, (const struct sockaddr *)addr, sizeof *addr) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void watch(int ep, int op, int fd, unsigned events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(ep, op, fd, &ev) < 0 && op != EPOLL_CTL_DEL) die("epoll_ctl");
}

static void drop(int ep, int fd, struct pending **held) {
    free(held[fd]);
    held[fd] = NULL;
    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    close(fd);
}

/* Sends what `fd` still owes; 0 when all is sent, 1 when the socket is full, -1 on error. */
static int send_held(int fd, struct pending *p) {
    while (p->off < p->len) {
        ssize_t n = write(fd, p->data + p->off, p->len - p->off);
        if (n < 0) return (errno == EAGAIN || errno == EINTR) ? 1 : -1;
        p->off += (size_t)n;
    }
    return 0;
}

static void worker(int lfd, int ready) {
    static char buf[READ_BYTES];
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    /* Indexed by descriptor; untouched pages of calloc'd memory cost no RSS. */
    struct pending **held = calloc(rl.rlim_cur, sizeof *held);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0 || held == NULL) die("worker setup");
    watch(ep, EPOLL_CTL_ADD, lfd, EPOLLIN);
    if (write(ready, "r", 1) != 1) die("ready");
    close(ready);

    struct epoll_event events[EVENTS];
    for (;;) {
        int n = epoll_wait(ep, events, EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    if ((rlim_t)c >= rl.rlim_cur) { close(c); continue; }
                    int one = 1;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    watch(ep, EPOLL_CTL_ADD, c, EPOLLIN);
                }
                continue;
            }
            if (held[fd] != NULL) { /* EPOLLOUT: finish the held reply, then read again */
                int r = send_held(fd, held[fd]);
                if (r < 0) { drop(ep, fd, held); continue; }
                if (r == 0) {
                    free(held[fd]);
                    held[fd] = NULL;
                    watch(ep, EPOLL_CTL_MOD, fd, EPOLLIN);
                }
                continue;
            }
            ssize_t got = read(fd, buf, sizeof buf);
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (got <= 0) { drop(ep, fd, held); continue; }
            /* Branch-free so the compiler vectorises it (GCC 12 does at -O3, not at -O2: 14 µs
             * of server CPU per 16 KiB request at -O2, 6.7 at -O3): with random text a branch
             * per byte mispredicts about half the time and costs ~3 ns a byte (measured: 56 µs
             * of user time per 16 KiB request with `if (...) buf[k] -= 32`). */
            for (ssize_t k = 0; k < got; k++)
                buf[k] ^= (char)(((unsigned char)(buf[k] - 'a') < 26) << 5);
            ssize_t sent = write(fd, buf, (size_t)got);
            if (sent < 0 && errno != EAGAIN && errno != EINTR) { drop(ep, fd, held); continue; }
            if (sent < 0) sent = 0;
            if (sent < got) {
                struct pending *p = malloc(sizeof *p + (size_t)(got - sent));
                if (p == NULL) die("malloc");
                p->len = (size_t)(got - sent);
                p->off = 0;
                memcpy(p->data, buf + sent, p->len);
                held[fd] = p;
                watch(ep, EPOLL_CTL_MOD, fd, EPOLLOUT);
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s HOST:PORT WORKERS   (IPv4, port 0 picks one)\n", argv[0]);
        return 2;
    }
    char host[64];
    int port, workers = atoi(argv[2]);
    if (sscanf(argv[1], "%63[^:]:%d", host, &port) != 2 || workers < 1) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("address");
    /* The first socket resolves port 0; every other worker joins its port's reuseport group. */
    int first = listen_on(&addr);
    socklen_t len = sizeof addr;
    getsockname(first, (struct sockaddr *)&addr, &len);

    int ready[2];
    if (pipe(ready) < 0) die("pipe");
    pid_t master = getpid();
    for (int w = 0; w < workers; w++) {
        pid_t pid = fork();
        if (pid < 0) die("fork");
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != master) _exit(1);
            close(ready[0]);
            int lfd = w == 0 ? first : listen_on(&addr);
            if (w != 0) close(first);
            worker(lfd, ready[1]);
        }
    }
    close(first);
    close(ready[1]);
    char byte;
    for (int w = 0; w < workers; w++)
        if (read(ready[0], &byte, 1) != 1) die("worker start");
    printf("listening on %s:%d\n", host, ntohs(addr.sin_port));
    fflush(stdout);
    while (wait(NULL) > 0 || errno == EINTR) {}
    return 0;
}
