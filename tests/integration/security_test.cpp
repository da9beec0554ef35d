// Peers on a hostile network (issue 13, items 1-3): nodes prove the cluster's secret to each
// other before anything is sent, TLS 1.3 keeps the stream unreadable on the wire, and a listener
// other hosts can reach needs a secret. Each refusal is one line on the refused side, one on the
// refusing side, a non-zero exit, and nothing sent or written.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "blockrepl/fsutil.h"
#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;
using repl::Cluster;
using repl::Node;

// A secret file of `bytes` random bytes (base64), mode 0600 unless told otherwise.
std::string make_secret(const std::string& dir, const std::string& name, mode_t mode = 0600) {
  const std::string path = dir + "/" + name;
  CommandResult r = run_command({"sh", "-c", "openssl rand -base64 32 > \"$0\"", path});
  if (r.exit_code != 0) throw std::runtime_error("openssl rand: " + r.err);
  chmod(path.c_str(), mode);
  return path;
}

// A CA and node certificates signed by it (for 127.0.0.1 and localhost), in `dir`.
struct Pki {
  std::string dir;
  std::string ca(const std::string& n = "ca") const { return dir + "/" + n + ".crt"; }
  std::string cert(const std::string& n) const { return dir + "/" + n + ".crt"; }
  std::string key(const std::string& n) const { return dir + "/" + n + ".key"; }
  std::vector<std::string> options(const std::string& node, const std::string& ca_name = "ca") const {
    return {"--tls-cert", cert(node), "--tls-key", key(node), "--tls-ca", ca(ca_name)};
  }
};

void run_sh(const std::string& script, const std::string& dir) {
  CommandResult r = run_command({"sh", "-ec", script, dir}, 60);
  if (r.exit_code != 0) throw std::runtime_error("certificate set-up failed: " + r.err);
}

Pki make_pki(const std::string& dir, const std::vector<std::string>& cas, const std::vector<std::string>& nodes) {
  for (auto& ca : cas)
    run_sh("cd \"$0\"; openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=" + ca +
               " -keyout " + ca + ".key -out " + ca + ".crt 2>/dev/null",
           dir);
  for (auto& n : nodes)
    run_sh("cd \"$0\"; openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=" + n + " -keyout " + n +
               ".key -out " + n + ".csr 2>/dev/null; printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > " + n +
               ".ext; openssl x509 -req -in " + n + ".csr -CA " + cas.front() + ".crt -CAkey " + cas.front() +
               ".key -CAcreateserial -days 2 -extfile " + n + ".ext -out " + n + ".crt 2>/dev/null; chmod 600 " + n + ".key",
           dir);
  return Pki{dir};
}

// The error contract for a refused command: non-zero exit, one line on stderr naming `mentions`.
void expect_one_line_refusal(const CommandResult& r, const std::vector<std::string>& mentions, const std::string& what) {
  EXPECT_NE(r.exit_code, 0) << what << " succeeded; stderr: " << r.err;
  EXPECT_NE(r.exit_code, -1) << what << " hung";
  std::string line = r.err;
  if (!line.empty() && line.back() == '\n') line.pop_back();
  EXPECT_FALSE(line.empty()) << what << ": no error line";
  EXPECT_EQ(line.find('\n'), std::string::npos) << what << ": more than one line:\n" << r.err;
  for (auto& m : mentions) EXPECT_NE(r.err.find(m), std::string::npos) << what << ": does not mention '" << m << "': " << r.err;
}

std::string file_text(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// What a refused node holds: its own metadata folder (its node id, made before it connects) and
// nothing that came from the peer.
const std::set<std::string> kOnlyItsOwnMetadata = {".blockrepl"};

bool log_mentions(const Node& n, const std::string& s) { return file_text(n.log).find(s) != std::string::npos; }

// A TCP relay on a loopback port that forwards to `target_port` and keeps every byte it passes,
// as a network observer would see them.
class Relay {
 public:
  explicit Relay(int target_port) : target_port_(target_port), port_(free_port()) {
    listen_.reset(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    int one = 1;
    setsockopt(listen_.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in a = loopback(port_);
    if (bind(listen_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || listen(listen_.get(), 16) != 0)
      throw std::runtime_error("relay: cannot listen on port " + std::to_string(port_));
    stop_.reset(eventfd(0, EFD_CLOEXEC));
    thread_ = std::thread([this] { run(); });
  }
  ~Relay() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t w = write(stop_.get(), &one, sizeof one);
    thread_.join();
  }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  std::string seen() {
    std::lock_guard lk(mu_);
    return seen_;
  }

 private:
  static sockaddr_in loopback(int port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<uint16_t>(port));
    return a;
  }
  struct Pair {
    OwnedFd a, b;
  };
  void run() {
    std::vector<Pair> pairs;
    std::vector<char> buf(1 << 16);
    for (;;) {
      std::vector<pollfd> fds = {{stop_.get(), POLLIN, 0}, {listen_.get(), POLLIN, 0}};
      for (auto& p : pairs) {
        fds.push_back({p.a.get(), POLLIN, 0});
        fds.push_back({p.b.get(), POLLIN, 0});
      }
      if (poll(fds.data(), fds.size(), 1000) < 0) continue;
      if (fds[0].revents) return;
      if (fds[1].revents) {
        OwnedFd in(accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
        OwnedFd out(socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
        sockaddr_in t = loopback(target_port_);
        if (in && out && connect(out.get(), reinterpret_cast<sockaddr*>(&t), sizeof t) == 0)
          pairs.push_back({std::move(in), std::move(out)});
        continue;  // the poll set changed
      }
      for (size_t i = 0; i < pairs.size(); i++) {
        for (int side = 0; side < 2; side++) {
          if (!fds[2 + 2 * i + side].revents) continue;
          int from = side == 0 ? pairs[i].a.get() : pairs[i].b.get();
          int to = side == 0 ? pairs[i].b.get() : pairs[i].a.get();
          ssize_t r = read(from, buf.data(), buf.size());
          if (r <= 0) {
            shutdown(to, SHUT_WR);
            continue;
          }
          {
            std::lock_guard lk(mu_);
            seen_.append(buf.data(), static_cast<size_t>(r));
          }
          for (ssize_t done = 0; done < r;) {
            ssize_t w = write(to, buf.data() + done, static_cast<size_t>(r - done));
            if (w <= 0) break;
            done += w;
          }
        }
      }
    }
  }

  int target_port_, port_;
  OwnedFd listen_, stop_;
  std::mutex mu_;
  std::string seen_;
  std::thread thread_;
};

TEST(Security, PullWithoutTheSecretGetsNothingWithItEverything) {
  Cluster c("sec-pull");
  const std::string secret = make_secret(c.path(), "cluster.secret");
  const std::string wrong = make_secret(c.path(), "other.secret");
  Node& m = c.add_master({"--secret-file", secret});
  ASSERT_TRUE(m.ok());
  write_file(m.file("f"), "the volume's contents");
  ASSERT_EQ(repl::sync_point(m.mnt), "");

  const std::string dir = c.path() + "/pulled";
  mkdir(dir.c_str(), 0700);
  expect_one_line_refusal(run_blockrepl({"pull", m.address(), dir}), {"authentication required", m.address()}, "pull without a secret");
  expect_one_line_refusal(run_blockrepl({"pull", m.address(), dir, "--secret-file", wrong}),
                          {"authentication failed", m.address()}, "pull with another secret");
  EXPECT_EQ(list_dir(dir), kOnlyItsOwnMetadata) << "a refused pull holds something of the master's";
  EXPECT_TRUE(repl::wait_until([&] { return log_mentions(m, "authentication failed"); }, 5s))
      << "the master did not log the wrong secret:\n" << c.log_tail(m);
  EXPECT_FALSE(log_mentions(m, file_text(secret).substr(0, 20))) << "the secret appears in the master's log";

  CommandResult ok = run_blockrepl({"pull", m.address(), dir, "--secret-file", secret, "-q"});
  EXPECT_EQ(ok.exit_code, 0) << ok.err;
  EXPECT_EQ(read_file(dir + "/f"), "the volume's contents");
}

TEST(Security, SlaveWithAnotherSecretIsRefusedOnBothSidesAndTheGoodSlaveStreams) {
  Cluster c("sec-slave");
  const std::string secret = make_secret(c.path(), "cluster.secret");
  const std::string wrong = make_secret(c.path(), "other.secret");
  Node& m = c.add_master({"--secret-file", secret});
  Node& good = c.add_slave(m, {"--secret-file", secret});
  ASSERT_TRUE(m.ok() && good.ok());

  const std::string data = c.path() + "/bad-data", mnt = c.path() + "/bad-mnt";
  mkdir(data.c_str(), 0700);
  mkdir(mnt.c_str(), 0755);
  expect_one_line_refusal(run_blockrepl({"mount", "--data", data, "--master", m.address(), "--secret-file", wrong, mnt}),
                          {"refused", "authentication failed", m.address()}, "a slave with another secret");
  expect_one_line_refusal(run_blockrepl({"mount", "--data", data, "--master", m.address(), mnt}),
                          {"authentication required"}, "a slave without a secret");
  EXPECT_FALSE(is_mounted(mnt));
  EXPECT_EQ(list_dir(data), kOnlyItsOwnMetadata) << "a refused slave holds something of the master's";
  // A slave with a secret never follows a master that proves none.
  Node& open_master = c.add_master();
  expect_one_line_refusal(run_blockrepl({"mount", "--data", data, "--master", open_master.address(), "--secret-file", secret, mnt}),
                          {"does not authenticate"}, "a slave with a secret, of a master without one");

  write_file(m.file("after"), "still served");
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {good.mnt}), "");
  EXPECT_EQ(read_file(good.file("after")), "still served");
  auto st = repl::status(m.mnt);
  ASSERT_EQ(st["slaves"].size(), 1u) << st.dump();
  EXPECT_TRUE(st["slaves"][0]["authenticated"].get<bool>()) << st.dump();
  EXPECT_FALSE(st["slaves"][0]["encrypted"].get<bool>()) << st.dump();
  EXPECT_TRUE(repl::status(good.mnt)["upstream"]["authenticated"].get<bool>());
}

TEST(Security, SecretFilesOthersCanReadAndShortSecretsAreRefused) {
  TempDir t("sec-file");
  const std::string readable = make_secret(t.path(), "readable.secret", 0644);
  const std::string shortone = t.path() + "/short.secret";
  write_file(shortone, "tooshort\n");
  chmod(shortone.c_str(), 0600);
  const std::string data = t.sub("data"), mnt = t.sub("mnt");
  expect_one_line_refusal(run_blockrepl({"mount", "--data", data, "--listen", "127.0.0.1:" + std::to_string(free_port()),
                                         "--secret-file", readable, mnt}),
                          {readable, "chmod 600"}, "a secret file others can read");
  expect_one_line_refusal(run_blockrepl({"mount", "--data", data, "--secret-file", shortone, mnt}), {shortone, "fewer than 16"},
                          "a short secret");
  expect_one_line_refusal(run_blockrepl({"pull", "127.0.0.1:1", data, "--secret-file", readable}), {"chmod 600"},
                          "pull with a secret file others can read");
  EXPECT_FALSE(is_mounted(mnt));
  EXPECT_EQ(list_dir(data), std::set<std::string>{});
}

TEST(Security, ListenerOtherHostsCanReachNeedsASecretOrInsecure) {
  TempDir t("sec-listen");
  const std::string data = t.sub("data"), mnt = t.sub("mnt");
  const std::string any = "0.0.0.0:" + std::to_string(free_port());
  expect_one_line_refusal(run_blockrepl({"mount", "--data", data, "--listen", any, mnt}), {any, "--secret-file", "--insecure"},
                          "a network listener without a secret");
  EXPECT_FALSE(is_mounted(mnt));
  EXPECT_EQ(list_dir(data), std::set<std::string>{}) << "the refused mount wrote to the data directory";
  {
    Mount ok(data, mnt, {"--listen", any, "--insecure"});
    EXPECT_TRUE(ok.ok()) << ok.error();
  }
  const std::string secret = make_secret(t.path(), "s.secret");
  Mount with_secret(data, mnt, {"--listen", any, "--secret-file", secret});
  EXPECT_TRUE(with_secret.ok()) << with_secret.error();
}

TEST(Security, WithTlsTheWireCarriesNoPlaintextAndWithoutItDoes) {
  Cluster c("sec-tls");
  const std::string secret = make_secret(c.path(), "cluster.secret");
  const Pki pki = make_pki(c.path(), {"ca"}, {"master", "slave", "plain"});
  std::vector<std::string> mopts = pki.options("master");
  mopts.insert(mopts.end(), {"--secret-file", secret});
  Node& m = c.add_master(mopts);
  ASSERT_TRUE(m.ok());
  const std::string marker = "MARKER-7c1e-these-bytes-must-not-cross-the-wire-in-clear";

  // Through a relay that records what crosses: with TLS, the marker is nowhere in it.
  Relay tls_relay(m.port);
  {
    std::vector<std::string> sopts = pki.options("slave");
    sopts.insert(sopts.end(), {"--secret-file", secret});
    Node& s = c.define_slave(m, sopts);
    s.master_address = tls_relay.address();
    ASSERT_TRUE(c.mount(s)) << c.log_tail(s);
    std::string big;
    for (int i = 0; i < 200; i++) big += marker;
    write_file(m.file("secret-data"), big);
    ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");
    EXPECT_EQ(read_file(s.file("secret-data")), big);
    auto up = repl::status(s.mnt)["upstream"];
    EXPECT_TRUE(up["encrypted"].get<bool>() && up["authenticated"].get<bool>()) << up.dump();
    auto sl = repl::status(m.mnt)["slaves"];
    ASSERT_EQ(sl.size(), 1u);
    EXPECT_TRUE(sl[0]["encrypted"].get<bool>() && sl[0]["authenticated"].get<bool>()) << sl.dump();
    const std::string wire = tls_relay.seen();
    EXPECT_GT(wire.size(), big.size()) << "the relay saw less than the data: it did not carry the stream";
    EXPECT_EQ(wire.find(marker.substr(0, 24)), std::string::npos) << "the marker crossed the wire in clear text with TLS on";
    c.unmount(s);
  }

  // The same check can fail: a master without TLS sends the marker in clear through a relay.
  Node& plain = c.add_master({"--secret-file", secret});
  Relay plain_relay(plain.port);
  Node& ps = c.define_slave(plain, {"--secret-file", secret});
  ps.master_address = plain_relay.address();
  ASSERT_TRUE(c.mount(ps)) << c.log_tail(ps);
  write_file(plain.file("secret-data"), marker);
  ASSERT_EQ(repl::sync_and_wait(plain.mnt, {ps.mnt}), "");
  EXPECT_NE(plain_relay.seen().find(marker.substr(0, 24)), std::string::npos) << "the relay check cannot see clear text";
}

TEST(Security, CertificatesOfAnotherCaAndPlainPeersAreRefusedWithOneLine) {
  Cluster c("sec-ca");
  const Pki pki = make_pki(c.path(), {"ca", "otherca"}, {"master", "slave"});
  // A certificate signed by another CA, made in its own directory.
  const std::string other_dir = c.path() + "/other";
  mkdir(other_dir.c_str(), 0700);
  const Pki other = make_pki(other_dir, {"otherca"}, {"intruder"});
  Node& m = c.add_master(pki.options("master"));
  ASSERT_TRUE(m.ok());
  const std::string data = c.path() + "/s-data", mnt = c.path() + "/s-mnt";
  mkdir(data.c_str(), 0700);
  mkdir(mnt.c_str(), 0755);

  // The slave does not trust the master's CA.
  std::vector<std::string> args = {"mount", "--data", data, "--master", m.address(), mnt, "--tls-cert", pki.cert("slave"),
                                   "--tls-key", pki.key("slave"), "--tls-ca", other.ca("otherca")};
  expect_one_line_refusal(run_blockrepl(args), {"TLS handshake with master " + m.address(), "certificate verify failed"},
                          "a slave that does not trust the master's CA");
  // The master does not trust the slave's certificate.
  args = {"mount", "--data", data, "--master", m.address(), mnt, "--tls-cert", other.cert("intruder"), "--tls-key",
          other.key("intruder"), "--tls-ca", pki.ca()};
  expect_one_line_refusal(run_blockrepl(args), {m.address()}, "a slave whose certificate the master does not trust");
  EXPECT_TRUE(repl::wait_until([&] { return log_mentions(m, "certificate verify failed"); }, 5s)) << c.log_tail(m);
  // A slave without TLS.
  expect_one_line_refusal(run_blockrepl({"mount", "--data", data, "--master", m.address(), mnt}), {m.address(), "TLS"},
                          "a slave without TLS");
  EXPECT_FALSE(is_mounted(mnt));
  EXPECT_EQ(list_dir(data), kOnlyItsOwnMetadata);

  // The right certificates attach.
  Node& s = c.add_slave(m, pki.options("slave"));
  EXPECT_TRUE(s.ok());
}

}  // namespace
}  // namespace blockrepl::test
