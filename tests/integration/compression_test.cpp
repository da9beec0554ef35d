// --compress zstd[:LEVEL] (blockrepl/batch_codec.h) on real mounts: a master that compresses for
// its sync slave, a slave that asks a master without the option, a pull that asks, bad values
// refused with exit status 2, and a hostile master's compressedBatch refused (fake_peer.h). Every comparison is of the backing directories, byte for
// byte; the status shows the codec on both ends and that the batches shrank.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>
#include <vector>

#include <zstd.h>

#include <filesystem>

#include "blockrepl/batch_codec.h"
#include "fake_peer.h"
#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;
using repl::Cluster;
using repl::json;
using repl::Node;

// Text that compresses well (log lines), some random data that does not, small files, and
// rewrites in place; each file fsynced, so each ends with a barrier the sync slave confirms.
void write_mixed_workload(const Node& m, int round) {
  std::string text;
  for (int i = 0; text.size() < (1u << 20); i++)
    text += "2024-05-01T12:00:" + std::to_string(i % 60) + " round " + std::to_string(round) + " GET /api/items/" +
            std::to_string(i * 7919 % 100000) + " 200 " + std::to_string(i % 977) + "ms\n";
  write_file(m.file("log-" + std::to_string(round) + ".txt"), text);
  write_file(m.file("random-" + std::to_string(round) + ".bin"), repl::random_bytes(round + 1, 256 << 10));
  for (int i = 0; i < 20; i++) write_file(m.file("small-" + std::to_string(round) + "-" + std::to_string(i)), "x" + std::to_string(i));
  int fd = open(m.file("log-" + std::to_string(round) + ".txt").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  repl::pwrite_all(fd, std::string(5000, 'z'), 4096 * 3);
  ASSERT_EQ(fsync(fd), 0);
  close(fd);
}

void expect_same_tree(const Node& a, const std::string& b_data, const std::string& b_name) {
  EXPECT_EQ(repl::diff_report(a.data, b_data, {}, a.name, b_name), "") << "backing directories differ";
}

json slave_entry(const Node& m) {
  std::string err;
  json st = repl::status(m.mnt, &err);
  if (st.is_null() || !st.contains("slaves") || st["slaves"].size() != 1) {
    ADD_FAILURE() << "master status: " << err << " " << (st.is_null() ? "" : st.dump());
    return json::object();
  }
  return st["slaves"][0];
}

TEST(Compression, MasterCompressesForItsSyncSlave) {
  Cluster c("compress-master");
  Node& m = c.add_master({"--ack", "sync", "--compress", "zstd:5"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  for (int round = 0; round < 3; round++) ASSERT_NO_FATAL_FAILURE(write_mixed_workload(m, round));
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");
  expect_same_tree(m, s.data, s.name);

  json sl = slave_entry(m);
  EXPECT_EQ(sl.value("compression", ""), "zstd:5") << sl.dump();
  const uint64_t raw = sl.value("batch_bytes", uint64_t{0}), sent = sl.value("batch_wire_bytes", uint64_t{0});
  EXPECT_GT(raw, 3u << 20) << sl.dump();
  EXPECT_LT(sent, raw / 2) << "1 MiB of log lines per 1.25 MiB written should shrink the stream: " << sl.dump();
  printf("[ info ] batches: %llu bytes, sent as %llu (%.2fx)\n", static_cast<unsigned long long>(raw),
         static_cast<unsigned long long>(sent), sent ? static_cast<double>(raw) / static_cast<double>(sent) : 0.0);
  json ss = repl::status(s.mnt);
  ASSERT_FALSE(ss.is_null());
  EXPECT_EQ(ss["upstream"].value("compression", ""), "zstd:5") << ss.dump();
  // The text form says it too.
  CommandResult text = run_blockrepl({"status", m.mnt});
  EXPECT_EQ(text.exit_code, 0) << text.err;
  EXPECT_NE(text.out.find("zstd:5 ("), std::string::npos) << text.out;
}

TEST(Compression, SlaveAsksAMasterWithoutTheOption) {
  Cluster c("compress-slave");
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  Node& plain = c.add_slave(m);
  ASSERT_TRUE(plain.ok());
  Node& far = c.add_slave(m, {"--compress", "zstd"});
  ASSERT_TRUE(far.ok());
  for (int round = 0; round < 2; round++) ASSERT_NO_FATAL_FAILURE(write_mixed_workload(m, round));
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {plain.mnt, far.mnt}), "");
  expect_same_tree(m, plain.data, plain.name);
  expect_same_tree(m, far.data, far.name);

  std::string err;
  json st = repl::status(m.mnt, &err);
  ASSERT_FALSE(st.is_null()) << err;
  ASSERT_EQ(st["slaves"].size(), 2u) << st.dump();
  for (auto& sl : st["slaves"]) {
    // Only the slave that asked gets compressed batches.
    const bool is_far = sl.value("node_id", "") == repl::status(far.mnt).value("node_id", "?");
    EXPECT_EQ(sl.value("compression", ""), is_far ? "zstd:3" : "off") << sl.dump();
    if (!is_far) {
      EXPECT_EQ(sl.value("batch_bytes", uint64_t{0}), sl.value("batch_wire_bytes", uint64_t{1})) << sl.dump();
    }
  }
  EXPECT_EQ(repl::status(far.mnt)["upstream"].value("compression", ""), "zstd:3");
  EXPECT_EQ(repl::status(plain.mnt)["upstream"].value("compression", ""), "off");

  // A pull that asks: first a full copy, then (after more writes) a stream of the records from
  // the journal, compressed.
  const std::string pulled = c.private_data_dir("pull-vault");
  CommandResult p = run_blockrepl({"pull", "--compress", "zstd:9", m.address(), pulled}, 120);
  ASSERT_EQ(p.exit_code, 0) << p.err;
  ASSERT_NO_FATAL_FAILURE(write_mixed_workload(m, 7));
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {plain.mnt, far.mnt}), "");
  p = run_blockrepl({"pull", "--compress", "zstd:9", m.address(), pulled}, 120);
  ASSERT_EQ(p.exit_code, 0) << p.err;
  EXPECT_NE(p.out.find("by stream"), std::string::npos) << p.out;
  expect_same_tree(m, pulled, "pulled");
}

TEST(Compression, BadValuesExitWithStatus2) {
  TempDir tmp("compress-bad");
  const std::string data = tmp.sub("data"), mnt = tmp.sub("mnt"), pulled = tmp.sub("pulled");
  const std::string addr = "127.0.0.1:" + std::to_string(free_port());
  for (std::string v : {"lz4", "zstd:0", "zstd:20", "zstd:fast", "zstd:", "ZSTD"}) {
    for (auto args : {std::vector<std::string>{"mount", "--data", data, "--listen", addr, "--compress", v, mnt},
                      std::vector<std::string>{"pull", "--compress", v, addr, pulled}}) {
      CommandResult r = run_blockrepl(args, 20);
      EXPECT_EQ(r.exit_code, 2) << args[0] << " --compress '" << v << "': " << r.err;
      std::string line = r.err;
      while (!line.empty() && line.back() == '\n') line.pop_back();
      EXPECT_EQ(line.find('\n'), std::string::npos) << "one line: " << r.err;
      EXPECT_NE(line.find("--compress"), std::string::npos) << r.err;
      EXPECT_NE(line.find("got '" + v + "'"), std::string::npos) << r.err;
    }
  }
  EXPECT_FALSE(is_mounted(mnt));
  EXPECT_TRUE(list_dir(data).empty()) << "a refused mount wrote to the data directory";
}

// A hostile (or broken) master: compressedBatch messages a slave must refuse with one line naming
// the master, before it allocates what they announce, while it keeps serving its mount.
TEST(Compression, HostileCompressedBatchesAreRefusedNamingTheMaster) {
  TempDir tmp("compress-hostile");
  const std::string vault = tmp.path() + "/vault";
  ASSERT_EQ(mkdir(vault.c_str(), 0700), 0);
  const std::string small_frame = [] {
    std::string in(64, '\0'), out(ZSTD_compressBound(64), '\0');
    out.resize(ZSTD_compress(out.data(), out.size(), in.data(), in.size(), 1));
    return out;
  }();
  struct Attack {
    std::string name;
    wire::Codec welcome_codec;
    uint64_t announced;
    std::string data;
    std::string expect;  // in the slave's log line
  };
  const std::vector<Attack> attacks = {
      {"over the frame limit", wire::Codec::ZSTD, uint64_t{kMaxFrameBytes} + 8, small_frame,
       "announces " + std::to_string(uint64_t{kMaxFrameBytes} + 8) + " bytes"},
      {"16 EiB announced", wire::Codec::ZSTD, ~uint64_t{7}, small_frame, "announces"},
      {"not zstd", wire::Codec::ZSTD, 64, "definitely not a zstd frame", "not a zstd frame"},
      {"size disagrees with the frame", wire::Codec::ZSTD, 128, small_frame, "the message announces 128"},
      {"no codec in the welcome", wire::Codec::NONE, 64, small_frame, "session's codec is off"},
  };
  for (size_t i = 0; i < attacks.size(); i++) {
    const Attack& a = attacks[i];
    SCOPED_TRACE(a.name);
    FakeMaster fake({}, [&](FakeMasterSession& s) {
      FakeMasterSession::WelcomeArgs w;
      w.codec = a.welcome_codec;
      w.codec_level = a.welcome_codec == wire::Codec::ZSTD ? 3 : 0;
      if (s.index() == 0) {
        s.send_welcome(w);
        s.send_copy_entry([](wire::CopyEntry::Builder e) {
          const std::string data = "served throughout\n";
          e.setPath(kj::arrayPtr(reinterpret_cast<const kj::byte*>("kept"), 4));
          e.setFid(0x7e57000000000101ull);
          e.setMode(S_IFREG | 0644);
          e.setSize(data.size());
          e.setMtimeSec(1700000000);
          e.setChunk(kj::arrayPtr(reinterpret_cast<const kj::byte*>(data.data()), data.size()));
        });
        s.send_copy_done(0);
      } else {
        w.method = wire::AttachMethod::STREAM;
        w.start_lsn = w.last_lsn = s.hello().getDurableLsn();
        s.send_welcome(w);
      }
      capnp::MallocMessageBuilder mb;
      auto cb = mb.initRoot<wire::Message>().initCompressedBatch();
      cb.setCodec(wire::Codec::ZSTD);
      cb.setUncompressedSize(a.announced);
      cb.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(a.data.data()), a.data.size()));
      s.conn().send(mb);
      s.wait_closed(5000);
    });
    const std::string data = vault + "/data" + std::to_string(i), mnt = tmp.sub("mnt" + std::to_string(i));
    const std::string log = tmp.path() + "/log" + std::to_string(i);
    ASSERT_TRUE(std::filesystem::create_directory(data));
    Mount slave(data, mnt, {"--master", fake.address(), "-v", "--log-file", log});
    ASSERT_TRUE(slave.ok()) << slave.error();
    const std::string want = "compressedBatch from master " + fake.address() + ": ";
    std::string line;
    repl::wait_until(
        [&] {
          std::string text;
          try {
            text = read_file(log);
          } catch (const std::exception&) {
            return false;
          }
          size_t at = text.find(want);
          if (at == std::string::npos) return false;
          const size_t begin = text.rfind('\n', at) + 1;
          line = text.substr(begin, text.find('\n', at) - begin);
          return true;
        },
        20s);
    EXPECT_NE(line.find(a.expect), std::string::npos) << "log line: '" << line << "'\n" << read_file(log);
    printf("[ info ] %s: %s\n", a.name.c_str(), line.c_str());
    // The slave refused the batch and still serves what it holds.
    EXPECT_EQ(read_file(slave.file("kept")), "served throughout\n");
    slave.unmount();
  }
}

}  // namespace
}  // namespace blockrepl::test
