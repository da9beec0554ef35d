// Replica: a master and a slave of it as library objects on loopback (no mount): the slave
// follows, is promoted, takes writes, and refuses a second promotion; one role answers every
// question (role, state, writable, status).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <string>
#include <thread>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/node.h"
#include "blockrepl/replica.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

using namespace std::chrono_literals;

std::string slurp(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "<missing>";
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

bool wait_until(const std::function<bool()>& cond, std::chrono::milliseconds timeout = 15s) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (cond()) return true;
    std::this_thread::sleep_for(20ms);
  }
  return cond();
}

// What the FUSE layer would do for `echo data > name; fsync`: a create, a write and a barrier
// through the node. Returns the first errno, or 0.
int write_file(Node& node, const std::string& name, const std::string& data) {
  Record c;
  c.op = Op::create;
  c.parent = kRootFileId;
  c.name = name;
  c.fid = new_file_id();
  c.mode = S_IFREG | 0644;
  if (int err = node.submit(c)) return err;
  int fd = open((node.data_path() + "/" + name).c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) return errno;
  Targets t;
  t.fd = fd;
  Record w;
  w.op = Op::write;
  w.fid = c.fid;
  w.data = data;
  int err = node.submit(w, t);
  if (!err) {
    Record b;
    b.op = Op::fsync;
    b.fid = c.fid;
    err = node.barrier(b, t);
  }
  close(fd);
  return err;
}

std::string make_dir(const std::string& path) {
  if (mkdir(path.c_str(), 0755) != 0) throw std::runtime_error("mkdir " + path);
  return path;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

ReplicaConfig master_config(const std::string& data) {
  ReplicaConfig c;
  c.data_path = data;
  c.listen_address = "127.0.0.1:0";
  c.ack = AckLevel::sync;
  return c;
}

ReplicaConfig slave_config(const std::string& data, const std::string& master) {
  ReplicaConfig c;
  c.data_path = data;
  c.master_address = master;
  return c;
}

TEST(Replica, SlaveFollowsIsPromotedAndTakesWrites) {
  TempDir tmp;
  Replica master(master_config(make_dir(tmp.path + "/master")));
  EXPECT_EQ(master.role(), Replica::Role::master);
  EXPECT_TRUE(master.writable());
  ASSERT_NE(master.listen_address(), "127.0.0.1:0") << "the port the kernel chose is reported";
  master.open();
  master.start();
  master.run_in_background(nullptr, {});
  ASSERT_EQ(write_file(master.node(), "before", "copied in full"), 0);

  Replica slave(slave_config(make_dir(tmp.path + "/slave"), master.listen_address()));
  EXPECT_EQ(slave.role(), Replica::Role::slave);
  EXPECT_FALSE(slave.writable()) << "a slave's mount must refuse changes";
  slave.open();
  EXPECT_TRUE(slave.needs_first_copy());
  slave.start();  // the first copy, synchronously
  EXPECT_FALSE(slave.needs_first_copy());
  EXPECT_EQ(slurp(tmp.path + "/slave/before"), "copied in full");
  std::string exit_reason;
  slave.run_in_background(nullptr, [&](int, const std::string& why) { exit_reason = why; });

  // Streamed: a sync barrier on the master returns once the slave made it durable.
  ASSERT_EQ(write_file(master.node(), "after", "streamed"), 0);
  ASSERT_TRUE(wait_until([&] { return slave.status().lsn >= master.node().last_lsn(); }))
      << "slave at lsn " << slave.status().lsn << ", master at " << master.node().last_lsn();
  EXPECT_EQ(slurp(tmp.path + "/slave/after"), "streamed");
  EXPECT_EQ(slave.state(), Replica::State::streaming);
  ReplicaStatus st = slave.status();
  EXPECT_EQ(st.role, "slave");
  ASSERT_TRUE(st.upstream.has_value());
  EXPECT_EQ(st.upstream->address, master.listen_address());
  ASSERT_EQ(master.status().slaves.size(), 1u);
  EXPECT_EQ(master.status().slaves[0].state, "streaming");

  const Lsn held = slave.node().last_lsn();
  const Promotion p = slave.promote();
  EXPECT_EQ(p.lsn, held);
  EXPECT_FALSE(p.lineage.empty());
  EXPECT_EQ(slave.role(), Replica::Role::master);
  EXPECT_EQ(slave.state(), Replica::State::master);
  EXPECT_TRUE(slave.writable());
  const Identity id = slave.node().identity();
  EXPECT_EQ(id.role, "master");
  ASSERT_EQ(id.lineage.size(), 2u) << "the master's lineage, then the new one";
  EXPECT_EQ(id.lineage.back().id, p.lineage);
  EXPECT_EQ(id.lineage.back().first_lsn, p.lsn + 1);
  EXPECT_EQ(slave.status().role, "master");
  EXPECT_FALSE(slave.status().upstream.has_value());

  // The promoted node takes writes (no slaves of its own: the barrier waits for nobody).
  ASSERT_EQ(write_file(slave.node(), "promoted", "written on the new master"), 0);
  EXPECT_EQ(slurp(tmp.path + "/slave/promoted"), "written on the new master");
  EXPECT_GT(slave.node().last_lsn(), p.lsn);

  const std::string again = error_of([&] { slave.promote(); });
  EXPECT_NE(again.find("already a master"), std::string::npos) << again;
  EXPECT_EQ(slave.node().identity().lineage.size(), 2u) << "a refused promotion starts no lineage";
  EXPECT_NE(error_of([&] { master.promote(); }).find("already a master"), std::string::npos);
  EXPECT_NE(error_of([&] { slave.verify(false); }).find("run verify on a slave"), std::string::npos);
  EXPECT_EQ(exit_reason, "") << "the follower gave up: " << exit_reason;

  slave.stop();
  master.stop();
  EXPECT_EQ(slurp(tmp.path + "/master/promoted"), "<missing>") << "the old master got a write of the new one";
}

// A slave that never got its first copy holds nothing to serve: promoting it is refused.
TEST(Replica, PromotionWithoutACompletedAttachIsRefused) {
  TempDir tmp;
  std::string unused_port;
  {
    Replica probe(master_config(make_dir(tmp.path + "/probe")));  // binds a free port, then lets go of it
    unused_port = probe.listen_address();
  }
  Replica slave(slave_config(make_dir(tmp.path + "/slave"), unused_port));
  slave.open();
  const std::string attach = error_of([&] { slave.start(); });
  EXPECT_NE(attach.find(unused_port), std::string::npos) << "the error names the master: " << attach;
  EXPECT_EQ(slave.state(), Replica::State::disconnected);
  const std::string why = error_of([&] { slave.promote(); });
  EXPECT_NE(why.find("never completed an attach"), std::string::npos) << why;
  EXPECT_FALSE(slave.writable());
  EXPECT_EQ(slave.role(), Replica::Role::slave);
}

// A port in use is refused when the replica is made, before its data directory is touched.
TEST(Replica, PortInUseIsRefusedBeforeTheDataDirectoryIsWritten) {
  TempDir tmp;
  Replica first(master_config(make_dir(tmp.path + "/first")));
  ReplicaConfig c = master_config(make_dir(tmp.path + "/second"));
  c.listen_address = first.listen_address();
  const std::string why = error_of([&] { Replica second(c); });
  EXPECT_NE(why.find("already in use"), std::string::npos) << why;
  struct stat st;
  EXPECT_NE(stat((tmp.path + "/second/.blockrepl").c_str(), &st), 0) << "the refused replica wrote its metadata";
}

}  // namespace
}  // namespace blockrepl
