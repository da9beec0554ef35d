// Hash index, namespace snapshot, Merkle diff and staged switch, without FUSE: two volumes
// driven by records through their Stores, the diff run over a socketpair between them.
#include <gtest/gtest.h>

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/limits.h>
#include <linux/falloc.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>
#include <algorithm>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/merkle.h"
#include "blockrepl/metadata.h"
#include "blockrepl/namespace.h"
#include "blockrepl/store.h"
#include "blockrepl/wire.h"
#include "proc_fds.h"
#include "hashed_volume.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

constexpr uint32_t kBs = 4096;

std::string random_bytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

struct Volume : HashedVolume {
  Volume() : HashedVolume(kBs) {}
  FileId create(FileId parent, const std::string& name, mode_t mode = S_IFREG | 0644, FileId fid = 0) {
    Record r;
    r.op = S_ISDIR(mode) ? Op::mkdir : Op::create;
    r.parent = parent;
    r.name = name;
    r.fid = fid ? fid : new_file_id();
    r.mode = mode;
    EXPECT_EQ(apply(r), 0) << name;
    return r.fid;
  }
  void write(FileId fid, uint64_t off, const std::string& data) {
    Record r;
    r.op = Op::write;
    r.fid = fid;
    r.offset = off;
    r.data = data;
    EXPECT_EQ(apply(r), 0);
  }
  void truncate(FileId fid, uint64_t size) {
    Record r;
    r.op = Op::truncate;
    r.fid = fid;
    r.offset = size;
    EXPECT_EQ(apply(r), 0);
  }
  void rename(FileId p1, const std::string& n1, FileId p2, const std::string& n2) {
    Record r;
    r.op = Op::rename;
    r.parent = p1;
    r.name = n1;
    r.parent2 = p2;
    r.name2 = n2;
    EXPECT_EQ(apply(r), 0);
  }
  void unlink(FileId parent, const std::string& name, FileId fid, bool dir = false) {
    Record r;
    r.op = dir ? Op::rmdir : Op::unlink;
    r.parent = parent;
    r.name = name;
    r.fid = fid;
    EXPECT_EQ(apply(r), 0);
  }
};

// A master volume whose contents are copied (with file ids) to a slave volume, as a full copy does.
void copy_volume(const Volume& from, Volume& to) {
  std::string cmd = "cp -a --preserve=all " + from.dir.path + "/. " + to.dir.path + "/ && rm -rf " + to.dir.path +
                    "/.blockrepl/hashes/* " + to.dir.path + "/.blockrepl/dirty-log.*";
  ASSERT_EQ(system(cmd.c_str()), 0);
  to.store->files().clear();
  to.store->files().scan();
  to.crash_hashes();
}

// Runs the diff between slave and master over a socketpair, stages, commits, applies.
struct DiffRun {
  DiffReport report;
  Stage::Applied applied;
  uint64_t wire_bytes = 0;
};
DiffRun merkle(Volume& master, Volume& slave, bool apply_twice = false) {
  int sv[2];
  EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  Connection mconn(sv[0], "slave"), sconn(sv[1], "master");
  std::string server_error;
  std::thread server([&] {
    try {
      serve_merkle_diff(mconn, master.root_fd, *master.hashes, true, false, 10000);
    } catch (const std::exception& e) {
      server_error = e.what();
    }
  });
  DiffRun run;
  Stage stage(slave.meta_fd, slave.dir.path, false);
  stage.begin();
  try {
    run.report = run_merkle_diff(sconn, slave.root_fd, *slave.hashes, &stage, false, 10000);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "the slave's side of the diff failed: " << e.what();
    sconn.shutdown();
  }
  server.join();
  EXPECT_EQ(server_error, "");
  run.wire_bytes = sconn.bytes_received();
  stage.commit(master.lsn);
  run.applied = stage.apply(*slave.store, kBs);
  if (apply_twice) run.applied = stage.apply(*slave.store, kBs);  // a crash during the first one
  stage.discard();
  return run;
}

// One line per entry (path, mode, size, content hash, file id), sorted.
std::string tree_listing(const std::string& root) {
  std::vector<std::string> lines;
  for (auto& e : std::filesystem::recursive_directory_iterator(root)) {
    std::string rel = e.path().string().substr(root.size());
    if (rel.rfind("/.blockrepl", 0) == 0) continue;
    struct stat st;
    lstat(e.path().c_str(), &st);
    std::string out = rel + " mode=" + std::to_string(st.st_mode);
    if (S_ISREG(st.st_mode)) {
      std::string data(static_cast<size_t>(st.st_size), '\0');
      int fd = open(e.path().c_str(), O_RDONLY);
      if (pread(fd, data.data(), data.size(), 0) != static_cast<ssize_t>(data.size())) out += " SHORT";
      close(fd);
      out += " size=" + std::to_string(st.st_size) + " data=" + hash_bytes(data.data(), data.size()).hex();
    }
    auto fid = read_file_id(AT_FDCWD, e.path().c_str());
    out += " fid=" + std::to_string(fid.value_or(0)) + "\n";
    lines.push_back(out);
  }
  std::sort(lines.begin(), lines.end());
  std::string all;
  for (auto& l : lines) all += l;
  return all;
}

// ---------------------------------------------------------------------------------------------

TEST(HashIndex, TreeFollowsRecordsWithoutRereadingTheFile) {
  Volume v;
  std::mt19937_64 rng(1);
  FileId f = v.create(kRootFileId, "f");
  v.write(f, 0, random_bytes(rng, 1 << 20));
  EXPECT_EQ(v.index_root(f, "f"), v.fresh_root("f"));
  const uint64_t before = v.hashes->stats().blocks_hashed;
  v.write(f, 12345, "changed");
  v.write(f, (2 << 20) + 7, "past the end");
  v.truncate(f, (1 << 20) + 100);
  EXPECT_EQ(v.index_root(f, "f"), v.fresh_root("f"));
  EXPECT_LE(v.hashes->stats().blocks_hashed - before, 3u) << "only the changed blocks are rehashed";
  Record punch;
  punch.op = Op::fallocate;
  punch.fid = f;
  punch.flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  punch.offset = 8192;
  punch.length = 3 * kBs;
  ASSERT_EQ(v.apply(punch), 0);
  EXPECT_EQ(v.index_root(f, "f"), v.fresh_root("f"));
}

TEST(HashIndex, LetsGoOfFilesThatLostTheirLastName) {
  Volume v;
  std::mt19937_64 rng(3);
  FileId a = v.create(kRootFileId, "a");
  v.write(a, 0, random_bytes(rng, 1 << 20));
  FileId b = v.create(kRootFileId, "b");
  v.write(b, 0, random_bytes(rng, 1 << 20));
  FileId c = v.create(kRootFileId, "c");
  v.write(c, 0, random_bytes(rng, 4096));
  v.unlink(kRootFileId, "a", a);
  v.rename(kRootFileId, "c", kRootFileId, "b");  // b loses its name to c
  Record rel;
  rel.op = Op::release;  // the master closed them: the store's file table lets go too
  rel.fid = a;
  ASSERT_EQ(v.apply(rel), 0);
  rel.fid = b;
  ASSERT_EQ(v.apply(rel), 0);
  EXPECT_EQ(blockrepl::testing::deleted_files_held(getpid(), v.dir.path), std::vector<std::string>{})
      << "deleted files are still held open, so their space is not freed";
  EXPECT_EQ(v.index_root(c, "b"), v.fresh_root("b"));  // the survivor's tree is intact
}

TEST(HashIndex, CleanCloseSavesTreesAndTheNextStartRehashesNothing) {
  Volume v;
  std::mt19937_64 rng(2);
  FileId f = v.create(kRootFileId, "f");
  v.write(f, 0, random_bytes(rng, 4 << 20));
  const Hash128 root = v.index_root(f, "f");
  v.hashes->close_clean();
  v.crash_hashes();  // reopen: the log is empty, so nothing is recovered
  EXPECT_EQ(v.hashes->stats().recovered_files, 0u);
  EXPECT_EQ(v.index_root(f, "f"), root);
  EXPECT_EQ(v.hashes->stats().blocks_hashed, 0u) << "the saved tree was used";
}

TEST(HashIndex, UncleanStopRehashesOnlyLoggedExtents) {
  Volume v;
  std::mt19937_64 rng(3);
  FileId f = v.create(kRootFileId, "f");
  const std::string chunk = random_bytes(rng, 8 << 20);
  for (uint64_t off = 0; off < (256u << 20); off += chunk.size()) v.write(f, off, chunk);  // 65536 blocks
  v.index_root(f, "f");
  ASSERT_TRUE(v.hashes->checkpoint());
  // Changes after the checkpoint, then the daemon dies before the next one.
  v.write(f, 5 << 20, "one");
  v.write(f, (200u << 20) + 1, "two");
  v.crash_hashes();
  EXPECT_EQ(v.hashes->stats().recovered_files, 1u);
  EXPECT_LE(v.hashes->stats().blocks_hashed, 2 * DirtyLog::kExtentSize / kBs) << "the two logged extents at most";
  EXPECT_LT(v.hashes->stats().blocks_hashed, 65536u / 2) << "never the whole file";
  EXPECT_EQ(v.index_root(f, "f"), v.fresh_root("f"));
}

TEST(HashIndex, SequentialWriterLogsAheadRandomWriterDoesNot) {
  Volume v;
  std::mt19937_64 rng(6);
  FileId f = v.create(kRootFileId, "seq");
  const std::string mib = random_bytes(rng, 1 << 20);
  const uint64_t syncs_before = v.hashes->stats().log_syncs;
  for (uint64_t off = 0; off < (128u << 20); off += mib.size()) v.write(f, off, mib);
  const uint64_t seq_syncs = v.hashes->stats().log_syncs - syncs_before;
  EXPECT_LE(seq_syncs, 2u) << "128 MiB sequentially: one log sync per 128 MiB run, not one per 4 MiB extent";
  // The same in the order FUSE writeback may deliver it: 1 MiB pieces shuffled within 12 MiB.
  FileId h = v.create(kRootFileId, "seq-reordered");
  const uint64_t reordered_before = v.hashes->stats().log_syncs;
  for (uint64_t group = 0; group < (132u << 20); group += 12u << 20) {
    std::vector<uint64_t> offs;
    for (uint64_t off = group; off < group + (12u << 20); off += mib.size()) offs.push_back(off);
    std::shuffle(offs.begin(), offs.end(), rng);
    for (uint64_t off : offs) v.write(h, off, mib);
  }
  EXPECT_LE(v.hashes->stats().log_syncs - reordered_before, 4u) << "a reordered sequential writer is still sequential";
  FileId g = v.create(kRootFileId, "rnd");
  v.write(g, 0, std::string(1 << 20, 'x'));
  v.truncate(g, 256u << 20);
  const uint64_t before = v.hashes->stats().log_syncs;
  for (uint64_t x : {7u, 31u, 50u}) v.write(g, x * DirtyLog::kExtentSize + 4096, "r");
  EXPECT_EQ(v.hashes->stats().log_syncs - before, 3u) << "each new extent of a random writer is logged alone";
}

TEST(Namespace, EqualVolumesHaveEqualRootsAndAnyChangeShows) {
  Volume a, b;
  FileId d = a.create(kRootFileId, "d", S_IFDIR | 0755);
  FileId f = a.create(d, "f");
  a.write(f, 0, "hello");
  copy_volume(a, b);
  auto ra = NamespaceSnapshot::take(a.root_fd, *a.hashes, false).root_hash();
  EXPECT_EQ(ra, NamespaceSnapshot::take(b.root_fd, *b.hashes, false).root_hash());
  chmod(b.path("d/f").c_str(), 0600);
  EXPECT_NE(ra, NamespaceSnapshot::take(b.root_fd, *b.hashes, false).root_hash());
}

TEST(Merkle, ScatteredChangesSendOnlyTheirBlocks) {
  Volume m, s;
  std::mt19937_64 rng(4);
  FileId f = m.create(kRootFileId, "vol");
  m.write(f, 0, random_bytes(rng, 64 << 20));
  copy_volume(m, s);
  std::set<uint64_t> changed;
  for (int i = 0; i < 20; i++) {
    uint64_t blk = rng() % (16384);
    changed.insert(blk);
    m.write(f, blk * kBs, random_bytes(rng, kBs));
  }
  DiffRun r = merkle(m, s);
  EXPECT_EQ(r.report.blocks, changed.size());
  EXPECT_LT(r.wire_bytes, 300u * 1024) << "20 blocks and a few levels of hashes";
  EXPECT_EQ(tree_listing(m.dir.path), tree_listing(s.dir.path));
  EXPECT_EQ(s.index_root(f, "vol"), s.fresh_root("vol")) << "the slave's tree followed the staged writes";
}

// A slave whose copy of a file is short while the master's grew into a huge sparse file: the
// diff fetches the blocks that hold data, never the hole between (which used to answer "absent"
// on the slave's side and differ from the master's zero hashes all the way down).
TEST(Merkle, HugeSparseFileOnTheMasterAgainstAShortCopyFetchesOnlyItsData) {
  Volume m, s;
  std::mt19937_64 rng(5);
  FileId f = m.create(kRootFileId, "vol");
  m.write(f, 0, random_bytes(rng, 1 << 20));
  copy_volume(m, s);
  const uint64_t huge = (uint64_t{16} << 40) - kBs;  // the largest file ext4 takes with 4 KiB blocks
  m.truncate(f, huge);
  const std::vector<uint64_t> far = {(uint64_t{1} << 30), huge / 2 / kBs * kBs, huge - kBs};
  for (uint64_t off : far) m.write(f, off, random_bytes(rng, kBs));
  DiffRun r = merkle(m, s);
  EXPECT_EQ(r.report.blocks, far.size());
  EXPECT_LT(r.wire_bytes, 256u * 1024) << "three blocks and the hashes along their paths";
  struct stat st;
  ASSERT_EQ(stat((s.dir.path + "/vol").c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), huge);
  EXPECT_EQ(s.index_root(f, "vol"), m.index_root(f, "vol")) << "the slave's tree equals the master's";
}

TEST(Merkle, NamespaceChangesAndLocalChangesAreRepairedAndApplyIsIdempotent) {
  Volume m, s;
  std::mt19937_64 rng(5);
  FileId d1 = m.create(kRootFileId, "d1", S_IFDIR | 0755);
  FileId d2 = m.create(kRootFileId, "d2", S_IFDIR | 0755);
  FileId a = m.create(d1, "a");
  m.write(a, 0, random_bytes(rng, 100000));
  FileId b = m.create(d2, "b");
  m.write(b, 0, "bbbb");
  FileId sub = m.create(d1, "sub", S_IFDIR | 0700);
  FileId c = m.create(sub, "c");
  m.write(c, 0, "cccc");
  copy_volume(m, s);
  // On the master while the slave is away:
  m.rename(d1, "a", d2, "a-moved");        // across directories
  m.rename(d1, "sub", d2, "sub-moved");    // a directory with contents
  m.unlink(d2, "b", b);
  FileId n = m.create(kRootFileId, "new");
  m.write(n, 0, random_bytes(rng, 50000));
  m.truncate(a, 4000);
  FileId d3 = m.create(kRootFileId, "b", S_IFDIR | 0755);  // a name that was a file elsewhere
  (void)d3;
  // A local change on the slave the master never made.
  {
    int fd = open(s.path("d1/local").c_str(), O_CREAT | O_WRONLY, 0644);
    ASSERT_GE(fd, 0);
    close(fd);
  }
  DiffRun r = merkle(m, s, /*apply_twice=*/true);
  EXPECT_EQ(tree_listing(m.dir.path), tree_listing(s.dir.path));
  EXPECT_FALSE(std::filesystem::exists(s.path("d1/local")));
  EXPECT_TRUE(std::filesystem::exists(s.path("d2/sub-moved/c")));
  EXPECT_EQ(r.report.whole_files, 1u) << "only the new file is sent whole";
}

// Only the volume root holds the metadata folder: below it `.blockrepl` is an ordinary name,
// which the mount and the Store allow and a master lists. The slave refused every such entry,
// so every Merkle diff of such a volume failed (found by tests/fuzz/fuzz_namespace).
TEST(Namespace, MetadataFolderNameIsRefusedOnlyAtTheRoot) {
  NsEntryInfo e;
  e.name = kMetadataDirName;
  e.fid = 0x42;
  e.mode = S_IFDIR | 0755;
  capnp::MallocMessageBuilder mb;
  auto w = mb.initRoot<wire::NsEntry>();
  to_wire(e, w);
  EXPECT_THROW(from_wire(w.asReader(), /*at_volume_root=*/true), Error);
  EXPECT_EQ(from_wire(w.asReader(), /*at_volume_root=*/false).name, kMetadataDirName);
}

// List elements may share their bytes: a small message could list millions of xattrs. No more
// than listxattr(2) can give a master (XATTR_LIST_MAX bytes of names) is taken (found by
// tests/fuzz/fuzz_namespace: 30 s and 1 GiB for a 200-byte entry).
TEST(Namespace, EntryWithMoreXattrsThanLinuxCanListIsRefused) {
  capnp::MallocMessageBuilder mb;
  auto w = mb.initRoot<wire::NsEntry>();
  NsEntryInfo e;
  e.name = "f";
  e.fid = 0x42;
  e.mode = S_IFREG | 0644;
  to_wire(e, w);
  auto xl = w.initXattrs(XATTR_LIST_MAX / 8 + 1);
  for (unsigned i = 0; i < xl.size(); i++) xl[i].setName("user.a");  // 7 bytes with the NUL
  EXPECT_NO_THROW(from_wire(w.asReader(), false));
  xl = w.initXattrs(XATTR_LIST_MAX / 7 + 1);
  for (unsigned i = 0; i < xl.size(); i++) xl[i].setName("user.a");
  EXPECT_THROW(from_wire(w.asReader(), false), Error);
}

TEST(Merkle, FolderNamedLikeTheMetadataFolderBelowTheRootIsRepaired) {
  Volume m, s;
  FileId d = m.create(kRootFileId, "d", S_IFDIR | 0755);
  FileId meta_like = m.create(d, kMetadataDirName, S_IFDIR | 0755);
  FileId f = m.create(meta_like, "f");
  m.write(f, 0, "first");
  copy_volume(m, s);
  m.write(f, 0, "second");
  FileId g = m.create(meta_like, "g");
  m.write(g, 0, "new");
  DiffRun r = merkle(m, s);
  EXPECT_EQ(tree_listing(m.dir.path), tree_listing(s.dir.path));
  EXPECT_TRUE(std::filesystem::exists(s.path("d/.blockrepl/g")));
  EXPECT_EQ(r.report.whole_files, 1u);
}

TEST(Merkle, StageWithoutCommitIsDiscarded) {
  Volume s;
  Stage stage(s.meta_fd, s.dir.path, false);
  stage.begin();
  EXPECT_FALSE(stage.committed());
  Stage again(s.meta_fd, s.dir.path, false);
  EXPECT_FALSE(again.committed());
  again.begin();  // drops what the first one left
  again.commit(7);
  EXPECT_TRUE(again.committed());
  EXPECT_EQ(again.committed_lsn(), 7u);
  EXPECT_THROW(again.begin(), Error) << "a committed stage must be applied first";
  again.discard();
  EXPECT_FALSE(again.committed());
}

}  // namespace
}  // namespace blockrepl
