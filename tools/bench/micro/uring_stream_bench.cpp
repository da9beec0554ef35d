// The replication stream's sends and receives: the thread design (blocking socket, poll() with
// the timeout then read(), writev() to send; blockrepl/wire.cpp, transport.cpp) against
// io_uring, on a loopback TCP connection (issue 14 item 5, the optional part).
//
// One iteration is a round trip as master and slave make it: the "master" sends a frame of N
// bytes (a 16-byte header and the payload, two iovecs), the "slave" thread receives all of it
// and answers with a 32-byte ack, which the master receives.
//   BM_StreamThreads/N  both sides: poll + read until whole, writev.
//   BM_StreamUring/N    both sides through their own ring: the master's SENDMSG linked to the
//                       RECV of the ack (one io_uring_enter per round trip); the slave's RECV
//                       (MSG_WAITALL), then its SEND. No timeout is linked (the thread design
//                       polls with one): io_uring's figure is, if anything, flattered.
// Wall time per round trip; CPU is the whole process's (both sides and any io-wq worker).
#include <benchmark/benchmark.h>
#include <liburing.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr size_t kHeader = 16, kAck = 32;

[[noreturn]] void fail(const std::string& what, int err) { throw std::runtime_error(what + ": " + strerror(err)); }

// A connected loopback TCP pair, with TCP_NODELAY as the transport sets it.
struct Pair {
  int a = -1, b = -1;
  Pair() {
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof sa;
    if (l < 0 || bind(l, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0 || listen(l, 1) != 0 ||
        getsockname(l, reinterpret_cast<sockaddr*>(&sa), &len) != 0)
      fail("listen on loopback", errno);
    a = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (a < 0 || connect(a, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) fail("connect", errno);
    b = accept4(l, nullptr, nullptr, SOCK_CLOEXEC);
    if (b < 0) fail("accept", errno);
    close(l);
    int one = 1;
    setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  ~Pair() {
    close(a);
    close(b);
  }
};

// The thread design's receive: poll with a timeout, then read what is there, until n bytes.
bool read_full(int fd, char* p, size_t n) {
  while (n > 0) {
    pollfd pfd{fd, POLLIN, 0};
    if (poll(&pfd, 1, 5000) <= 0) return false;
    ssize_t r = read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool writev_full(int fd, const char* hdr, const char* payload, size_t n) {
  iovec iov[2] = {{const_cast<char*>(hdr), kHeader}, {const_cast<char*>(payload), n}};
  size_t left = kHeader + n;
  int first = 0;
  while (left > 0) {
    ssize_t w = writev(fd, iov + first, 2 - first);
    if (w <= 0) return false;
    left -= static_cast<size_t>(w);
    for (size_t done = static_cast<size_t>(w); first < 2 && done > 0;) {
      size_t take = std::min(done, iov[first].iov_len);
      iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + take;
      iov[first].iov_len -= take;
      done -= take;
      if (iov[first].iov_len == 0) first++;
    }
  }
  return true;
}

struct Ring {
  io_uring r;
  Ring() {
    if (int e = io_uring_queue_init(8, &r, 0)) fail("io_uring_queue_init", -e);
  }
  ~Ring() { io_uring_queue_exit(&r); }
  // Waits for n completions; false if any failed or was short of want[i] bytes.
  bool reap(unsigned n, const size_t* want) {
    bool ok = true;
    for (unsigned i = 0; i < n; i++) {
      io_uring_cqe* c;
      if (io_uring_wait_cqe(&r, &c)) return false;
      const uint64_t k = c->user_data;
      if (c->res < 0 || static_cast<size_t>(c->res) != want[k]) ok = false;
      io_uring_cqe_seen(&r, c);
    }
    return ok;
  }
};

// Receives a whole MSG_WAITALL recv (the kernel retries a short one itself).
bool uring_recv(Ring& ring, int fd, char* p, size_t n) {
  io_uring_sqe* s = io_uring_get_sqe(&ring.r);
  io_uring_prep_recv(s, fd, p, n, MSG_WAITALL);
  s->user_data = 0;
  io_uring_submit_and_wait(&ring.r, 1);
  return ring.reap(1, &n);
}

void round_trips(benchmark::State& state, bool uring) {
  const size_t n = static_cast<size_t>(state.range(0));
  Pair pair;
  std::atomic<bool> stop{false};
  std::thread slave([&] {
    std::vector<char> in(kHeader + n), ack(kAck, 'k');
    std::unique_ptr<Ring> ring;
    if (uring) ring = std::make_unique<Ring>();
    for (;;) {
      if (uring) {
        if (!uring_recv(*ring, pair.b, in.data(), in.size())) return;
        io_uring_sqe* s = io_uring_get_sqe(&ring->r);
        io_uring_prep_send(s, pair.b, ack.data(), kAck, 0);
        s->user_data = 0;
        io_uring_submit_and_wait(&ring->r, 1);
        const size_t want = kAck;
        if (!ring->reap(1, &want)) return;
      } else {
        if (!read_full(pair.b, in.data(), in.size())) return;
        if (write(pair.b, ack.data(), kAck) != static_cast<ssize_t>(kAck)) return;
      }
    }
  });
  std::vector<char> hdr(kHeader, 'h'), payload(n, 'p'), ack(kAck);
  std::unique_ptr<Ring> ring;
  if (uring) ring = std::make_unique<Ring>();
  iovec iov[2] = {{hdr.data(), kHeader}, {payload.data(), n}};
  msghdr msg{};
  for (auto _ : state) {
    bool ok;
    if (uring) {
      iov[0] = {hdr.data(), kHeader};
      iov[1] = {payload.data(), n};
      msg.msg_iov = iov;
      msg.msg_iovlen = 2;
      io_uring_sqe* s = io_uring_get_sqe(&ring->r);
      io_uring_prep_sendmsg(s, pair.a, &msg, MSG_WAITALL);
      s->flags |= IOSQE_IO_LINK;
      s->user_data = 0;
      io_uring_sqe* r = io_uring_get_sqe(&ring->r);
      io_uring_prep_recv(r, pair.a, ack.data(), kAck, MSG_WAITALL);
      r->user_data = 1;
      io_uring_submit_and_wait(&ring->r, 2);
      const size_t want[2] = {kHeader + n, kAck};
      ok = ring->reap(2, want);
    } else {
      ok = writev_full(pair.a, hdr.data(), payload.data(), n) && read_full(pair.a, ack.data(), kAck);
    }
    if (!ok) {
      state.SkipWithError("round trip failed");
      break;
    }
  }
  stop = true;
  shutdown(pair.a, SHUT_RDWR);
  slave.join();
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * (kHeader + n)));
}

void StreamArgs(benchmark::internal::Benchmark* b) {
  for (int n : {64, 4096, 65536, 1 << 20}) b->Arg(n);
  b->ArgName("bytes")->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMicrosecond);
}

void BM_StreamThreads(benchmark::State& s) { round_trips(s, false); }
void BM_StreamUring(benchmark::State& s) { round_trips(s, true); }
BENCHMARK(BM_StreamThreads)->Apply(StreamArgs);
BENCHMARK(BM_StreamUring)->Apply(StreamArgs);

}  // namespace
