/*
 * nfq-delay: delay, jitter and reordering of packets without netem.
 *
 * Where the kernel has no netem (nor fq/etf, which honour departure times), a netfilter rule
 * can hand packets to a user-space queue (iptables -j NFQUEUE); the kernel holds each packet
 * until a verdict comes back. This program binds one such queue and gives every packet its
 * verdict (NF_ACCEPT) only when its delay is over, so the packet leaves that much later:
 *
 *   delay = D + uniform(-J, +J), at least 0        (netem's "delay D J", uniform jitter)
 *   with probability R %: no delay at all          (netem's "reorder R%": those overtake)
 *
 * Packets released out of their arrival order are counted, so a run can prove it reordered.
 * It speaks nfnetlink directly (no libnetfilter_queue): a C compiler and the kernel headers
 * (linux-libc-dev) are all it needs. Metadata only is copied to user space (NFQNL_COPY_META)
 * and GSO packets are queued whole (NFQA_CFG_F_GSO).
 *
 * Usage: nfq-delay QUEUE DELAY_US JITTER_US REORDER_PCT SEED STATSFILE
 * It prints "ready" on stdout once bound. On SIGTERM or SIGINT it releases every held packet,
 * writes one line of counters to STATSFILE and exits 0:
 *   packets P released R out_of_order O max_held M delay_us_mean A delay_us_max X immediate I
 * Exit status 1: the queue cannot be bound (no nfnetlink_queue, not CAP_NET_ADMIN, queue busy).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netlink.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef SOL_NETLINK
#define SOL_NETLINK 270
#endif

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static uint64_t now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* xorshift64*: the draws of delays and of which packets overtake */
static uint64_t rng_state;
static uint64_t rng(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545F4914F6CDD1DULL;
}

/* held packets: a binary min-heap on the release time */
struct held { uint64_t due; uint32_t id; };
static struct held *heap;
static size_t heap_len, heap_cap;

static void heap_push(struct held h) {
  if (heap_len == heap_cap) {
    heap_cap = heap_cap ? heap_cap * 2 : 4096;
    heap = realloc(heap, heap_cap * sizeof *heap);
    if (!heap) { perror("nfq-delay: realloc"); exit(1); }
  }
  size_t i = heap_len++;
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (heap[p].due <= h.due) break;
    heap[i] = heap[p];
    i = p;
  }
  heap[i] = h;
}

static struct held heap_pop(void) {
  struct held top = heap[0], last = heap[--heap_len];
  size_t i = 0;
  for (;;) {
    size_t c = 2 * i + 1;
    if (c >= heap_len) break;
    if (c + 1 < heap_len && heap[c + 1].due < heap[c].due) c++;
    if (last.due <= heap[c].due) break;
    heap[i] = heap[c];
    i = c;
  }
  if (heap_len) heap[i] = last;
  return top;
}

static int fd;
static uint16_t queue_num;
static uint32_t seq;

/* append one nfnetlink message (header, nfgenmsg, one attribute) to buf at *off */
static void put_msg(char *buf, size_t *off, uint16_t type, uint16_t flags, uint16_t attr,
                    const void *data, uint16_t len) {
  struct nlmsghdr *nh = (struct nlmsghdr *)(buf + *off);
  size_t total = NLMSG_LENGTH(sizeof(struct nfgenmsg) + NLA_HDRLEN + NLA_ALIGN(len));
  memset(nh, 0, NLMSG_ALIGN(total));
  nh->nlmsg_len = (uint32_t)total;
  nh->nlmsg_type = (uint16_t)((NFNL_SUBSYS_QUEUE << 8) | type);
  nh->nlmsg_flags = (uint16_t)(NLM_F_REQUEST | flags);
  nh->nlmsg_seq = ++seq;
  struct nfgenmsg *g = NLMSG_DATA(nh);
  g->nfgen_family = AF_UNSPEC;
  g->version = NFNETLINK_V0;
  g->res_id = htons(queue_num);
  struct nlattr *a = (struct nlattr *)((char *)g + sizeof *g);
  a->nla_type = attr;
  a->nla_len = (uint16_t)(NLA_HDRLEN + len);
  memcpy((char *)a + NLA_HDRLEN, data, len);
  *off += NLMSG_ALIGN(total);
}

/* send one config message and wait for its acknowledgement; returns 0 or -errno */
static int config(uint16_t attr, const void *data, uint16_t len) {
  char buf[256];
  size_t off = 0;
  put_msg(buf, &off, NFQNL_MSG_CONFIG, NLM_F_ACK, attr, data, len);
  if (send(fd, buf, off, 0) < 0) return -errno;
  uint32_t want = seq;
  for (;;) {
    char rb[8192];
    ssize_t n = recv(fd, rb, sizeof rb, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    for (struct nlmsghdr *nh = (struct nlmsghdr *)rb; NLMSG_OK(nh, (size_t)n); nh = NLMSG_NEXT(nh, n)) {
      if (nh->nlmsg_type == NLMSG_ERROR && nh->nlmsg_seq == want) {
        struct nlmsgerr *e = NLMSG_DATA(nh);
        return e->error;
      }
    }
  }
}

/* verdicts waiting to be sent, packed in one buffer */
static char vbuf[1 << 16];
static size_t voff;
static uint64_t released, out_of_order, max_released_id, any_released;

static void flush_verdicts(void) {
  if (!voff) return;
  while (send(fd, vbuf, voff, 0) < 0) {
    if (errno == EINTR) continue;
    if (errno == ENOBUFS || errno == EAGAIN) { usleep(100); continue; }
    perror("nfq-delay: send verdicts");
    break;
  }
  voff = 0;
}

static void release(uint32_t id) {
  struct nfqnl_msg_verdict_hdr v = {htonl(NF_ACCEPT), htonl(id)};
  if (voff + 64 > sizeof vbuf) flush_verdicts();
  put_msg(vbuf, &voff, NFQNL_MSG_VERDICT, 0, NFQA_VERDICT_HDR, &v, sizeof v);
  released++;
  if (any_released && id < max_released_id) out_of_order++;
  if (!any_released || id > max_released_id) max_released_id = id;
  any_released = 1;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: nfq-delay QUEUE DELAY_US JITTER_US REORDER_PCT SEED STATSFILE\n");
    return 2;
  }
  queue_num = (uint16_t)strtoul(argv[1], NULL, 10);
  uint64_t delay_ns = strtoull(argv[2], NULL, 10) * 1000u;
  uint64_t jitter_ns = strtoull(argv[3], NULL, 10) * 1000u;
  double reorder = strtod(argv[4], NULL) / 100.0;
  rng_state = strtoull(argv[5], NULL, 10) | 1u;
  const char *stats = argv[6];

  fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_NETFILTER);
  if (fd < 0) { perror("nfq-delay: netlink socket"); return 1; }
  struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
  if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) { perror("nfq-delay: bind"); return 1; }
  int big = 16 << 20, one = 1;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big) < 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
  setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);

  struct nfqnl_msg_config_cmd cmd = {.command = NFQNL_CFG_CMD_BIND, .pf = htons(AF_INET)};
  int rc = config(NFQA_CFG_CMD, &cmd, sizeof cmd);
  if (rc) { fprintf(stderr, "nfq-delay: bind queue %u: %s\n", queue_num, strerror(-rc)); return 1; }
  struct nfqnl_msg_config_params params = {.copy_range = htonl(0), .copy_mode = NFQNL_COPY_META};
  rc = config(NFQA_CFG_PARAMS, &params, sizeof params);
  if (rc) { fprintf(stderr, "nfq-delay: copy mode: %s\n", strerror(-rc)); return 1; }
  uint32_t maxlen = htonl(200000);
  rc = config(NFQA_CFG_QUEUE_MAXLEN, &maxlen, sizeof maxlen);
  if (rc) { fprintf(stderr, "nfq-delay: queue length: %s\n", strerror(-rc)); return 1; }
  /* flags and mask go in one message: two attributes */
  {
    char buf[256];
    size_t off = 0;
    uint32_t fl = htonl(NFQA_CFG_F_GSO);
    put_msg(buf, &off, NFQNL_MSG_CONFIG, NLM_F_ACK, NFQA_CFG_FLAGS, &fl, sizeof fl);
    struct nlmsghdr *nh = (struct nlmsghdr *)buf;
    struct nlattr *a = (struct nlattr *)(buf + nh->nlmsg_len);
    a->nla_type = NFQA_CFG_MASK;
    a->nla_len = NLA_HDRLEN + sizeof fl;
    memcpy((char *)a + NLA_HDRLEN, &fl, sizeof fl);
    nh->nlmsg_len += NLA_ALIGN(a->nla_len);
    if (send(fd, buf, nh->nlmsg_len, 0) < 0) { perror("nfq-delay: flags"); return 1; }
    /* the acknowledgement (or an error: old kernels without GSO queueing) is read below */
  }

  struct sigaction act = {.sa_handler = on_signal};
  sigaction(SIGTERM, &act, NULL);
  sigaction(SIGINT, &act, NULL);
  printf("ready\n");
  fflush(stdout);

  uint64_t packets = 0, immediate = 0, max_held = 0, delay_sum_ns = 0, delay_max_ns = 0;
  static char rb[1 << 17];
  while (!stop) {
    uint64_t t = now_ns();
    while (heap_len && heap[0].due <= t) release(heap_pop().id);
    flush_verdicts();
    struct timespec to = {0, 200000000};
    if (heap_len) {
      uint64_t d = heap[0].due - t;
      to.tv_sec = (time_t)(d / 1000000000u);
      to.tv_nsec = (long)(d % 1000000000u);
    }
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int pr = ppoll(&p, 1, &to, NULL);
    if (pr < 0 && errno != EINTR) { perror("nfq-delay: poll"); break; }
    if (pr <= 0) continue;
    for (;;) {
      ssize_t n = recv(fd, rb, sizeof rb, MSG_DONTWAIT);
      if (n < 0) {
        if (errno != EAGAIN && errno != EINTR && errno != ENOBUFS) perror("nfq-delay: recv");
        break;
      }
      uint64_t arrived = now_ns();
      for (struct nlmsghdr *nh = (struct nlmsghdr *)rb; NLMSG_OK(nh, (size_t)n); nh = NLMSG_NEXT(nh, n)) {
        if (nh->nlmsg_type == NLMSG_ERROR) {
          struct nlmsgerr *e = NLMSG_DATA(nh);
          if (e->error) fprintf(stderr, "nfq-delay: netlink error %s\n", strerror(-e->error));
          continue;
        }
        if (nh->nlmsg_type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET)) continue;
        char *at = (char *)NLMSG_DATA(nh) + NLMSG_ALIGN(sizeof(struct nfgenmsg));
        char *end = (char *)nh + nh->nlmsg_len;
        while (at + NLA_HDRLEN <= end) {
          struct nlattr *a = (struct nlattr *)at;
          if (a->nla_len < NLA_HDRLEN || at + a->nla_len > end) break;
          if ((a->nla_type & NLA_TYPE_MASK) == NFQA_PACKET_HDR) {
            struct nfqnl_msg_packet_hdr ph;
            memcpy(&ph, at + NLA_HDRLEN, sizeof ph);
            uint64_t d = delay_ns;
            if (reorder > 0 && (double)(rng() >> 11) / 9007199254740992.0 < reorder) {
              d = 0;
              immediate++;
            } else if (jitter_ns) {
              uint64_t span = 2 * jitter_ns + 1;
              int64_t j = (int64_t)(rng() % span) - (int64_t)jitter_ns;
              d = (j < 0 && (uint64_t)(-j) > delay_ns) ? 0 : (uint64_t)((int64_t)delay_ns + j);
            }
            packets++;
            delay_sum_ns += d;
            if (d > delay_max_ns) delay_max_ns = d;
            heap_push((struct held){arrived + d, ntohl(ph.packet_id)});
            if (heap_len > max_held) max_held = heap_len;
            break;
          }
          at += NLA_ALIGN(a->nla_len);
        }
      }
    }
  }
  while (heap_len) release(heap_pop().id);
  flush_verdicts();
  FILE *f = fopen(stats, "w");
  if (f) {
    fprintf(f, "packets %llu released %llu out_of_order %llu max_held %llu delay_us_mean %.0f delay_us_max %llu immediate %llu\n",
            (unsigned long long)packets, (unsigned long long)released, (unsigned long long)out_of_order,
            (unsigned long long)max_held, packets ? (double)delay_sum_ns / packets / 1000.0 : 0.0,
            (unsigned long long)(delay_max_ns / 1000u), (unsigned long long)immediate);
    fclose(f);
  }
  return 0;
}
