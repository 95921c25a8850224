/*
 * loadgen.c: closed-loop load generator for the mailpolicy protocol (Exim ${readsocket}
 * pattern): per request, connect to the Unix socket, send one line, shutdown(SHUT_WR), read
 * until EOF, close.
 *
 * C clients run concurrently from one thread with epoll; each starts its next request as soon
 * as the previous one ends (closed loop: offered load = what the server sustains). Request
 * lines come round-robin from a file. Per-request latency is CLOCK_MONOTONIC from just before
 * socket() to EOF, so it includes connect (and any retry when the backlog is full).
 *
 * Written in C, single-threaded, so that the generator costs far less CPU per request than
 * any Python server: it reports its own CPU time (getrusage) so the harness can show it was
 * not the bottleneck.
 *
 * Usage:
 *   loadgen --socket PATH --requests FILE --expect PREFIX [--concurrency C]
 *           [--max-count N] [--max-seconds S] [--timeout-ms T] [--samples FILE]
 * Bounded: stops starting requests after N requests or S seconds, whichever comes first,
 * then waits at most T ms for those in flight (unfinished ones count as errors).
 * A reply is good when it starts with PREFIX and ends with "\n"; anything else is counted
 * in bad_replies (and in errors). --samples writes "start_ns latency_ns ok" per request,
 * with start_ns on the CLOCK_MONOTONIC clock (the same clock as Python's time.monotonic()
 * on Linux), so the harness can cut out a time window (the reload test).
 * Output: one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
/* Enough of the reply to check the prefix and keep an example of a bad one. */
#define KEEP_REPLY 256
#define MAX_CONSECUTIVE_FAILURES 10000

enum state { ST_IDLE, ST_RETRY_CONNECT, ST_WRITING, ST_READING };

struct client {
    enum state st;
    int fd;
    uint64_t t0;
    const char *req;
    size_t req_len;
    size_t woff;
    char reply[KEEP_REPLY];
    size_t kept;
    size_t total;
    char last;
};

struct sample {
    uint64_t t0;
    uint64_t lat;
    int ok;
};

static struct sockaddr_un addr;
static char **lines;
static size_t *line_lens;
static size_t n_lines;
static size_t next_line;
static const char *expect;
static size_t expect_len;
static int ep;

static struct sample *samples;
static size_t n_samples, cap_samples;
static uint64_t started_count, max_count;
static uint64_t errors, bad_replies, connect_retries, unfinished, conn_errors, io_errors;
static int stopping;
static uint64_t consecutive_failures;
static int aborted;
static char bad_example[KEEP_REPLY * 6 + 1]; /* worst case: every byte as \u00XX */
static int have_bad_example;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void load_requests(const char *path) {
    FILE *f = fopen(path, "r");
    if (f == NULL) die(path);
    size_t cap = 1024;
    lines = malloc(cap * sizeof(*lines));
    line_lens = malloc(cap * sizeof(*line_lens));
    if (lines == NULL || line_lens == NULL) die("malloc");
    char *line = NULL;
    size_t linecap = 0;
    ssize_t len;
    while ((len = getline(&line, &linecap, f)) > 0) {
        if (line[len - 1] != '\n') { /* every request must end with LF */
            line = realloc(line, (size_t)len + 2);
            if (line == NULL) die("realloc");
            linecap = (size_t)len + 2;
            line[len++] = '\n';
            line[len] = '\0';
        }
        if (len == 1) continue; /* skip blank lines */
        if (n_lines == cap) {
            cap *= 2;
            lines = realloc(lines, cap * sizeof(*lines));
            line_lens = realloc(line_lens, cap * sizeof(*line_lens));
            if (lines == NULL || line_lens == NULL) die("realloc");
        }
        lines[n_lines] = strndup(line, (size_t)len);
        if (lines[n_lines] == NULL) die("strndup");
        line_lens[n_lines] = (size_t)len;
        n_lines++;
    }
    free(line);
    fclose(f);
    if (n_lines == 0) {
        fprintf(stderr, "no requests in %s\n", path);
        exit(2);
    }
}

static void record(struct client *c, int ok) {
    uint64_t lat = now_ns() - c->t0;
    if (n_samples == cap_samples) {
        cap_samples = cap_samples ? cap_samples * 2 : 65536;
        samples = realloc(samples, cap_samples * sizeof(*samples));
        if (samples == NULL) die("realloc");
    }
    samples[n_samples++] = (struct sample){c->t0, lat, ok};
    if (!ok) {
        errors++;
        /* A dead server fails connects in microseconds: give up instead of spinning. */
        if (++consecutive_failures >= MAX_CONSECUTIVE_FAILURES) aborted = 1;
    } else {
        consecutive_failures = 0;
    }
}

static void json_escape(char *out, const char *in, size_t n) {
    char *o = out;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)in[i];
        if (ch == '"' || ch == '\\') {
            *o++ = '\\';
            *o++ = (char)ch;
        } else if (ch < 0x20 || ch > 0x7e) {
            o += sprintf(o, "\\u%04x", ch);
        } else {
            *o++ = (char)ch;
        }
    }
    *o = '\0';
}

static void close_client(struct client *c) {
    if (c->fd >= 0) close(c->fd); /* also removes it from the epoll set */
    c->fd = -1;
    c->st = ST_IDLE;
}

static void fail(struct client *c, uint64_t *counter) {
    (*counter)++;
    close_client(c);
    record(c, 0);
}

/* Send what remains of the request; then half-close and wait for the reply. */
static void do_write(struct client *c, uint32_t idx) {
    while (c->woff < c->req_len) {
        ssize_t n = send(c->fd, c->req + c->woff, c->req_len - c->woff, MSG_NOSIGNAL);
        if (n > 0) {
            c->woff += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct epoll_event ev = {.events = EPOLLOUT, .data.u32 = idx};
            int op = c->st == ST_WRITING ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
            c->st = ST_WRITING;
            if (epoll_ctl(ep, op, c->fd, &ev) < 0) fail(c, &io_errors);
            return;
        }
        fail(c, &io_errors);
        return;
    }
    /* The readsocket pattern: Exim shuts down its write side so the server sees EOF. */
    if (shutdown(c->fd, SHUT_WR) < 0) {
        fail(c, &io_errors);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = idx};
    int op = c->st == ST_WRITING ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    c->st = ST_READING;
    if (epoll_ctl(ep, op, c->fd, &ev) < 0) fail(c, &io_errors);
}

static void do_connect(struct client *c, uint32_t idx) {
    if (c->fd < 0) {
        c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) {
            fail(c, &conn_errors);
            return;
        }
    }
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
        c->st = ST_IDLE; /* do_write decides ADD vs MOD from ST_WRITING only */
        do_write(c, idx);
        return;
    }
    /* A non-blocking Unix-socket connect never returns EINPROGRESS; EAGAIN means the
     * server's accept backlog is full. Retry on the next loop turn (not an error: Exim would
     * block in connect() here, and the time counts in the latency). */
    if (errno == EAGAIN || errno == EINTR) {
        connect_retries++;
        c->st = ST_RETRY_CONNECT;
        return;
    }
    fail(c, &conn_errors);
}

static void start_request(struct client *c, uint32_t idx) {
    c->t0 = now_ns();
    c->req = lines[next_line];
    c->req_len = line_lens[next_line];
    next_line = (next_line + 1) % n_lines;
    c->woff = 0;
    c->kept = 0;
    c->total = 0;
    c->last = 0;
    c->fd = -1;
    started_count++;
    do_connect(c, idx);
}

static void do_read(struct client *c) {
    char buf[65536];
    for (;;) {
        ssize_t n = read(c->fd, buf, sizeof(buf));
        if (n > 0) {
            size_t room = KEEP_REPLY - c->kept;
            size_t take = (size_t)n < room ? (size_t)n : room;
            memcpy(c->reply + c->kept, buf, take);
            c->kept += take;
            c->total += (size_t)n;
            c->last = buf[n - 1];
            continue;
        }
        if (n == 0) {
            int ok = c->total > 0 && c->last == '\n' && c->kept >= expect_len &&
                     memcmp(c->reply, expect, expect_len) == 0;
            if (!ok) {
                bad_replies++;
                if (!have_bad_example) {
                    json_escape(bad_example, c->reply, c->kept);
                    have_bad_example = 1;
                }
            }
            close_client(c);
            record(c, ok);
            return;
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        fail(c, &io_errors);
        return;
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted values, in microseconds. */
static double pct_us(const uint64_t *v, size_t n, double p) {
    if (n == 0) return 0.0;
    size_t rank = (size_t)(p * (double)n + 0.999999);
    if (rank < 1) rank = 1;
    if (rank > n) rank = n;
    return (double)v[rank - 1] / 1000.0;
}

static double tv_s(struct timeval tv) { return (double)tv.tv_sec + (double)tv.tv_usec / 1e6; }

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s --socket PATH --requests FILE --expect PREFIX [--concurrency C]\n"
            "          [--max-count N] [--max-seconds S] [--timeout-ms T] [--samples FILE]\n",
            argv0);
    exit(2);
}

int main(int argc, char **argv) {
    const char *sock_path = NULL, *req_path = NULL, *samples_path = NULL;
    long concurrency = 1;
    double max_seconds = 5.0;
    long timeout_ms = 2000;
    max_count = 10000000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage(argv[0]);
        const char *v = argv[++i];
        if (strcmp(a, "--socket") == 0) sock_path = v;
        else if (strcmp(a, "--requests") == 0) req_path = v;
        else if (strcmp(a, "--expect") == 0) expect = v;
        else if (strcmp(a, "--concurrency") == 0) concurrency = strtol(v, NULL, 10);
        else if (strcmp(a, "--max-count") == 0) max_count = strtoull(v, NULL, 10);
        else if (strcmp(a, "--max-seconds") == 0) max_seconds = strtod(v, NULL);
        else if (strcmp(a, "--timeout-ms") == 0) timeout_ms = strtol(v, NULL, 10);
        else if (strcmp(a, "--samples") == 0) samples_path = v;
        else usage(argv[0]);
    }
    if (sock_path == NULL || req_path == NULL || expect == NULL) usage(argv[0]);
    if (concurrency < 1 || concurrency > 10000 || max_count < 1 || max_seconds <= 0 ||
        max_seconds > 3600) {
        fprintf(stderr, "bad --concurrency/--max-count/--max-seconds\n");
        return 2;
    }
    expect_len = strlen(expect);
    signal(SIGPIPE, SIG_IGN);

    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    if (strlen(sock_path) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "socket path too long\n");
        return 2;
    }
    strcpy(addr.sun_path, sock_path);
    load_requests(req_path);

    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    struct client *clients = calloc((size_t)concurrency, sizeof(*clients));
    if (clients == NULL) die("calloc");

    struct rusage ru0;
    getrusage(RUSAGE_SELF, &ru0);
    uint64_t t_start = now_ns();
    uint64_t t_deadline = t_start + (uint64_t)(max_seconds * 1e9);
    uint64_t t_hard = 0; /* set once we stop starting requests */

    for (long i = 0; i < concurrency && started_count < max_count; i++) {
        clients[i].fd = -1;
        start_request(&clients[i], (uint32_t)i);
    }

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        uint64_t now = now_ns();
        if (!stopping && (now >= t_deadline || started_count >= max_count || aborted)) {
            stopping = 1;
            t_hard = now + (uint64_t)timeout_ms * 1000000ull;
        }
        /* Closed loop: every idle client starts its next request (unless stopping);
         * clients whose connect hit a full backlog retry. */
        int in_flight = 0, retrying = 0;
        for (long i = 0; i < concurrency; i++) {
            struct client *c = &clients[i];
            if (c->st == ST_RETRY_CONNECT) {
                if (stopping && now >= t_hard) {
                    fail(c, &conn_errors);
                    unfinished++;
                    continue;
                }
                do_connect(c, (uint32_t)i);
            }
            if (c->st == ST_IDLE && !stopping && started_count < max_count)
                start_request(c, (uint32_t)i);
            if (c->st != ST_IDLE) in_flight++;
            if (c->st == ST_RETRY_CONNECT) retrying++;
        }
        if (stopping && in_flight == 0) break;
        if (stopping && now >= t_hard) {
            for (long i = 0; i < concurrency; i++) {
                if (clients[i].st != ST_IDLE) {
                    unfinished++;
                    fail(&clients[i], &io_errors);
                }
            }
            break;
        }
        /* Wake at least every 10 ms to check the deadline; 1 ms while a connect retries. */
        int n = epoll_wait(ep, events, MAX_EVENTS, retrying ? 1 : 10);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            uint32_t idx = events[i].data.u32;
            struct client *c = &clients[idx];
            if (c->st == ST_WRITING) do_write(c, idx);
            else if (c->st == ST_READING) do_read(c);
            /* A finished client is restarted right away, without another epoll round. */
            if (c->st == ST_IDLE && !stopping && !aborted && started_count < max_count &&
                now_ns() < t_deadline)
                start_request(c, idx);
        }
    }
    uint64_t t_end = now_ns();
    struct rusage ru1;
    getrusage(RUSAGE_SELF, &ru1);

    double elapsed = (double)(t_end - t_start) / 1e9;
    double cpu_user = tv_s(ru1.ru_utime) - tv_s(ru0.ru_utime);
    double cpu_sys = tv_s(ru1.ru_stime) - tv_s(ru0.ru_stime);

    /* Latency percentiles over good replies only: an error's latency is meaningless. */
    uint64_t *lat = malloc((n_samples ? n_samples : 1) * sizeof(*lat));
    if (lat == NULL) die("malloc");
    size_t n_ok = 0;
    double sum = 0;
    for (size_t i = 0; i < n_samples; i++) {
        if (samples[i].ok) {
            lat[n_ok++] = samples[i].lat;
            sum += (double)samples[i].lat;
        }
    }
    qsort(lat, n_ok, sizeof(*lat), cmp_u64);

    /* Longest time with no request completing: a server that stops the world (a long
     * synchronous flush, a GC pass, a reload parse) shows up here even when p99 hides it. */
    uint64_t *done = malloc((n_samples ? n_samples : 1) * sizeof(*done));
    if (done == NULL) die("malloc");
    for (size_t i = 0; i < n_samples; i++) done[i] = samples[i].t0 + samples[i].lat;
    qsort(done, n_samples, sizeof(*done), cmp_u64);
    uint64_t max_gap = 0;
    for (size_t i = 1; i < n_samples; i++)
        if (done[i] - done[i - 1] > max_gap) max_gap = done[i] - done[i - 1];

    if (samples_path != NULL) {
        FILE *f = fopen(samples_path, "w");
        if (f == NULL) die(samples_path);
        for (size_t i = 0; i < n_samples; i++)
            fprintf(f, "%llu %llu %d\n", (unsigned long long)samples[i].t0,
                    (unsigned long long)samples[i].lat, samples[i].ok);
        fclose(f);
    }

    printf("{\"count\": %zu, \"ok\": %zu, \"errors\": %llu, \"bad_replies\": %llu, "
           "\"conn_errors\": %llu, \"io_errors\": %llu, \"unfinished\": %llu, "
           "\"connect_retries\": %llu, \"concurrency\": %ld, \"elapsed_s\": %.6f, "
           "\"rps\": %.1f, \"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, "
           "\"max_us\": %.1f, \"mean_us\": %.1f, \"max_gap_us\": %.1f, "
           "\"cpu_user_s\": %.6f, \"cpu_sys_s\": %.6f, \"cpu_fraction\": %.4f, "
           "\"t_start_ns\": %llu, \"t_end_ns\": %llu",
           n_samples, n_ok, (unsigned long long)errors, (unsigned long long)bad_replies,
           (unsigned long long)conn_errors, (unsigned long long)io_errors,
           (unsigned long long)unfinished, (unsigned long long)connect_retries, concurrency,
           elapsed, elapsed > 0 ? (double)n_samples / elapsed : 0.0, pct_us(lat, n_ok, 0.50),
           pct_us(lat, n_ok, 0.99), pct_us(lat, n_ok, 0.999),
           n_ok ? (double)lat[n_ok - 1] / 1000.0 : 0.0, n_ok ? sum / (double)n_ok / 1000.0 : 0.0,
           (double)max_gap / 1000.0,
           cpu_user, cpu_sys, elapsed > 0 ? (cpu_user + cpu_sys) / elapsed : 0.0,
           (unsigned long long)t_start, (unsigned long long)t_end);
    printf(", \"aborted\": %s", aborted ? "true" : "false");
    if (have_bad_example) printf(", \"bad_reply_example\": \"%s\"", bad_example);
    printf("}\n");
    return 0;
}
