// A hostile slave against a real master, replayed with the fake slave of fake_peer.h over the
// real wire and handshake code.
//
// A slave that holds the cluster's secret is a trusted peer by definition: one that acknowledges
// every LSN without holding the data (faking --min-sync-slaves) cannot be told from an honest
// one by the protocol, since an acknowledgement is a promise, not a proof; the secret is what
// keeps such a peer out. So the tests show that WITHOUT the secret a fake slave cannot attach at
// all (it gets no welcome and no data, and its acknowledgements never count towards
// --min-sync-slaves), while the master's good slave keeps streaming; and that a slave WITH the
// secret that never acknowledges (it stalls barriers) is dropped after --ack-timeout, comes
// back, and the master still completes its fsyncs with the real slave holding the data. The
// assertions are on states and errnos, never on elapsed time.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "blockrepl/error.h"
#include "fake_peer.h"
#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;
using repl::Cluster;
using repl::Node;

// Writes `data` to path and fsyncs it; returns 0 or fsync's (or open's, write's) errno.
int write_and_fsync(const std::string& path, const std::string& data) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return errno;
  int err = 0;
  if (write(fd, data.data(), data.size()) != static_cast<ssize_t>(data.size())) err = errno ? errno : EIO;
  if (!err && fsync(fd) != 0) err = errno;
  close(fd);
  return err;
}

// What a fake slave got from the master: the kinds of the frames it received until the master
// closed (or `timeout_ms` passed), and whether the connection ended.
struct Heard {
  std::vector<wire::Message::Which> kinds;
  std::string error_reason;
  bool closed = false;
};

Heard listen_until_closed(FakeSlave& f, int timeout_ms) {
  Heard h;
  const auto deadline = repl::Clock::now() + std::chrono::milliseconds(timeout_ms);
  try {
    while (repl::Clock::now() < deadline) {
      auto frame = f.receive(timeout_ms);
      if (!frame) {
        h.closed = true;
        break;
      }
      h.kinds.push_back(frame->root().which());
      if (frame->root().which() == wire::Message::ERROR) h.error_reason = frame->root().getError().getReason().cStr();
    }
  } catch (const std::exception&) {
    h.closed = true;  // reset by the master
  }
  return h;
}

bool heard(const Heard& h, wire::Message::Which kind) {
  for (auto k : h.kinds)
    if (k == kind) return true;
  return false;
}

// Acknowledges everything up to `lsn`, as a slave faking --min-sync-slaves would; false once the
// master no longer takes it.
bool try_ack(FakeSlave& f, Lsn lsn) {
  try {
    f.send_ack(lsn, lsn);
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

// The three ways a slave without the secret may try: as a node without --secret-file (a plain
// hello, then acknowledgements of everything), with another secret, and with acknowledgements
// only. Each ends refused; returns what they heard.
void fakes_without_the_secret_try(const std::string& address, const std::string& label) {
  SCOPED_TRACE(label);
  {
    FakeSlave a(FakeSlaveOptions{});
    ASSERT_EQ(a.connect(address), "");  // nothing to prove without a secret
    a.send_hello();
    try_ack(a, 1000000);
    Heard h = listen_until_closed(a, 10000);
    EXPECT_TRUE(h.closed) << "the master kept a slave without the secret connected";
    EXPECT_FALSE(heard(h, wire::Message::WELCOME)) << "the master welcomed a slave without the secret";
    EXPECT_NE(h.error_reason.find("authentication required"), std::string::npos) << h.error_reason;
    EXPECT_EQ(h.kinds.size(), 1u) << "more than the refusal";
  }
  {
    FakeSlave b(FakeSlaveOptions{secret_of(random_secret())});
    bool fatal = false;
    const std::string err = b.connect(address, &fatal);
    EXPECT_TRUE(fatal) << err;
    EXPECT_NE(err.find("authentication failed"), std::string::npos) << err;
  }
  {
    FakeSlave c(FakeSlaveOptions{});
    ASSERT_EQ(c.connect(address), "");
    try_ack(c, 1000000);
    Heard h = listen_until_closed(c, 10000);
    EXPECT_TRUE(h.closed);
    EXPECT_FALSE(heard(h, wire::Message::WELCOME));
  }
}

TEST(HostileSlave, WithoutTheSecretItGetsNothingAndCannotFakeMinSync) {
  Cluster c("hs-nosecret");
  const std::string secret_file = write_secret(c.path() + "/secret", random_secret());
  Node& m = c.add_master({"--secret-file", secret_file, "--ack", "sync", "--ack-timeout", "1s", "--min-sync-slaves", "1"});
  ASSERT_TRUE(m.ok());
  const std::string marker = "MARKER-" + random_secret(24);
  // No sync slave yet: a barrier fails (EIO), as --min-sync-slaves 1 demands.
  EXPECT_EQ(write_and_fsync(m.file("secret-data"), marker), EIO);

  // Fake slaves without the secret, through a tap that keeps every byte the master sent them.
  Tap tap(m.address());
  fakes_without_the_secret_try(tap.address(), "before the good slave");
  // Their acknowledgements did not count: still no sync slave.
  EXPECT_EQ(write_and_fsync(m.file("secret-data"), marker), EIO) << "a fake slave's acknowledgements counted";
  // One stays connected, acknowledging everything, while a barrier waits: it still does not count.
  {
    FakeSlave a(FakeSlaveOptions{});
    ASSERT_EQ(a.connect(tap.address()), "");
    a.send_hello();
    std::atomic<bool> stop{false};
    std::thread acker([&] {
      for (Lsn lsn = 1; !stop && try_ack(a, lsn * 1000); lsn++) std::this_thread::sleep_for(20ms);
    });
    EXPECT_EQ(write_and_fsync(m.file("secret-data"), marker), EIO) << "a fake slave's acknowledgements counted";
    stop = true;
    acker.join();
  }

  // The good slave, with the secret: barriers complete, it has the data.
  Node& s = c.add_slave(m, {"--secret-file", secret_file});
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(write_and_fsync(m.file("secret-data"), marker), 0);
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");
  EXPECT_EQ(read_file(s.file("secret-data")), marker);

  // The fakes again while it streams: they get nothing, and it keeps streaming.
  fakes_without_the_secret_try(tap.address(), "while the good slave streams");
  EXPECT_EQ(write_and_fsync(m.file("after-fakes"), marker + "-2"), 0);
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");
  EXPECT_EQ(read_file(s.file("after-fakes")), marker + "-2");
  auto st = repl::status(m.mnt);
  ASSERT_TRUE(st.is_object());
  ASSERT_EQ(st["slaves"].size(), 1u) << st.dump();
  EXPECT_EQ(st["slaves"][0]["authenticated"], true) << st.dump();

  const std::string received = tap.received();
  EXPECT_EQ(tap.connections(), 7);
  EXPECT_EQ(received.find(marker.substr(0, 20)), std::string::npos) << "a fake slave without the secret received the data";
  EXPECT_EQ(received.find("secret-data"), std::string::npos) << "a fake slave without the secret received a file name";
  printf("[ info ] %d connections without the secret received %zu bytes in all (refusals only)\n", tap.connections(),
         received.size());
  EXPECT_TRUE(repl::process_alive(m.pid()));
}

// A slave with the secret that takes every record and never acknowledges one.
class Staller {
 public:
  Staller(const std::string& address, const std::string& secret) : address_(address), secret_(secret_of(secret)) {
    thread_ = std::thread([this] { run(); });
  }
  ~Staller() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int welcomes() const { return welcomes_; }  // sessions the master accepted
  int drops() const { return drops_; }        // sessions the master ended

 private:
  void run() {
    while (!stop_) {
      FakeSlave f(FakeSlaveOptions{secret_});
      if (!f.connect(address_).empty()) {
        std::this_thread::sleep_for(100ms);
        continue;
      }
      f.send_hello();
      bool welcomed = false;
      while (!stop_) {
        std::unique_ptr<Frame> frame;
        try {
          frame = f.receive(500);
        } catch (const Error& e) {
          if (e.errno_value() == ETIMEDOUT) continue;  // our own poll: read on, never acknowledge
          break;                                       // the master reset the connection
        } catch (const std::exception&) {
          break;
        }
        if (!frame) break;  // the master closed it
        if (frame->root().which() == wire::Message::WELCOME) {
          welcomed = true;
          welcomes_++;
        }
      }
      if (!stop_ && welcomed) drops_++;
    }
  }

  std::string address_;
  std::shared_ptr<const Secret> secret_;
  std::atomic<bool> stop_{false};
  std::atomic<int> welcomes_{0}, drops_{0};
  std::thread thread_;
};

TEST(HostileSlave, NeverAcknowledgingSlaveIsDroppedAndBarriersComplete) {
  Cluster c("hs-staller");
  const std::string secret = random_secret();
  const std::string secret_file = write_secret(c.path() + "/secret", secret);
  Node& m = c.add_master({"--secret-file", secret_file, "--ack", "sync", "--ack-timeout", "1s"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m, {"--secret-file", secret_file});
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");

  Staller staller(m.address(), secret);
  ASSERT_TRUE(repl::wait_until([&] { return staller.welcomes() >= 1; }, 30s)) << "the staller never attached";
  // Barriers while the staller holds them: each completes (the staller is dropped), the real
  // slave holds the data. Go on until the staller was dropped and came back at least once, then
  // once more with the returned staller attached.
  int round = 0;
  auto barrier_round = [&] {
    const std::string name = "round-" + std::to_string(round), data = "data of round " + std::to_string(round);
    round++;
    // One barrier a round (the fsync): it returns 0, and the real slave is durable past it.
    EXPECT_EQ(write_and_fsync(m.file(name), data), 0) << name;
    EXPECT_EQ(repl::wait_durable(s.mnt, repl::lsn_of(m.mnt), 30s), "") << name;
    EXPECT_EQ(read_file(s.file(name)), data) << name;
  };
  const bool came_back = repl::wait_until(
      [&] {
        barrier_round();
        return staller.drops() >= 1 && staller.welcomes() >= 2;
      },
      60s, 10ms);
  ASSERT_TRUE(came_back) << "the staller was dropped " << staller.drops() << " times and welcomed " << staller.welcomes()
                         << " times\n"
                         << c.log_tail(m);
  barrier_round();  // with the staller back
  printf("[ info ] %d barrier rounds; the staller was welcomed %d times and dropped %d times\n", round, staller.welcomes(),
         staller.drops());
  const std::string log = c.log_tail(m, 1 << 20);
  EXPECT_NE(log.find("dropped: no acknowledgement"), std::string::npos) << log;
  // Back, it is on probation: barriers no longer wait for it (until it acknowledges).
  EXPECT_NE(log.find("was dropped for not acknowledging: barriers do not wait for it"), std::string::npos) << log;
  EXPECT_TRUE(repl::wait_until(
      [&] {
        const auto st = repl::status(m.mnt);
        if (st.is_object())
          for (auto& sl : st["slaves"])
            if (sl.value("probation", false)) return true;
        return false;
      },
      10s))
      << "no slave on probation in the master's status: " << repl::status(m.mnt).dump();
  // The real slave streams throughout.
  auto st = repl::status(m.mnt);
  ASSERT_TRUE(st.is_object());
  bool real_streaming = false;
  for (auto& sl : st["slaves"])
    if (sl["state"] == "streaming" && sl["node_id"] != "fake-slave") real_streaming = true;
  EXPECT_TRUE(real_streaming) << st.dump();
  EXPECT_EQ(repl::diff_report(m.data, s.data, {}, m.name, s.name), "");
}

}  // namespace
}  // namespace blockrepl::test
