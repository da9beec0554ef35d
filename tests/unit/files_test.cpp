// FileRegistry: FileId -> descriptors, orphans kept reachable, and the scan that rebuilds the table
// from the xattrs of a tree after a restart.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "blockrepl/file_id.h"
#include "blockrepl/files.h"
#include "blockrepl/metadata.h"
#include "blockrepl/record.h"
#include "blockrepl/store.h"
#include "temp_dir.h"
#include "proc_fds.h"

namespace blockrepl {
namespace {

std::string slurp(const std::string& path) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    ADD_FAILURE() << "open " << path << ": " << strerror(errno);
    return {};
  }
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

void spit(const std::string& path, const std::string& content) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
  close(fd);
}

// Same inode as the path names (without following a final symlink)?
bool fd_is(int fd, const std::string& path) {
  struct stat a, b;
  if (fd < 0 || fstat(fd, &a) != 0 || lstat(path.c_str(), &b) != 0) return false;
  return a.st_ino == b.st_ino && a.st_dev == b.st_dev;
}

Record rec_create(Op op, FileId parent, const std::string& name, FileId fid, uint32_t mode) {
  Record r;
  r.op = op;
  r.parent = parent;
  r.name = name;
  r.fid = fid;
  r.mode = mode;
  return r;
}

Record rec_write(FileId fid, uint64_t off, std::string_view data) {
  Record r;
  r.op = Op::write;
  r.fid = fid;
  r.offset = off;
  r.data = data;
  return r;
}

class FileRegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = tmp_.path + "/root";
    ASSERT_EQ(mkdir(root_.c_str(), 0755), 0);
    root_fd_ = open(root_.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    ASSERT_GE(root_fd_, 0);
    ASSERT_EQ(write_file_id(root_fd_, "", kRootFileId), 0);
  }
  void TearDown() override {
    if (root_fd_ >= 0) close(root_fd_);
  }
  std::string p(const std::string& rel) const { return root_ + "/" + rel; }

  TempDir tmp_;
  std::string root_;
  int root_fd_ = -1;
};

TEST_F(FileRegistryTest, KnowsTheRootFromTheStart) {
  FileRegistry t(root_fd_);
  EXPECT_EQ(t.size(), 1u);
  EXPECT_TRUE(fd_is(t.path(kRootFileId).get(), root_));
}

TEST_F(FileRegistryTest, ClearForgetsFilesButKeepsTheRoot) {
  FileRegistry t(root_fd_);
  int fd = open(p("f").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  close(fd);
  ASSERT_EQ(write_file_id(root_fd_, "f", 77), 0);
  ASSERT_EQ(t.scan(), 1u);
  EXPECT_GE(t.path(77).get(), 0);
  t.clear();
  EXPECT_EQ(t.path(77).get(), -1);
  EXPECT_TRUE(fd_is(t.path(kRootFileId).get(), root_)) << "records name the root as the parent of top-level entries";
}

TEST_F(FileRegistryTest, UnknownIdsGiveMinusOneAndEnoent) {
  FileRegistry t(root_fd_);
  EXPECT_EQ(t.path(0x1234).get(), -1);
  errno = 0;
  EXPECT_EQ(t.rw(0x1234).get(), -1);
  EXPECT_EQ(errno, ENOENT);
  EXPECT_EQ(t.path(kInvalidFileId).get(), -1);
}

TEST_F(FileRegistryTest, AddLearnsEntriesAndRwFdWritesThem) {
  spit(p("f"), "abc");
  ASSERT_EQ(mkdir(p("d").c_str(), 0755), 0);
  FileRegistry t(root_fd_);
  ASSERT_EQ(t.add(0x10, root_fd_, "f"), 0);
  ASSERT_EQ(t.add(0x20, root_fd_, "d"), 0);
  EXPECT_EQ(t.size(), 3u);
  EXPECT_TRUE(fd_is(t.path(0x10).get(), p("f")));
  EXPECT_TRUE(fd_is(t.path(0x20).get(), p("d")));
  int rw = t.rw(0x10).get();
  ASSERT_GE(rw, 0);
  EXPECT_EQ(t.rw(0x10).get(), rw) << "rw descriptor is reopened on every use";
  ASSERT_EQ(pwrite(rw, "XY", 2, 1), 2);
  EXPECT_EQ(slurp(p("f")), "aXY");
  // A directory has no read-write descriptor.
  EXPECT_EQ(t.rw(0x20).get(), -1);
  EXPECT_EQ(t.add(0x30, root_fd_, "missing"), ENOENT);
  EXPECT_EQ(t.path(0x30).get(), -1);
}

TEST_F(FileRegistryTest, AddOfSymlinkKeepsTheLinkNotItsTarget) {
  spit(p("target"), "t");
  ASSERT_EQ(symlink("target", p("link").c_str()), 0);
  FileRegistry t(root_fd_);
  ASSERT_EQ(t.add(0x40, root_fd_, "link"), 0);
  EXPECT_TRUE(fd_is(t.path(0x40).get(), p("link")));
  EXPECT_EQ(t.rw(0x40).get(), -1) << "a write by the symlink's id would reach its target";
}

TEST_F(FileRegistryTest, SecondNameOfSameInodeKeepsEntryAndMovedIdReplacesIt) {
  spit(p("a"), "A");
  ASSERT_EQ(link(p("a").c_str(), p("b").c_str()), 0);
  spit(p("c"), "C");
  FileRegistry t(root_fd_);
  ASSERT_EQ(t.add(0x50, root_fd_, "a"), 0);
  int fd = t.path(0x50).get();
  int rw = t.rw(0x50).get();
  ASSERT_GE(rw, 0);
  ASSERT_EQ(t.add(0x50, root_fd_, "b"), 0);  // same inode: keeps the descriptors
  EXPECT_EQ(t.path(0x50).get(), fd);
  EXPECT_EQ(t.rw(0x50).get(), rw);
  EXPECT_EQ(t.size(), 2u);
  ASSERT_EQ(t.add(0x50, root_fd_, "c"), 0);  // another inode: the id moved there
  EXPECT_TRUE(fd_is(t.path(0x50).get(), p("c")));
  int rw2 = t.rw(0x50).get();
  ASSERT_GE(rw2, 0);
  ASSERT_EQ(pwrite(rw2, "c", 1, 0), 1);
  EXPECT_EQ(slurp(p("c")), "c");
  EXPECT_EQ(slurp(p("a")), "A");
}

TEST_F(FileRegistryTest, ForgetDropsEntry) {
  spit(p("f"), "x");
  FileRegistry t(root_fd_);
  ASSERT_EQ(t.add(0x60, root_fd_, "f"), 0);
  ASSERT_GE(t.rw(0x60).get(), 0);
  t.forget(0x60);
  EXPECT_EQ(t.path(0x60).get(), -1);
  EXPECT_EQ(t.rw(0x60).get(), -1);
  EXPECT_EQ(t.size(), 1u);
  t.forget(0x60);  // twice is harmless
}

TEST_F(FileRegistryTest, OrphanedFileStaysReachableAndWritable) {
  spit(p("f"), "before");
  FileRegistry t(root_fd_);
  ASSERT_EQ(t.add(0x70, root_fd_, "f"), 0);
  int observer = open(p("f").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(observer, 0);
  ASSERT_EQ(unlink(p("f").c_str()), 0);
  t.maybe_orphaned(0x70, /*pin=*/true);
  ASSERT_GE(t.path(0x70).get(), 0);
  int rw = t.rw(0x70).get();  // first opened after the unlink
  ASSERT_GE(rw, 0);
  ASSERT_EQ(pwrite(rw, "AFTER", 5, 0), 5);
  char buf[16] = {};
  ASSERT_EQ(pread(observer, buf, sizeof buf, 0), 6);
  EXPECT_EQ(std::string(buf, 6), "AFTERe");
  close(observer);
}

// ---- scan ----------------------------------------------------------------------------------

constexpr FileId kDirA = 0xa000000000000001ull, kDirB = 0xb000000000000001ull, kDirMeta = 0xc000000000000001ull;
constexpr FileId kF1 = 0xf000000000000001ull, kF2 = 0xf000000000000002ull, kF3 = 0xf000000000000003ull;
constexpr FileId kLink = 0x1000000000000001ull, kFifo = 0x2000000000000001ull;
constexpr FileId kNested = 0xf000000000000010ull;

// A tree made by records: root/{a/{f1, b/{f2, .blockrepl/{f3}}}, link -> a/f1, fifo, hard}
void build_tree_by_records(int root_fd) {
  Store s(root_fd, true);
  auto ok = [&](const Record& r) { ASSERT_EQ(s.apply(r), 0) << r.describe(); };
  ok(rec_create(Op::mkdir, kRootFileId, "a", kDirA, 0755));
  ok(rec_create(Op::create, kDirA, "f1", kF1, S_IFREG | 0644));
  ok(rec_write(kF1, 0, "one"));
  ok(rec_create(Op::mkdir, kDirA, "b", kDirB, 0755));
  ok(rec_create(Op::create, kDirB, "f2", kF2, S_IFREG | 0600));
  ok(rec_write(kF2, 0, "two"));
  // A user folder called .blockrepl below the top is ordinary data.
  ok(rec_create(Op::mkdir, kDirB, kMetadataDirName, kDirMeta, 0755));
  ok(rec_create(Op::create, kDirMeta, "f3", kNested, S_IFREG | 0644));
  Record sl = rec_create(Op::symlink, kRootFileId, "link", kLink, 0);
  sl.data = "a/f1";
  ok(sl);
  ok(rec_create(Op::create, kRootFileId, "fifo", kFifo, S_IFIFO | 0644));
  ok(rec_create(Op::create, kRootFileId, "renamed-later", kF3, S_IFREG | 0644));
  Record mv;
  mv.op = Op::rename;
  mv.parent = kRootFileId;
  mv.name = "renamed-later";
  mv.parent2 = kDirB;
  mv.name2 = "f3";
  ok(mv);
}

TEST_F(FileRegistryTest, ScanAfterRestartFindsEveryIdAndSkipsMetadataFolder) {
  build_tree_by_records(root_fd_);
  // The node's own metadata folder at the top: it holds a tagged file that must stay unknown.
  ASSERT_EQ(mkdir(p(kMetadataDirName).c_str(), 0700), 0);
  spit(p(std::string(kMetadataDirName) + "/journal"), "private");
  int mfd = open(p(kMetadataDirName).c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(mfd, 0);
  constexpr FileId kPrivate = 0xdeadbeefdeadbeefull;
  ASSERT_EQ(write_file_id(mfd, "journal", kPrivate), 0);
  ASSERT_EQ(write_file_id(mfd, "", kPrivate + 1), 0);
  close(mfd);
  // An untagged file (put there behind the volume's back) is ignored.
  spit(p("a/untagged"), "?");

  // "Restart": a new Store on a new descriptor of the same directory.
  close(root_fd_);
  root_fd_ = open(root_.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(root_fd_, 0);
  Store s(root_fd_, true);
  FileRegistry& t = s.files();
  EXPECT_EQ(t.path(kF1).get(), -1) << "knew files before the scan";
  size_t found = t.scan();

  const std::map<FileId, std::string> want = {
      {kDirA, "a"},           {kF1, "a/f1"},       {kDirB, "a/b"},   {kF2, "a/b/f2"},
      {kDirMeta, "a/b/.blockrepl"}, {kNested, "a/b/.blockrepl/f3"}, {kLink, "link"},
      {kFifo, "fifo"},        {kF3, "a/b/f3"}};
  EXPECT_EQ(found, want.size());
  EXPECT_EQ(t.size(), want.size() + 1);  // + root
  for (const auto& [fid, rel] : want) EXPECT_TRUE(fd_is(t.path(fid).get(), p(rel))) << rel;
  EXPECT_EQ(t.path(kPrivate).get(), -1) << "scan learnt a file inside the metadata folder";
  EXPECT_EQ(t.path(kPrivate + 1).get(), -1) << "scan learnt the metadata folder";
  EXPECT_TRUE(fd_is(t.path(kRootFileId).get(), root_));

  // rw_fd works after the scan: records apply by id.
  std::string more = "+more";
  ASSERT_EQ(s.apply(rec_write(kF1, 3, more)), 0);
  ASSERT_EQ(s.apply(rec_write(kNested, 0, "nested")), 0);
  EXPECT_EQ(slurp(p("a/f1")), "one+more");
  EXPECT_EQ(slurp(p("a/b/.blockrepl/f3")), "nested");
  ASSERT_EQ(s.apply(rec_create(Op::create, kDirB, "new", 0x3000000000000001ull, S_IFREG | 0644)), 0);
  EXPECT_TRUE(std::filesystem::exists(p("a/b/new")));
  EXPECT_EQ(t.rw(kLink).get(), -1);
}

TEST_F(FileRegistryTest, ScanLearnsHardLinkedFileOnce) {
  spit(p("a"), "A");
  ASSERT_EQ(link(p("a").c_str(), p("b").c_str()), 0);
  ASSERT_EQ(write_file_id(root_fd_, "a", 0x99), 0);  // both names: one inode
  FileRegistry t(root_fd_);
  t.scan();
  EXPECT_EQ(t.size(), 2u);
  EXPECT_TRUE(fd_is(t.path(0x99).get(), p("a")));
}

TEST_F(FileRegistryTest, ScanNeverFollowsSymlinksOutOfTheTree) {
  TempDir outside;
  ASSERT_EQ(mkdir((outside.path + "/dir").c_str(), 0755), 0);
  spit(outside.path + "/dir/file", "x");
  int ofd = open((outside.path + "/dir").c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(ofd, 0);
  ASSERT_EQ(write_file_id(ofd, "", 0xabc1), 0);
  ASSERT_EQ(write_file_id(ofd, "file", 0xabc2), 0);
  close(ofd);
  ASSERT_EQ(symlink((outside.path + "/dir").c_str(), p("esc").c_str()), 0);
  ASSERT_EQ(write_file_id(root_fd_, "esc", 0xabc3), 0);

  FileRegistry t(root_fd_);
  EXPECT_EQ(t.scan(), 1u);
  EXPECT_TRUE(fd_is(t.path(0xabc3).get(), p("esc")));
  EXPECT_EQ(t.path(0xabc1).get(), -1);
  EXPECT_EQ(t.path(0xabc2).get(), -1);
}

TEST_F(FileRegistryTest, ScanOfDeepTree) {
  Store s(root_fd_, true);
  FileId parent = kRootFileId;
  for (int i = 0; i < 40; i++) {
    FileId d = 0x4000 + i;
    ASSERT_EQ(s.apply(rec_create(Op::mkdir, parent, "d", d, 0755)), 0);
    ASSERT_EQ(s.apply(rec_create(Op::create, d, "f", 0x8000 + i, S_IFREG | 0644)), 0);
    parent = d;
  }
  FileRegistry t(root_fd_);
  EXPECT_EQ(t.scan(), 80u);
  EXPECT_GE(t.path(0x8000 + 39).get(), 0);
  EXPECT_GE(t.rw(0x8000 + 39).get(), 0);
}

}  // namespace
}  // namespace blockrepl

// ---- the registry's rules, with a small budget ------------------------------------------------

namespace blockrepl {
namespace {

using blockrepl::testing::deleted_files_held;
using blockrepl::testing::open_descriptors;

class RegistryRules : public FileRegistryTest {
 protected:
  // n files f0..f<n-1> with ids 0x1000 + i, learnt by the registry.
  void make_files(FileRegistry& t, int n) {
    for (int i = 0; i < n; i++) {
      const std::string name = "f" + std::to_string(i);
      spit(p(name), "");
      ASSERT_EQ(write_file_id(root_fd_, name.c_str(), 0x1000 + i), 0);
      ASSERT_EQ(t.add(0x1000 + i, root_fd_, name.c_str()), 0);
    }
  }
};

TEST_F(RegistryRules, EvictedFilesReopenByHandleAndDescriptorsStayWithinTheBudget) {
  const int before = open_descriptors(getpid());
  FileRegistry t(root_fd_, /*budget=*/8);
  make_files(t, 300);
  EXPECT_LE(open_descriptors(getpid()), before + 3) << "learning files must not hold descriptors";
  for (int i = 0; i < 300; i++) {
    Fd rw = t.rw(0x1000 + i);
    ASSERT_GE(rw.get(), 0) << i;
    const std::string data = "file " + std::to_string(i);
    ASSERT_EQ(pwrite(rw.get(), data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    EXPECT_LE(t.cached_descriptors(), 8u);
  }
  EXPECT_LE(open_descriptors(getpid()), before + 3 + 8);
  // Every file, long evicted, opens again by its handle.
  for (int i = 0; i < 300; i += 37) {
    EXPECT_TRUE(fd_is(t.path(0x1000 + i).get(), p("f" + std::to_string(i))));
    EXPECT_EQ(slurp(p("f" + std::to_string(i))), "file " + std::to_string(i));
  }
  // A lease outlives its eviction.
  Fd held = t.path(0x1000);
  for (int i = 1; i < 50; i++) t.path(0x1000 + i);
  EXPECT_TRUE(fd_is(held.get(), p("f0")));
}

TEST_F(RegistryRules, HardLinksAreOneFileAndRenamesKeepTheHandle) {
  FileRegistry t(root_fd_, 4);
  make_files(t, 1);
  ASSERT_EQ(link(p("f0").c_str(), p("h0").c_str()), 0);
  ASSERT_EQ(t.add(0x1000, root_fd_, "h0"), 0);
  EXPECT_EQ(t.size(), 2u);
  ASSERT_EQ(rename(p("f0").c_str(), p("moved").c_str()), 0);
  ASSERT_EQ(unlink(p("h0").c_str()), 0);
  for (int i = 0; i < 10; i++) t.path(kRootFileId);
  t.maybe_orphaned(0x1000, /*pin=*/true);  // one name left: not an orphan
  EXPECT_EQ(t.pinned_orphans(), 0u);
  EXPECT_TRUE(fd_is(t.path(0x1000).get(), p("moved"))) << "a renamed file is reached by its handle";
}

TEST_F(RegistryRules, UnlinkedWhileOpenIsPinnedOnAReplicaUntilReleased) {
  FileRegistry t(root_fd_, 4);
  make_files(t, 6);
  ASSERT_GE(t.rw(0x1000).get(), 0);
  ASSERT_EQ(unlink(p("f0").c_str()), 0);
  t.maybe_orphaned(0x1000, /*pin=*/true);
  EXPECT_EQ(t.pinned_orphans(), 1u);
  for (int i = 1; i < 6; i++) t.rw(0x1000 + i);  // would evict it if it were merely cached
  Fd rw = t.rw(0x1000);
  ASSERT_GE(rw.get(), 0) << "records for a file the master still has open must keep applying";
  EXPECT_EQ(pwrite(rw.get(), "late", 4, 0), 4);
  rw = Fd();
  t.release(0x1000);
  EXPECT_EQ(t.path(0x1000).get(), -1);
  EXPECT_TRUE(deleted_files_held(getpid(), root_).empty()) << "a released file keeps its space";
}

TEST_F(RegistryRules, UnlinkedOnAMasterIsNotHeldSoItsSpaceComesBack) {
  FileRegistry t(root_fd_, 4);
  make_files(t, 1);
  ASSERT_GE(t.rw(0x1000).get(), 0);
  ASSERT_EQ(unlink(p("f0").c_str()), 0);
  t.maybe_orphaned(0x1000, /*pin=*/false);
  EXPECT_EQ(t.pinned_orphans(), 0u);
  EXPECT_TRUE(deleted_files_held(getpid(), root_).empty()) << "the registry keeps a deleted file's space";
  EXPECT_EQ(t.path(0x1000).get(), -1) << "nothing holds the inode: its handle no longer opens";
}

TEST_F(RegistryRules, ARenameOverAFileOrphansTheVictimThroughTheStore) {
  Store store(root_fd_, /*track_files=*/true);
  FileRegistry& t = store.files();
  t.set_budget(4);
  ASSERT_EQ(store.apply(rec_create(Op::create, kRootFileId, "a", 0xa, S_IFREG | 0644)), 0);
  ASSERT_EQ(store.apply(rec_create(Op::create, kRootFileId, "b", 0xb, S_IFREG | 0644)), 0);
  ASSERT_EQ(store.apply(rec_write(0xb, 0, "victim")), 0);
  Record r;
  r.op = Op::rename;
  r.parent = r.parent2 = kRootFileId;
  r.name = "a";
  r.name2 = "b";
  r.fid = 0xa;
  ASSERT_EQ(store.apply(r), 0);
  EXPECT_EQ(t.pinned_orphans(), 1u) << "the replaced file may still be written through handles open on the master";
  Record rel;
  rel.op = Op::release;
  rel.fid = 0xb;
  ASSERT_EQ(store.apply(rel), 0);
  EXPECT_EQ(t.pinned_orphans(), 0u);
  EXPECT_TRUE(deleted_files_held(getpid(), root_).empty());
  EXPECT_TRUE(fd_is(t.path(0xa).get(), p("b")));
}

TEST_F(RegistryRules, ManyFilesThroughTheStoreNeverHoldMoreThanTheBudget) {
  const int before = open_descriptors(getpid());
  Store store(root_fd_, /*track_files=*/true);
  store.files().set_budget(16);
  ASSERT_EQ(store.apply(rec_create(Op::mkdir, kRootFileId, "d", 0xd, S_IFDIR | 0755)), 0);
  int peak = 0;
  for (int i = 0; i < 5000; i++) {
    const FileId fid = 0x10000 + i;
    ASSERT_EQ(store.apply(rec_create(Op::create, 0xd, "f" + std::to_string(i), fid, S_IFREG | 0644)), 0) << i;
    ASSERT_EQ(store.apply(rec_write(fid, 0, "x")), 0) << i;
    if (i % 250 == 0) peak = std::max(peak, open_descriptors(getpid()));
  }
  EXPECT_LE(peak, before + 16 + 4) << "descriptors grew with the number of files";
  // After a restart the scan learns all of them without opening them.
  store.files().clear();
  EXPECT_EQ(store.files().scan(), 5001u);
  EXPECT_LE(open_descriptors(getpid()), before + 4);
  EXPECT_EQ(store.apply(rec_write(0x10000 + 4321, 1, "y")), 0);
  EXPECT_EQ(slurp(p("d/f4321")), "xy");
}

}  // namespace
}  // namespace blockrepl
