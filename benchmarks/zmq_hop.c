/* One ZeroMQ hop (PUSH -> PULL, one message per event) in plain C against the libzmq that pyzmq
 * bundles: the CPU a sender and a receiver spend per message when no Python runs at all. Built
 * and driven by bench_zmq_hop.py, which runs the same loops in pyzmq beside it.
 *
 *   zmq_hop send ADDRESS N SIZE RATE   connect, send N messages of SIZE bytes at RATE Hz (what is due every 1 ms)
 *   zmq_hop recv ADDRESS N             bind, receive N messages (drain, then sleep 0.5 ms), copy each out
 *
 * Prints "cpu_us_per_msg X" (process CPU, libzmq's I/O thread included, over the N messages).
 * The few libzmq functions used are declared here (the wheel ships libzmq without zmq.h); their
 * C ABI is stable across libzmq 4.x. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct { unsigned char opaque[64]; } zmq_msg_t;
void *zmq_ctx_new(void);
int zmq_ctx_term(void *ctx);
void *zmq_socket(void *ctx, int type);
int zmq_close(void *s);
int zmq_bind(void *s, const char *addr);
int zmq_connect(void *s, const char *addr);
int zmq_setsockopt(void *s, int option, const void *value, size_t len);
int zmq_send(void *s, const void *buf, size_t len, int flags);
int zmq_msg_init(zmq_msg_t *m);
int zmq_msg_recv(zmq_msg_t *m, void *s, int flags);
void *zmq_msg_data(zmq_msg_t *m);
size_t zmq_msg_size(const zmq_msg_t *m);
int zmq_msg_close(zmq_msg_t *m);

enum { ZMQ_PULL_ = 7, ZMQ_PUSH_ = 8, ZMQ_DONTWAIT_ = 1, ZMQ_LINGER_ = 17, ZMQ_SNDHWM_ = 23 };

/* all threads of the process (libzmq's I/O thread too), from the scheduler's clock */
static double cpu_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(int argc, char **argv) {
  if (argc < 4 || (strcmp(argv[1], "send") && strcmp(argv[1], "recv")) || (!strcmp(argv[1], "send") && argc < 6)) {
    fprintf(stderr, "usage: zmq_hop send ADDRESS N SIZE RATE | zmq_hop recv ADDRESS N\n");
    return 2;
  }
  const long n = atol(argv[3]);
  void *ctx = zmq_ctx_new();
  if (!strcmp(argv[1], "recv")) {
    void *s = zmq_socket(ctx, ZMQ_PULL_);
    if (zmq_bind(s, argv[2]) != 0) { fprintf(stderr, "bind %s failed\n", argv[2]); return 1; }
    char *buf = malloc(1 << 24);
    long got = 0;
    double c0 = -1, last = now_s();
    while (got < n) {
      for (;;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, s, ZMQ_DONTWAIT_) < 0) { zmq_msg_close(&m); break; }
        if (c0 < 0) c0 = cpu_s();  /* from the first message: start-up is not per message */
        size_t len = zmq_msg_size(&m);
        memcpy(buf, zmq_msg_data(&m), len < (1u << 24) ? len : (1u << 24));
        zmq_msg_close(&m);
        ++got;
        last = now_s();
      }
      if (now_s() - last > 10.0) { fprintf(stderr, "only %ld of %ld messages arrived\n", got, n); return 1; }
      usleep(500);
    }
    printf("cpu_us_per_msg %.3f\n", (cpu_s() - c0) / n * 1e6);
    free(buf);
    zmq_close(s);
  } else {
    const size_t size = (size_t)atol(argv[4]);
    const double rate = atof(argv[5]);
    void *s = zmq_socket(ctx, ZMQ_PUSH_);
    int hwm = 100000, linger = -1;
    zmq_setsockopt(s, ZMQ_SNDHWM_, &hwm, sizeof hwm);
    zmq_setsockopt(s, ZMQ_LINGER_, &linger, sizeof linger);
    if (zmq_connect(s, argv[2]) != 0) { fprintf(stderr, "connect %s failed\n", argv[2]); return 1; }
    char *msg = malloc(size);
    memset(msg, 0x5a, size);
    usleep(200000);  /* the connection is up */
    const double c0 = cpu_s(), t0 = now_s();
    long sent = 0;
    while (sent < n) {
      long due = (long)((now_s() - t0) * rate) + 1 - sent;
      if (due <= 0) { usleep(1000); continue; }
      for (long i = 0; i < due && sent < n; ++i, ++sent) zmq_send(s, msg, size, 0);
    }
    const double c1 = cpu_s();
    printf("cpu_us_per_msg %.3f\n", (c1 - c0) / n * 1e6);
    free(msg);
    zmq_close(s);
  }
  zmq_ctx_term(ctx);  /* with LINGER -1: returns once every queued message is delivered */
  return 0;
}
