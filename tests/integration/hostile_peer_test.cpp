// Peers that never complete the handshake cost the master bounded resources: a small first frame
// (not the 64 MiB it may announce), no thread until a valid hello, a cap on connections waiting
// for their handshake and a deadline for it; fields over their limits are refused without an
// answer. A real slave still attaches while such peers are connected. Loopback only; every loop
// has a deadline.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <endian.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <set>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "blockrepl.capnp.h"
#include "blockrepl/fsutil.h"
#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;
using repl::Clock;
using repl::Cluster;
using repl::Node;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A number field of /proc/PID/status ("VmRSS" in kB, "Threads"); -1 if absent.
long proc_status(pid_t pid, const std::string& key) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key + ":", 0) == 0) return std::stol(line.substr(key.size() + 1));
  return -1;
}

// A loopback connection to port, non-blocking; an invalid OwnedFd when it cannot be made.
OwnedFd connect_loopback(int port) {
  OwnedFd fd(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return fd;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(static_cast<uint16_t>(port));
  if (connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 && errno != EINPROGRESS) return OwnedFd();
  return fd;
}

// Sends as much of bytes as the socket takes before `deadline` or the peer closes; returns it.
size_t send_until_refused(int fd, const std::string& bytes, Clock::time_point deadline) {
  size_t done = 0;
  while (done < bytes.size() && Clock::now() < deadline) {
    pollfd pfd{fd, POLLOUT, 0};
    if (poll(&pfd, 1, 100) <= 0) continue;
    ssize_t w = send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (w < 0 && (errno == EAGAIN || errno == EINTR)) continue;
    if (w <= 0) break;
    done += static_cast<size_t>(w);
  }
  return done;
}

// What came back on a connection until it ended (or the deadline).
struct Outcome {
  size_t bytes_received = 0;
  bool closed = false;
  double seconds = 0;
};

// Waits until each of fds was closed by the master (EOF or reset), counting what it sent.
std::vector<Outcome> wait_all_closed(const std::vector<OwnedFd>& fds, std::chrono::milliseconds timeout) {
  const auto t0 = Clock::now(), deadline = t0 + timeout;
  std::vector<Outcome> out(fds.size());
  size_t open = fds.size();
  std::vector<pollfd> pfds;
  std::vector<size_t> index;
  while (open > 0 && Clock::now() < deadline) {
    pfds.clear();
    index.clear();
    for (size_t i = 0; i < fds.size(); i++)
      if (!out[i].closed) {
        pfds.push_back({fds[i].get(), POLLIN, 0});
        index.push_back(i);
      }
    if (poll(pfds.data(), pfds.size(), 200) <= 0) continue;
    for (size_t k = 0; k < pfds.size(); k++) {
      if (!pfds[k].revents) continue;
      Outcome& o = out[index[k]];
      char buf[4096];
      ssize_t r = recv(pfds[k].fd, buf, sizeof buf, 0);
      if (r > 0) {
        o.bytes_received += static_cast<size_t>(r);
      } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
        o.closed = true;
        o.seconds = seconds_since(t0);
        open--;
      }
    }
  }
  return out;
}

std::string frame_of(capnp::MessageBuilder& mb) {
  kj::Array<capnp::word> flat = capnp::messageToFlatArray(mb);
  auto bytes = flat.asBytes();
  uint32_t len = htole32(static_cast<uint32_t>(bytes.size()));
  std::string out(reinterpret_cast<const char*>(&len), 4);
  out.append(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
  return out;
}

// A hello an empty slave would send, with one field replaced by `oversized` bytes.
std::string hello_with(const std::string& field, size_t oversized) {
  capnp::MallocMessageBuilder mb;
  auto h = mb.initRoot<wire::Message>().initHello();
  const std::string big(oversized, 'x');
  h.setProtocolVersion(wire::PROTOCOL_VERSION);
  h.setNodeId(field == "node id" ? big : "hostile-node");
  h.setClusterId(field == "cluster id" ? big : "");
  h.setListenAddress(field == "listen address" ? big : "");
  h.setBlockSize(4096);
  h.setHashAlgorithm("xxh3-128");
  h.setAckLevel(wire::AckLevel::SYNC);
  h.setEmpty(true);
  if (field == "lineage id") {
    auto l = h.initLineage(1);
    l[0].setId(big);
    l[0].setFirstLsn(1);
  }
  return frame_of(mb);
}

// Lets the test process hold many descriptors (up to the hard limit); returns the soft limit.
rlim_t raise_fd_limit() {
  rlimit rl{};
  getrlimit(RLIMIT_NOFILE, &rl);
  rl.rlim_cur = rl.rlim_max;
  setrlimit(RLIMIT_NOFILE, &rl);
  getrlimit(RLIMIT_NOFILE, &rl);
  return rl.rlim_cur;
}

size_t count_lines_containing(const std::string& text, const std::string& needle) {
  std::istringstream in(text);
  std::string line;
  size_t n = 0;
  while (std::getline(in, line))
    if (line.find(needle) != std::string::npos) n++;
  return n;
}

TEST(HostilePeer, AnnouncedHugeFramesCostNoMemoryAndAreClosed) {
  Cluster c("hostile-frames");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  const pid_t pid = m.pid();
  std::this_thread::sleep_for(500ms);
  const long rss_before = proc_status(pid, "VmRSS");

  // 16 connections each announce 64 MiB and send 1 MiB of it (as much as the master takes).
  std::vector<OwnedFd> fds;
  for (int i = 0; i < 16; i++) {
    fds.push_back(connect_loopback(m.port));
    ASSERT_TRUE(fds.back()) << "connection " << i << ": " << strerror(errno);
  }
  uint32_t len = htole32(64u << 20);
  std::string bytes(reinterpret_cast<const char*>(&len), 4);
  bytes += std::string(1u << 20, 'A');
  const auto send_deadline = Clock::now() + 5s;
  for (auto& fd : fds) send_until_refused(fd.get(), bytes, send_deadline);
  const long rss_during = proc_status(pid, "VmRSS");
  auto outcomes = wait_all_closed(fds, 10s);
  const long rss_after = proc_status(pid, "VmRSS");

  for (size_t i = 0; i < outcomes.size(); i++) {
    EXPECT_TRUE(outcomes[i].closed) << "connection " << i << " announcing 64 MiB is still open";
    EXPECT_LT(outcomes[i].seconds, 5.0) << "connection " << i << " was closed only after " << outcomes[i].seconds << " s";
    EXPECT_EQ(outcomes[i].bytes_received, 0u) << "the master answered connection " << i;
  }
  printf("[ info ] master VmRSS %ld kB before, %ld kB while sending, %ld kB after 16 x 64 MiB announcements\n", rss_before,
         rss_during, rss_after);
  EXPECT_LT(std::max(rss_during, rss_after) - rss_before, 16 * 1024) << "kB of RSS for 16 announced 64 MiB frames";
  EXPECT_TRUE(repl::process_alive(pid));
  EXPECT_GE(count_lines_containing(c.log_tail(m, 1 << 20), "too large"), 1u) << c.log_tail(m);
}

TEST(HostilePeer, HelloFieldsOverTheirLimitsAreRefusedWithoutAnAnswer) {
  Cluster c("hostile-hello");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  const pid_t pid = m.pid();
  struct Case {
    std::string field;
    size_t bytes;
    std::string logged;  // what the master's one-line error says
  };
  const std::vector<Case> cases = {
      {"node id", 30u << 20, "too large"},  // over the first frame's limit: refused at its length
      {"node id", 300, "node id is 300 bytes"},
      {"cluster id", 256, "cluster id is 256 bytes"},
      {"listen address", 1000, "listen address is 1000 bytes"},
      {"lineage id", 4000, "lineage id is 4000 bytes"},
  };
  for (const Case& k : cases) {
    OwnedFd fd = connect_loopback(m.port);
    ASSERT_TRUE(fd);
    const std::string hello = hello_with(k.field, k.bytes);
    const size_t sent = send_until_refused(fd.get(), hello, Clock::now() + 10s);
    std::vector<OwnedFd> one;
    one.push_back(std::move(fd));
    auto out = wait_all_closed(one, 10s);
    EXPECT_TRUE(out[0].closed) << k.field << " of " << k.bytes << " bytes: still open";
    EXPECT_LT(out[0].seconds, 5.0) << k.field << " of " << k.bytes << " bytes: refused only after " << out[0].seconds << " s";
    EXPECT_EQ(out[0].bytes_received, 0u) << k.field << " of " << k.bytes << " bytes: the master answered";
    printf("[ info ] hello with a %zu-byte %s: %zu of %zu bytes sent, closed=%d after %.2f s\n", k.bytes, k.field.c_str(), sent,
           hello.size(), out[0].closed, out[0].seconds);
    std::this_thread::sleep_for(200ms);  // the log line is written as the master closes
    const std::string log = c.log_tail(m, 1 << 20);
    EXPECT_GE(count_lines_containing(log, k.logged), 1u) << "no line saying '" << k.logged << "'; log:\n" << c.log_tail(m);
  }
  // The lines name the peer (127.0.0.1:port) and the field, one line each.
  const std::string log = c.log_tail(m, 1 << 20);
  EXPECT_GE(count_lines_containing(log, "hello from 127.0.0.1:"), 4u) << log;
  EXPECT_TRUE(repl::process_alive(pid));
  EXPECT_TRUE(repl::status(m.mnt).is_object()) << "the master does not answer status";
}

TEST(HostilePeer, IdleConnectionFloodCostsNoThreadsAndASlaveStillAttaches) {
  Cluster c("hostile-flood");
  Node& m = c.add_master({"--ack", "sync", "--ack-timeout", "2s"});
  ASSERT_TRUE(m.ok());
  const pid_t pid = m.pid();
  const long threads_before = proc_status(pid, "Threads");

  const rlim_t limit = raise_fd_limit();
  const size_t wanted = std::min<size_t>(3000, limit > 200 ? limit - 200 : 0);
  ASSERT_GE(wanted, 500u) << "the test process may open only " << limit << " descriptors";
  std::vector<OwnedFd> flood;
  const auto t0 = Clock::now();
  for (size_t i = 0; i < wanted && seconds_since(t0) < 20; i++) {
    OwnedFd fd = connect_loopback(m.port);
    if (!fd) {
      std::this_thread::sleep_for(10ms);  // the listen backlog is full for a moment
      continue;
    }
    flood.push_back(std::move(fd));
    if (flood.size() % 100 == 0) std::this_thread::sleep_for(5ms);  // a flood, not a SYN storm
  }
  ASSERT_GE(flood.size(), 500u) << "only " << flood.size() << " connections were made";

  // A real slave attaches while the flood's connections are open; the master's threads are
  // counted meanwhile.
  long threads_max = 0;
  std::atomic<bool> sampling{true};
  std::thread sampler([&] {
    while (sampling) {
      threads_max = std::max(threads_max, proc_status(pid, "Threads"));
      std::this_thread::sleep_for(50ms);
    }
  });
  Node& s = c.add_slave(m);
  const bool slave_ok = s.ok();
  std::string synced;
  if (slave_ok) {
    std::string data = repl::random_bytes(7, 200000);
    std::ofstream(m.file("during-flood"), std::ios::binary) << data;
    synced = repl::sync_and_wait(m.mnt, {s.mnt}, 60s);
  }
  auto outcomes = wait_all_closed(flood, 30s);
  sampling = false;
  sampler.join();

  size_t closed = 0, answered = 0;
  double last_close = 0;
  for (auto& o : outcomes) {
    closed += o.closed;
    answered += o.bytes_received > 0;
    last_close = std::max(last_close, o.seconds);
  }
  printf("[ info ] %zu idle connections: master threads %ld before, at most %ld during; %zu closed (the last after %.1f s "
         "of waiting)\n",
         flood.size(), threads_before, threads_max, closed, last_close);
  EXPECT_LT(threads_max, 40) << "threads of the master while " << flood.size() << " idle connections were open";
  EXPECT_EQ(closed, flood.size()) << "idle connections left open past the handshake deadline";
  EXPECT_EQ(answered, 0u) << "idle connections that were sent something";
  ASSERT_TRUE(slave_ok);
  EXPECT_EQ(synced, "") << "the slave did not follow during the flood";
  EXPECT_EQ(repl::diff_report(m.data, s.data, {}, m.name, s.name), "");
  EXPECT_TRUE(repl::process_alive(pid));
}

// The master's TCP and other sockets (/proc/PID/fd entries "socket:[...]").
size_t socket_count(pid_t pid) {
  size_t n = 0;
  const std::string dir = "/proc/" + std::to_string(pid) + "/fd";
  for (const std::string& name : list_dir(dir)) {
    char target[256];
    ssize_t len = readlink((dir + "/" + name).c_str(), target, sizeof target - 1);
    if (len > 0 && std::string(target, static_cast<size_t>(len)).rfind("socket:", 0) == 0) n++;
  }
  return n;
}

TEST(HostilePeer, EndedSessionsCloseTheirSocketsAtOnce) {
  Cluster c("ended-sessions");
  Node& m = c.add_master({"--ack", "async"});
  ASSERT_TRUE(m.ok());
  const pid_t pid = m.pid();
  const size_t sockets_alone = socket_count(pid);
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");
  const size_t sockets_with_slave = socket_count(pid);
  EXPECT_EQ(sockets_with_slave, sockets_alone + 1);
  c.unmount(s);
  // No other connection comes: the session's socket must close by itself, not at an accept.
  const auto t0 = Clock::now();
  const bool closed = repl::wait_until([&] { return socket_count(pid) <= sockets_alone; }, 10s);
  printf("[ info ] master sockets: %zu alone, %zu with a slave, %zu %.1f s after the slave unmounted\n", sockets_alone,
         sockets_with_slave, socket_count(pid), seconds_since(t0));
  EXPECT_TRUE(closed) << "the ended session's socket is still open";
  EXPECT_LT(seconds_since(t0), 5.0);

  // Aborted handshakes leave nothing open either.
  std::vector<OwnedFd> idle;
  for (int i = 0; i < 20; i++) idle.push_back(connect_loopback(m.port));
  std::this_thread::sleep_for(300ms);
  EXPECT_GE(socket_count(pid), sockets_alone + 20);
  idle.clear();  // they hang up before saying anything
  EXPECT_TRUE(repl::wait_until([&] { return socket_count(pid) <= sockets_alone; }, 5s))
      << socket_count(pid) << " sockets open, " << sockets_alone << " before";
}

}  // namespace
}  // namespace blockrepl::test

namespace blockrepl::test {
namespace {

// A fake master answers a slave's hello with a frame far larger than a welcome: the slave
// refuses it at its length, with one line, and writes nothing but its metadata folder.
TEST(HostilePeer, AFakeMastersHugeWelcomeIsRefusedAtItsLength) {
  TempDir tmp("hostile-master");
  const std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  OwnedFd listener(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(listener);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  const int port = free_port();
  addr.sin_port = htons(static_cast<uint16_t>(port));
  int one = 1;
  setsockopt(listener.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  ASSERT_EQ(bind(listener.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(listen(listener.get(), 4), 0);
  std::atomic<size_t> sent{0};
  std::thread fake([&] {
    // Answers every hello (the mount tries once) with 16 MiB announced and 1 MiB sent.
    for (int i = 0; i < 3; i++) {
      pollfd p{listener.get(), POLLIN, 0};
      if (poll(&p, 1, 10000) <= 0) return;
      OwnedFd c(accept4(listener.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!c) return;
      char buf[4096];
      (void)!read(c.get(), buf, sizeof buf);  // the hello (whatever it holds)
      const uint32_t len = htole32(16u << 20);
      std::string frame(reinterpret_cast<const char*>(&len), sizeof len);
      frame.append(1 << 20, '\0');
      ssize_t n = send(c.get(), frame.data(), frame.size(), MSG_NOSIGNAL);
      if (n > 0) sent += static_cast<size_t>(n);
    }
  });
  CommandResult r = run_blockrepl({"mount", "--data", data, "--master", "127.0.0.1:" + std::to_string(port), mnt}, 60);
  shutdown(listener.get(), SHUT_RDWR);
  fake.join();
  EXPECT_NE(r.exit_code, 0) << "a slave mounted on a master that sent garbage";
  EXPECT_NE(r.err.find("too large"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("before the handshake is complete"), std::string::npos) << r.err;
  std::string line = r.err;
  if (!line.empty() && line.back() == '\n') line.pop_back();
  EXPECT_EQ(line.find('\n'), std::string::npos) << "more than one line: " << r.err;
  EXPECT_FALSE(is_mounted(mnt));
  EXPECT_EQ(list_dir(data), std::set<std::string>{".blockrepl"}) << "the refused master's bytes reached the data directory";
  EXPECT_GT(sent.load(), 0u) << "the fake master never answered: the test proves nothing";
}

}  // namespace
}  // namespace blockrepl::test
