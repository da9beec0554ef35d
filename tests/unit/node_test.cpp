// Node: metadata and root tag on construction, LSN assignment, publication to sinks in LSN order,
// LSNs that never repeat across restarts, barriers.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/metadata.h"
#include "blockrepl/node.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

int count_fds() {
  int n = 0;
  for (auto& e : std::filesystem::directory_iterator("/proc/self/fd")) (void)e, n++;
  return n;
}

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

// What a sink saw. on_record runs under the node's ordering lock, but the sink locks anyway so
// the test does not depend on that.
struct RecordingSink : RecordSink {
  struct Seen {
    Lsn lsn;
    Op op;
    FileId fid;
    std::string name;
    std::string data;
    bool applied_before_publish;
  };
  std::mutex mu;
  std::vector<Seen> seen;
  std::string root;  // if set, check creates are visible on disk when published

  void on_record(const Record& rec) override {
    bool applied = true;
    if (!root.empty() && (rec.op == Op::create || rec.op == Op::mkdir) && rec.parent == kRootFileId) {
      struct stat st;
      applied = lstat((root + "/" + rec.name).c_str(), &st) == 0;
    }
    std::lock_guard lk(mu);
    seen.push_back({rec.lsn, rec.op, rec.fid, rec.name, std::string(rec.data), applied});
  }
  std::vector<Lsn> lsns() {
    std::lock_guard lk(mu);
    std::vector<Lsn> out;
    for (auto& s : seen) out.push_back(s.lsn);
    return out;
  }
};

Record mkdir_rec(const std::string& name, FileId fid) {
  Record r;
  r.op = Op::mkdir;
  r.parent = kRootFileId;
  r.name = name;
  r.fid = fid;
  r.mode = 0755;
  return r;
}

Record create_rec(const std::string& name, FileId fid) {
  Record r = mkdir_rec(name, fid);
  r.op = Op::create;
  r.mode = S_IFREG | 0644;
  return r;
}

Record unlink_rec(const std::string& name) {
  Record r;
  r.op = Op::unlink;
  r.parent = kRootFileId;
  r.name = name;
  return r;
}

class NodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_ = tmp_.path + "/data";
    ASSERT_EQ(mkdir(data_.c_str(), 0755), 0);
  }
  std::string p(const std::string& rel) const { return data_ + "/" + rel; }
  Identity identity_on_disk() {
    int dfd = open(data_.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    int mfd = open_metadata_dir(dfd, data_);
    Identity id = load_or_create_identity(mfd, data_);
    close(mfd);
    close(dfd);
    return id;
  }

  TempDir tmp_;
  std::string data_;
};

TEST_F(NodeTest, ConstructorCreatesMetadataFolderAndTagsRoot) {
  Node node(data_);
  struct stat st;
  ASSERT_EQ(lstat(p(kMetadataDirName).c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  EXPECT_TRUE(std::filesystem::is_regular_file(p(std::string(kMetadataDirName) + "/identity")));
  EXPECT_EQ(read_file_id(node.root_fd(), ""), kRootFileId);
  int dfd = open(data_.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  EXPECT_EQ(read_file_id(dfd, ""), kRootFileId);
  close(dfd);
  EXPECT_FALSE(node.identity().node_id.empty());
  EXPECT_EQ(node.identity().node_id, identity_on_disk().node_id);
  EXPECT_EQ(node.data_path(), data_);
  // The root resolves through the store.
  EXPECT_GE(node.store().files().path(kRootFileId).get(), 0);
}

TEST_F(NodeTest, ReopenKeepsIdentityAndRootTag) {
  std::string id1;
  {
    Node a(data_);
    id1 = a.identity().node_id;
  }
  Node b(data_);
  EXPECT_EQ(b.identity().node_id, id1);
  EXPECT_EQ(read_file_id(b.root_fd(), ""), kRootFileId);
}

TEST_F(NodeTest, MissingDataDirectoryThrowsErrorNamingIt) {
  std::string missing = tmp_.path + "/nope";
  try {
    Node n(missing);
    FAIL() << "opened a missing directory";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(missing), std::string::npos) << e.what();
    EXPECT_EQ(e.errno_value(), ENOENT);
  }
  EXPECT_FALSE(std::filesystem::exists(missing));
}

TEST_F(NodeTest, DamagedIdentityThrowsAndLeaksNoDescriptor) {
  { Node first(data_); }
  {
    int fd = open(p(std::string(kMetadataDirName) + "/identity").c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(write(fd, "garbage\n", 8), 8);
    close(fd);
  }
  int before = count_fds();
  try {
    Node n(data_);
    FAIL() << "accepted a damaged identity";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(data_), std::string::npos) << e.what();
  }
  EXPECT_EQ(count_fds(), before);
}

TEST_F(NodeTest, SubmitAssignsIncreasingLsnsAndPublishesAppliedRecordsInOrder) {
  Node node(data_);
  RecordingSink sink;
  sink.root = data_;
  node.add_sink(&sink);
  const Lsn start = node.last_lsn();

  std::vector<Lsn> got;
  Record r1 = mkdir_rec("dir", 0xd1);
  ASSERT_EQ(node.submit(r1), 0);
  got.push_back(r1.lsn);
  Record r2 = create_rec("file", 0xf1);
  ASSERT_EQ(node.submit(r2), 0);
  got.push_back(r2.lsn);

  // A data record, with the descriptor the FUSE layer would pass.
  int fd = open(p("file").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  Targets t;
  t.fd = fd;
  std::string payload = "payload";
  Record w;
  w.op = Op::write;
  w.fid = 0xf1;
  w.data = payload;
  ASSERT_EQ(node.submit(w, t), 0);
  got.push_back(w.lsn);
  close(fd);
  EXPECT_EQ(slurp(p("file")), "payload");

  Record x;
  x.op = Op::setxattr;
  x.fid = kRootFileId;
  x.name = "user.k";
  x.data = "v";
  ASSERT_EQ(node.submit(x), 0);
  got.push_back(x.lsn);

  ASSERT_EQ(got.size(), 4u);
  for (size_t i = 0; i < got.size(); i++) EXPECT_EQ(got[i], start + 1 + i);
  EXPECT_EQ(node.last_lsn(), got.back());
  EXPECT_EQ(sink.lsns(), got);
  ASSERT_EQ(sink.seen.size(), 4u);
  EXPECT_EQ(sink.seen[0].op, Op::mkdir);
  EXPECT_EQ(sink.seen[0].name, "dir");
  EXPECT_EQ(sink.seen[0].fid, 0xd1u);
  EXPECT_EQ(sink.seen[1].op, Op::create);
  EXPECT_EQ(sink.seen[2].op, Op::write);
  EXPECT_EQ(sink.seen[2].data, "payload");
  EXPECT_EQ(sink.seen[3].op, Op::setxattr);
  for (auto& s : sink.seen) EXPECT_TRUE(s.applied_before_publish) << "lsn " << s.lsn << " published before applied";
  EXPECT_EQ(read_file_id(node.root_fd(), "dir"), FileId{0xd1});
  node.remove_sink(&sink);
}

TEST_F(NodeTest, FailedApplyGetsNoLsnAndIsNotPublished) {
  Node node(data_);
  RecordingSink sink;
  node.add_sink(&sink);
  Record ok1 = create_rec("a", 0xa1);
  ASSERT_EQ(node.submit(ok1), 0);
  const Lsn after_ok = node.last_lsn();
  EXPECT_EQ(ok1.lsn, after_ok);

  Record bad = unlink_rec("missing");
  EXPECT_EQ(node.submit(bad), ENOENT);
  EXPECT_EQ(bad.lsn, 0u);
  Record bad2 = create_rec("a", 0xa2);  // EEXIST
  EXPECT_EQ(node.submit(bad2), EEXIST);
  EXPECT_EQ(bad2.lsn, 0u);
  Record bad3 = create_rec("..", 0xa3);  // EINVAL
  EXPECT_EQ(node.submit(bad3), EINVAL);
  EXPECT_EQ(bad3.lsn, 0u);
  EXPECT_EQ(node.last_lsn(), after_ok);
  EXPECT_EQ(sink.seen.size(), 1u);

  // The next success continues without a gap.
  Record ok2 = unlink_rec("a");
  ok2.fid = 0xa1;
  ASSERT_EQ(node.submit(ok2), 0);
  EXPECT_EQ(ok2.lsn, after_ok + 1);
  EXPECT_EQ(sink.lsns(), (std::vector<Lsn>{after_ok, after_ok + 1}));
}

TEST_F(NodeTest, EverySinkSeesEveryRecordAndRemovedSinksNoMore) {
  Node node(data_);
  RecordingSink s1, s2;
  node.add_sink(&s1);
  node.add_sink(&s2);
  Record a = mkdir_rec("a", 0xa);
  ASSERT_EQ(node.submit(a), 0);
  node.remove_sink(&s1);
  Record b = mkdir_rec("b", 0xb);
  ASSERT_EQ(node.submit(b), 0);
  EXPECT_EQ(s1.lsns(), (std::vector<Lsn>{a.lsn}));
  EXPECT_EQ(s2.lsns(), (std::vector<Lsn>{a.lsn, b.lsn}));
  node.remove_sink(&s2);
  Record c = mkdir_rec("c", 0xc);
  ASSERT_EQ(node.submit(c), 0);
  EXPECT_EQ(s2.seen.size(), 2u);
}

TEST_F(NodeTest, ConcurrentSubmitsGiveGapFreeStrictlyIncreasingSequence) {
  constexpr int kThreads = 4, kEach = 500;
  Node node(data_);
  // Each thread writes to its own file; the sink checks order as it is called.
  struct OrderSink : RecordSink {
    std::vector<Lsn> lsns;
    std::vector<std::string> data;
    std::atomic<int> in_call{0};
    std::atomic<bool> overlapped{false};
    void on_record(const Record& rec) override {
      if (in_call.fetch_add(1) != 0) overlapped = true;
      std::this_thread::yield();  // widen the window an unserialised caller would race in
      lsns.push_back(rec.lsn);
      data.emplace_back(rec.data);
      in_call.fetch_sub(1);
    }
  } sink;
  node.add_sink(&sink);
  const Lsn start = node.last_lsn();

  std::vector<int> fds;
  for (int t = 0; t < kThreads; t++) {
    Record c = create_rec("f" + std::to_string(t), 0x100 + t);
    ASSERT_EQ(node.submit(c), 0);
    int fd = open(p("f" + std::to_string(t)).c_str(), O_RDWR | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    fds.push_back(fd);
  }
  const Lsn base = node.last_lsn();
  EXPECT_EQ(base, start + kThreads);

  std::vector<std::vector<Lsn>> mine(kThreads);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kEach; i++) {
        std::string payload = std::to_string(t) + ":" + std::to_string(i) + ";";
        Record w;
        w.op = Op::write;
        w.fid = 0x100 + t;
        w.offset = static_cast<uint64_t>(i) * 16;
        w.data = payload;
        Targets tg;
        tg.fd = fds[t];
        if (node.submit(w, tg) != 0) failures++;
        mine[t].push_back(w.lsn);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int fd : fds) close(fd);
  EXPECT_EQ(failures.load(), 0);
  EXPECT_FALSE(sink.overlapped) << "sinks were called concurrently";

  // The sink saw base+1 .. base+N, in order, once each.
  const size_t n = kThreads * kEach;
  ASSERT_EQ(sink.lsns.size(), n + kThreads);
  std::vector<Lsn> tail(sink.lsns.begin() + kThreads, sink.lsns.end());
  for (size_t i = 0; i < n; i++) ASSERT_EQ(tail[i], base + 1 + i) << "at " << i;
  EXPECT_EQ(node.last_lsn(), base + n);
  // Each thread got increasing LSNs for its own records; together exactly the published set.
  std::set<Lsn> all;
  for (int t = 0; t < kThreads; t++) {
    for (size_t i = 1; i < mine[t].size(); i++) EXPECT_LT(mine[t][i - 1], mine[t][i]);
    all.insert(mine[t].begin(), mine[t].end());
  }
  EXPECT_EQ(all.size(), n);
  EXPECT_EQ(*all.begin(), base + 1);
  EXPECT_EQ(*all.rbegin(), base + n);
  // Per thread, the published order of its payloads is its submission order.
  std::vector<int> next(kThreads, 0);
  for (size_t i = kThreads; i < sink.data.size(); i++) {
    const std::string& d = sink.data[i];
    int t = d[0] - '0';
    ASSERT_EQ(d, std::to_string(t) + ":" + std::to_string(next[t]) + ";");
    next[t]++;
  }
}

TEST_F(NodeTest, ReopenedNodeStartsPastEveryLsnHandedOut) {
  Lsn highest = 0;
  {
    Node a(data_);
    for (int i = 0; i < 10; i++) {
      Record r = mkdir_rec("d" + std::to_string(i), 0x200 + i);
      ASSERT_EQ(a.submit(r), 0);
      highest = std::max(highest, r.lsn);
    }
    Record b;
    b.op = Op::fsync;
    b.fid = kRootFileId;
    a.barrier(b);
    highest = std::max(highest, b.lsn);
    // Crash safety: what is on disk already covers every LSN handed out.
    EXPECT_GT(identity_on_disk().lsn_reserved, highest);
  }
  for (int round = 0; round < 3; round++) {
    Node n(data_);
    EXPECT_GE(n.last_lsn(), highest);
    Record r = mkdir_rec("r" + std::to_string(round), 0x300 + round);
    ASSERT_EQ(n.submit(r), 0);
    EXPECT_GT(r.lsn, highest) << "round " << round;
    highest = r.lsn;
    EXPECT_GT(identity_on_disk().lsn_reserved, highest);
  }
}

TEST_F(NodeTest, NodeContinuesAfterPersistedReservation) {
  {
    Node a(data_);  // creates the metadata
  }
  int dfd = open(data_.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  int mfd = open_metadata_dir(dfd, data_);
  Identity id = load_or_create_identity(mfd, data_);
  id.lsn_reserved = 5000;  // a previous run may have used anything below this
  store_identity(mfd, id, data_);
  close(mfd);
  close(dfd);

  Node n(data_);
  Record r = mkdir_rec("x", 0x77);
  ASSERT_EQ(n.submit(r), 0);
  EXPECT_GT(r.lsn, 5000u);
  EXPECT_EQ(n.identity().node_id, id.node_id);
}

TEST_F(NodeTest, BarrierOfWholeVolumePublishesFsyncRecordAndReturnsZero) {
  Node node(data_);
  RecordingSink sink;
  node.add_sink(&sink);
  Record c = create_rec("f", 0xf);
  ASSERT_EQ(node.submit(c), 0);

  Record b;
  b.op = Op::fsync;
  b.fid = kInvalidFileId;  // syncfs
  int rc = node.barrier(b);
  EXPECT_EQ(rc, 0) << "barrier returned " << strerror(rc);
  EXPECT_EQ(b.lsn, c.lsn + 1);
  EXPECT_EQ(node.last_lsn(), b.lsn);
  ASSERT_GE(sink.seen.size(), 2u);
  EXPECT_EQ(sink.seen[1].op, Op::fsync);
  EXPECT_EQ(sink.seen[1].lsn, b.lsn);
}

TEST_F(NodeTest, BarrierOfFilePublishesFsyncRecordAndReturnsZero) {
  Node node(data_);
  RecordingSink sink;
  node.add_sink(&sink);
  Record c = create_rec("f", 0xf);
  ASSERT_EQ(node.submit(c), 0);
  int fd = open(p("f").c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0);

  Record b;
  b.op = Op::fsync;
  b.fid = 0xf;
  Targets t;
  t.fd = fd;
  EXPECT_EQ(node.barrier(b, t), 0);
  Record d;
  d.op = Op::fsync;
  d.fid = 0xf;
  d.flags = kDataSync;
  EXPECT_EQ(node.barrier(d, t), 0);
  Record r;
  r.op = Op::fsync;
  r.fid = kRootFileId;  // fsyncdir of the root, resolved by the node itself
  EXPECT_EQ(node.barrier(r), 0);
  close(fd);

  EXPECT_EQ(b.lsn, c.lsn + 1);
  EXPECT_EQ(d.lsn, c.lsn + 2);
  EXPECT_EQ(r.lsn, c.lsn + 3);
  ASSERT_EQ(sink.seen.size(), 4u);
  for (int i = 1; i < 4; i++) {
    EXPECT_EQ(sink.seen[i].op, Op::fsync);
    EXPECT_EQ(sink.seen[i].lsn, c.lsn + i);
  }
  EXPECT_EQ(node.last_lsn(), r.lsn);
}

// ---- slave side and identity updates ----------------------------------------------------------

TEST_F(NodeTest, ApplyReceivedKeepsTheRecordsLsnAndPublishesIt) {
  Node node(data_);
  node.store().set_track_files(true);  // as a slave runs it
  RecordingSink sink;
  sink.root = data_;
  node.add_sink(&sink);
  Record c = create_rec("f", 0xf1);
  c.lsn = 1000;
  ASSERT_EQ(node.apply_received(c, false), 0);
  std::string payload = "from master";
  Record w;
  w.op = Op::write;
  w.fid = 0xf1;
  w.data = payload;
  w.lsn = 1001;
  ASSERT_EQ(node.apply_received(w, false), 0);
  EXPECT_EQ(slurp(p("f")), "from master");
  EXPECT_EQ(sink.lsns(), (std::vector<Lsn>{1000, 1001}));
  EXPECT_TRUE(sink.seen[0].applied_before_publish);
  EXPECT_EQ(node.last_lsn(), 1001u);
}

TEST_F(NodeTest, ApplyReceivedFailureIsNotPublished) {
  Node node(data_);
  node.store().set_track_files(true);
  RecordingSink sink;
  node.add_sink(&sink);
  Record c = create_rec("f", 0xf1);
  c.lsn = 10;
  ASSERT_EQ(node.apply_received(c, false), 0);
  Record bad = unlink_rec("missing");
  bad.lsn = 11;
  EXPECT_EQ(node.apply_received(bad, false), ENOENT);
  EXPECT_EQ(node.last_lsn(), 10u);
  EXPECT_EQ(sink.lsns(), (std::vector<Lsn>{10}));
  // Replayed, a record whose effect is already there is skipped, and still passed downstream.
  Record again = create_rec("f", 0xf1);
  again.lsn = 10;
  EXPECT_EQ(node.apply_received(again, true), 0);
  EXPECT_EQ(node.apply_received(c, true), 0);
}

TEST_F(NodeTest, ApplyReceivedPublishesBarrierWithoutApplyingIt) {
  Node node(data_);
  node.store().set_track_files(true);
  RecordingSink sink;
  node.add_sink(&sink);
  Record b;
  b.op = Op::fsync;
  b.fid = 0x5151;  // unknown here: applying it would fail with ENOENT
  b.lsn = 77;
  EXPECT_EQ(node.apply_received(b, false), 0);
  EXPECT_EQ(sink.lsns(), (std::vector<Lsn>{77}));
  EXPECT_EQ(node.last_lsn(), 77u);
}

TEST_F(NodeTest, BarrierWaitsForSlavesAndReturnsTheirAnswer) {
  Node node(data_);
  RecordingSink sink;
  node.add_sink(&sink);
  std::vector<Lsn> waited;
  size_t published_when_waited = 0;
  node.set_barrier_waiter([&](Lsn lsn, Node::BarrierDone done) {
    waited.push_back(lsn);
    published_when_waited = sink.seen.size();
    done(EIO);
  });
  Record b;
  b.op = Op::fsync;
  b.fid = kRootFileId;
  EXPECT_EQ(node.barrier(b), EIO) << "too few slaves confirmed: the barrier must fail";
  EXPECT_EQ(waited, (std::vector<Lsn>{b.lsn}));
  EXPECT_EQ(published_when_waited, 1u) << "waited before the barrier was published";

  // A local failure wins over the slaves' answer.
  Record missing;
  missing.op = Op::fsync;
  missing.fid = 0x4444;
  EXPECT_EQ(node.barrier(missing), ENOENT);
  EXPECT_EQ(waited.size(), 2u) << "a barrier that failed here still waits for the slaves";

  node.set_barrier_waiter([&](Lsn lsn, Node::BarrierDone done) {
    waited.push_back(lsn);
    done(0);
  });
  Record ok;
  ok.op = Op::fsync;
  ok.fid = kRootFileId;
  EXPECT_EQ(node.barrier(ok), 0);
  EXPECT_EQ(waited.back(), ok.lsn);
  node.set_barrier_waiter(nullptr);
  Record plain;
  plain.op = Op::fsync;
  plain.fid = kRootFileId;
  EXPECT_EQ(node.barrier(plain), 0);
  EXPECT_EQ(waited.size(), 3u);

  // The answer may come later, from another thread (the one that received the slaves' ack).
  std::thread acker;
  node.set_barrier_waiter([&](Lsn, Node::BarrierDone done) {
    acker = std::thread([done = std::move(done)] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      done(EIO);
    });
  });
  Record later;
  later.op = Op::fsync;
  later.fid = kRootFileId;
  std::atomic<int> answer{-1};
  node.barrier_async(later, {}, [&](int err) { answer = err; });
  acker.join();
  EXPECT_EQ(answer.load(), EIO);
  node.set_barrier_waiter(nullptr);
}

TEST_F(NodeTest, CloseCleanLetsTheNextStartContinueRightAfterTheLastLsn) {
  Lsn last = 0;
  {
    Node a(data_);
    for (int i = 0; i < 3; i++) {
      Record r = mkdir_rec("d" + std::to_string(i), 0x600 + i);
      ASSERT_EQ(a.submit(r), 0);
      last = r.lsn;
    }
    a.close_clean();
  }
  Node b(data_);
  EXPECT_EQ(b.last_lsn(), last);
  Record r = mkdir_rec("after", 0x700);
  ASSERT_EQ(b.submit(r), 0);
  EXPECT_EQ(r.lsn, last + 1);
  // And the new run's reservation is on disk again before anything else happens.
  EXPECT_GT(identity_on_disk().lsn_reserved, r.lsn);
}

TEST_F(NodeTest, UpdateIdentityIsDurableAndSurvivesReopen) {
  std::string node_id;
  {
    Node a(data_);
    node_id = a.identity().node_id;
    a.update_identity([](Identity& id) {
      id.cluster_id = "cluster-1";
      id.role = "master";
      id.lineage.push_back({"epoch-a", 1});
    });
    EXPECT_EQ(a.identity().cluster_id, "cluster-1");
    Identity disk = identity_on_disk();
    EXPECT_EQ(disk.cluster_id, "cluster-1");
    EXPECT_EQ(disk.role, "master");
    ASSERT_EQ(disk.lineage.size(), 1u);
    EXPECT_EQ(disk.lineage[0].id, "epoch-a");
    // LSN reservations made later keep the other fields.
    Record r = mkdir_rec("x", 0x800);
    ASSERT_EQ(a.submit(r), 0);
  }
  Node b(data_);
  Identity id = b.identity();
  EXPECT_EQ(id.node_id, node_id);
  EXPECT_EQ(id.cluster_id, "cluster-1");
  EXPECT_EQ(id.role, "master");
  ASSERT_EQ(id.lineage.size(), 1u);
  EXPECT_EQ(id.lineage[0].first_lsn, 1u);
}

}  // namespace
}  // namespace blockrepl

namespace blockrepl {
namespace {

// Keeps whole records, as a journal does, to replay them on a replica.
struct KeepingSink : RecordSink {
  std::vector<Record> records;
  void on_record(const Record& rec) override {
    records.push_back(rec);
    records.back().own_data();
  }
};

timespec mtime_at(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(lstat(path.c_str(), &st), 0) << path;
  return st.st_mtim;
}

bool same_time(timespec a, timespec b) { return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec; }

TEST_F(NodeTest, ReplicaGetsTheMastersDirectoryAndFileTimesFromTheRecords) {
  const std::string replica_dir = tmp_.path + "/replica";
  ASSERT_EQ(mkdir(replica_dir.c_str(), 0755), 0);
  Node master(data_);
  master.store().set_track_files(true);
  KeepingSink sink;
  master.add_sink(&sink);
  auto pause = [] { std::this_thread::sleep_for(std::chrono::milliseconds(20)); };
  auto submit = [&](Record r) { ASSERT_EQ(master.submit(r), 0) << r.describe(); pause(); };
  Record r = mkdir_rec("a", 0xa1);
  submit(r);
  submit(mkdir_rec("b", 0xb1));
  r = create_rec("f", 0xf1);
  r.parent = 0xa1;
  submit(r);
  r = Record{};
  r.op = Op::link;
  r.fid = 0xf1;
  r.parent = 0xb1;
  r.name = "h";
  submit(r);
  r = Record{};
  r.op = Op::rename;
  r.parent = 0xa1;
  r.name = "f";
  r.parent2 = kRootFileId;
  r.name2 = "moved";
  submit(r);
  r = Record{};
  r.op = Op::unlink;
  r.parent = 0xb1;
  r.name = "h";
  r.fid = 0xf1;
  submit(r);
  r = Record{};
  r.op = Op::setattr;  // touch a directory: "now" on the master, the same instant on replicas
  r.fid = 0xa1;
  r.attr_valid = kAttrAtimeNow | kAttrMtimeNow;
  submit(r);
  ASSERT_EQ(sink.records.size(), 7u);
  for (size_t i = 1; i < 6; i++) EXPECT_TRUE(sink.records[i].attr_valid & kAttrStampDirs) << sink.records[i].describe();
  EXPECT_FALSE(sink.records[6].attr_valid & (kAttrAtimeNow | kAttrMtimeNow)) << "a replica would use its own clock";

  Node replica(replica_dir);
  replica.store().set_track_files(true);
  for (const Record& rec : sink.records) {
    pause();  // a replica applies later than the master did
    ASSERT_EQ(replica.apply_received(rec, false), 0) << rec.describe();
  }
  for (const char* rel : {"", "a", "b", "moved"})
    EXPECT_TRUE(same_time(mtime_at(p(rel)), mtime_at(replica_dir + "/" + rel))) << "mtime of '" << rel << "'";
  struct stat ma {}, ra {};
  ASSERT_EQ(stat(p("a").c_str(), &ma), 0);
  ASSERT_EQ(stat((replica_dir + "/a").c_str(), &ra), 0);
  EXPECT_TRUE(same_time(ma.st_atim, ra.st_atim)) << "atime set to 'now' on the master";
}

// Changes to different files are applied in parallel on a master (ApplyGate), changes to one
// file and namespace changes in order; replaying what was published, in LSN order, must give
// the master's state byte for byte and time for time.
TEST_F(NodeTest, ParallelApplyReplaysToTheSameState) {
  constexpr int kThreads = 4, kEach = 300;
  const std::string replica_dir = tmp_.path + "/replica";
  ASSERT_EQ(mkdir(replica_dir.c_str(), 0755), 0);
  Node master(data_);
  master.store().set_track_files(true);
  struct LockedSink : RecordSink {
    std::mutex mu;
    std::vector<Record> records;
    void on_record(const Record& rec) override {
      {
        std::lock_guard lk(mu);
        records.push_back(rec);
        records.back().own_data();
      }
      // Hold the ordering lock a moment: changes applied meanwhile queue for it, and a gate that
      // let two changes to one file run together would see them published out of order.
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  } sink;
  master.add_sink(&sink);
  constexpr FileId kShared = 0x5000;
  {
    Record c = create_rec("shared", kShared);
    ASSERT_EQ(master.submit(c), 0);
  }
  for (int t = 0; t < kThreads; t++) {
    Record c = create_rec("own" + std::to_string(t), 0x100 + t);
    ASSERT_EQ(master.submit(c), 0);
  }
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; t++) {
    threads.emplace_back([&, t] {
      uint64_t x = 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(t + 1);
      auto next = [&x] { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x; };
      for (int i = 0; i < kEach; i++) {
        Record r;
        const uint64_t pick = next() % 10;
        std::string payload(1 + next() % 3000, static_cast<char>('a' + (t * 7 + i) % 26));
        if (pick < 4) {  // its own file
          r.op = Op::write;
          r.fid = 0x100 + t;
          r.offset = next() % 20000;
          r.data = payload;
        } else if (pick < 8) {  // overlapping ranges of one file every thread writes
          r.op = Op::write;
          r.fid = kShared;
          r.offset = next() % 8000;
          r.data = payload;
        } else if (pick == 8) {
          r.op = Op::truncate;
          r.fid = next() % 2 ? kShared : 0x100 + t;
          r.offset = next() % 10000;
        } else {  // a namespace change between them
          const std::string name = "n" + std::to_string(t) + "_" + std::to_string(i);
          r = create_rec(name, 0x10000 + static_cast<FileId>(t) * 1000 + i);
        }
        if (master.submit(r) != 0) failures++;
      }
    });
  }
  for (auto& th : threads) th.join();
  ASSERT_EQ(failures.load(), 0);

  Node replica(replica_dir);
  replica.store().set_track_files(true);
  Lsn prev = 0;
  for (const Record& rec : sink.records) {
    ASSERT_GT(rec.lsn, prev);
    prev = rec.lsn;
    ASSERT_EQ(replica.apply_received(rec, false), 0) << rec.describe();
  }
  std::vector<std::string> names = {"shared"};
  for (int t = 0; t < kThreads; t++) names.push_back("own" + std::to_string(t));
  for (const std::string& n : names) {
    EXPECT_EQ(slurp(p(n)), slurp(replica_dir + "/" + n)) << n;
    EXPECT_TRUE(same_time(mtime_at(p(n)), mtime_at(replica_dir + "/" + n))) << "mtime of " << n;
  }
  EXPECT_TRUE(same_time(mtime_at(p("")), mtime_at(replica_dir))) << "mtime of the root";
  std::set<std::string> master_names, replica_names;
  for (auto& e : std::filesystem::directory_iterator(data_)) master_names.insert(e.path().filename());
  for (auto& e : std::filesystem::directory_iterator(replica_dir)) replica_names.insert(e.path().filename());
  EXPECT_EQ(master_names, replica_names);
}

}  // namespace
}  // namespace blockrepl
