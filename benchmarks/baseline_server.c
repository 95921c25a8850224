/*
 * baseline_server.c: the "do nothing" policy server, the floor for server CPU per request.
 *
 * It speaks the transport half of the mailpolicy protocol (one request per Unix-socket
 * connection, Exim ${readsocket} style) and nothing else: accept, read until "\n" or EOF,
 * write a fixed "ACCEPT 250 2.1.5 ok\n", close. Whatever CPU it spends per request is the
 * kernel's socket cost plus the least user-space work any server must do, so the daemon's
 * CPU per request is judged as a multiple of this.
 *
 * Deliberately the textbook single-threaded epoll loop (accept -> register EPOLLIN -> read
 * when readable -> reply -> close), the same shape an asyncio/uvloop server has, so the
 * comparison measures Python's overhead and not a cleverer syscall pattern.
 *
 * Build: gcc -O2 -Wall -Wextra -o baseline_server baseline_server.c
 * Run:   baseline_server SOCKET_PATH
 * Stops on SIGTERM/SIGINT (removes the socket file).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define BACKLOG 1024
/* mailpolicy's MAX_LINE: a request longer than this is answered anyway, like EOF. */
#define MAX_LINE 4096
#define MAX_EVENTS 256

static const char REPLY[] = "ACCEPT 250 2.1.5 ok\n";

static volatile sig_atomic_t stop_requested = 0;

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

/* Per-connection state, indexed by fd: we only need how much of the line we have seen and
 * how much of the reply is written. fds are small integers, so a flat table is simplest. */
struct conn {
    size_t seen;    /* request bytes read so far (the line itself is not kept) */
    size_t written; /* reply bytes written so far */
    int replying;   /* 1 once the request is complete and we wait for EPOLLOUT */
};

static struct conn *conns;
static size_t max_conns;

static void finish(int fd) {
    /* close() also removes fd from the epoll set: no separate EPOLL_CTL_DEL syscall. */
    close(fd);
}

/* Write what remains of the reply. Returns 1 when done (fd closed), 0 when it must wait for
 * EPOLLOUT, -1 on error (fd closed). */
static int write_reply(int ep, int fd) {
    struct conn *c = &conns[fd];
    while (c->written < sizeof(REPLY) - 1) {
        ssize_t n = send(fd, REPLY + c->written, sizeof(REPLY) - 1 - c->written, MSG_NOSIGNAL);
        if (n > 0) {
            c->written += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->replying) {
                struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
                c->replying = 1;
                if (epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev) < 0) {
                    finish(fd);
                    return -1;
                }
            }
            return 0;
        }
        finish(fd);
        return -1;
    }
    finish(fd);
    return 1;
}

static void on_readable(int ep, int fd) {
    struct conn *c = &conns[fd];
    char buf[MAX_LINE];
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n > 0) {
            c->seen += (size_t)n;
            if (memchr(buf, '\n', (size_t)n) != NULL || c->seen >= MAX_LINE) {
                write_reply(ep, fd);
                return;
            }
            continue;
        }
        if (n == 0) { /* EOF before "\n": answer anyway, as the daemon does */
            write_reply(ep, fd);
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return; /* level-triggered: wait */
        finish(fd);
        return;
    }
}

static void accept_all(int ep, int lfd) {
    /* Drain the accept queue per wakeup: under load many connections are waiting. */
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) continue;
            /* EAGAIN: queue empty. EMFILE etc.: try again on the next wakeup. */
            return;
        }
        if ((size_t)fd >= max_conns) {
            close(fd);
            continue;
        }
        conns[fd] = (struct conn){0, 0, 0};
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    max_conns = 65536;
    conns = calloc(max_conns, sizeof(*conns));
    if (conns == NULL) {
        perror("calloc");
        return 1;
    }

    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) {
        perror("socket");
        return 1;
    }
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "socket path too long\n");
        return 1;
    }
    strcpy(addr.sun_path, path);
    unlink(path); /* a stale socket from an earlier run */
    if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        perror("bind");
        return 1;
    }
    if (listen(lfd, BACKLOG) < 0) {
        perror("listen");
        return 1;
    }

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_create1");
        return 1;
    }
    struct epoll_event lev = {.events = EPOLLIN, .data.fd = lfd};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev) < 0) {
        perror("epoll_ctl");
        return 1;
    }

    struct epoll_event events[MAX_EVENTS];
    while (!stop_requested) {
        int n = epoll_wait(ep, events, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            break;
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                accept_all(ep, lfd);
            } else if (conns[fd].replying) {
                write_reply(ep, fd);
            } else {
                on_readable(ep, fd);
            }
        }
    }
    unlink(path);
    return 0;
}
