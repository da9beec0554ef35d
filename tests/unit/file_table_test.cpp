// FileTable: FileId -> descriptors, orphans kept reachable, and the scan that rebuilds the table
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
#include "blockrepl/file_table.h"
#include "blockrepl/metadata.h"
#include "blockrepl/record.h"
#include "blockrepl/store.h"
#include "temp_dir.h"

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

class FileTableTest : public ::testing::Test {
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

TEST_F(FileTableTest, KnowsTheRootFromTheStart) {
  FileTable t(root_fd_);
  EXPECT_EQ(t.size(), 1u);
  EXPECT_TRUE(fd_is(t.path_fd(kRootFileId), root_));
}

TEST_F(FileTableTest, ClearForgetsFilesButKeepsTheRoot) {
  FileTable t(root_fd_);
  int fd = open(p("f").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
  ASSERT_GE(fd, 0);
  close(fd);
  ASSERT_EQ(write_file_id(root_fd_, "f", 77), 0);
  ASSERT_EQ(t.scan(), 1u);
  EXPECT_GE(t.path_fd(77), 0);
  t.clear();
  EXPECT_EQ(t.path_fd(77), -1);
  EXPECT_TRUE(fd_is(t.path_fd(kRootFileId), root_)) << "records name the root as the parent of top-level entries";
}

TEST_F(FileTableTest, UnknownIdsGiveMinusOneAndEnoent) {
  FileTable t(root_fd_);
  EXPECT_EQ(t.path_fd(0x1234), -1);
  errno = 0;
  EXPECT_EQ(t.rw_fd(0x1234), -1);
  EXPECT_EQ(errno, ENOENT);
  EXPECT_EQ(t.path_fd(kInvalidFileId), -1);
}

TEST_F(FileTableTest, AddLearnsEntriesAndRwFdWritesThem) {
  spit(p("f"), "abc");
  ASSERT_EQ(mkdir(p("d").c_str(), 0755), 0);
  FileTable t(root_fd_);
  ASSERT_EQ(t.add(0x10, root_fd_, "f"), 0);
  ASSERT_EQ(t.add(0x20, root_fd_, "d"), 0);
  EXPECT_EQ(t.size(), 3u);
  EXPECT_TRUE(fd_is(t.path_fd(0x10), p("f")));
  EXPECT_TRUE(fd_is(t.path_fd(0x20), p("d")));
  int rw = t.rw_fd(0x10);
  ASSERT_GE(rw, 0);
  EXPECT_EQ(t.rw_fd(0x10), rw) << "rw descriptor is reopened on every use";
  ASSERT_EQ(pwrite(rw, "XY", 2, 1), 2);
  EXPECT_EQ(slurp(p("f")), "aXY");
  // A directory has no read-write descriptor.
  EXPECT_EQ(t.rw_fd(0x20), -1);
  EXPECT_EQ(t.add(0x30, root_fd_, "missing"), ENOENT);
  EXPECT_EQ(t.path_fd(0x30), -1);
}

TEST_F(FileTableTest, AddOfSymlinkKeepsTheLinkNotItsTarget) {
  spit(p("target"), "t");
  ASSERT_EQ(symlink("target", p("link").c_str()), 0);
  FileTable t(root_fd_);
  ASSERT_EQ(t.add(0x40, root_fd_, "link"), 0);
  EXPECT_TRUE(fd_is(t.path_fd(0x40), p("link")));
  EXPECT_EQ(t.rw_fd(0x40), -1) << "a write by the symlink's id would reach its target";
}

TEST_F(FileTableTest, SecondNameOfSameInodeKeepsEntryAndMovedIdReplacesIt) {
  spit(p("a"), "A");
  ASSERT_EQ(link(p("a").c_str(), p("b").c_str()), 0);
  spit(p("c"), "C");
  FileTable t(root_fd_);
  ASSERT_EQ(t.add(0x50, root_fd_, "a"), 0);
  int fd = t.path_fd(0x50);
  int rw = t.rw_fd(0x50);
  ASSERT_GE(rw, 0);
  ASSERT_EQ(t.add(0x50, root_fd_, "b"), 0);  // same inode: keeps the descriptors
  EXPECT_EQ(t.path_fd(0x50), fd);
  EXPECT_EQ(t.rw_fd(0x50), rw);
  EXPECT_EQ(t.size(), 2u);
  ASSERT_EQ(t.add(0x50, root_fd_, "c"), 0);  // another inode: the id moved there
  EXPECT_TRUE(fd_is(t.path_fd(0x50), p("c")));
  int rw2 = t.rw_fd(0x50);
  ASSERT_GE(rw2, 0);
  ASSERT_EQ(pwrite(rw2, "c", 1, 0), 1);
  EXPECT_EQ(slurp(p("c")), "c");
  EXPECT_EQ(slurp(p("a")), "A");
}

TEST_F(FileTableTest, ForgetDropsEntry) {
  spit(p("f"), "x");
  FileTable t(root_fd_);
  ASSERT_EQ(t.add(0x60, root_fd_, "f"), 0);
  ASSERT_GE(t.rw_fd(0x60), 0);
  t.forget(0x60);
  EXPECT_EQ(t.path_fd(0x60), -1);
  EXPECT_EQ(t.rw_fd(0x60), -1);
  EXPECT_EQ(t.size(), 1u);
  t.forget(0x60);  // twice is harmless
}

TEST_F(FileTableTest, OrphanedFileStaysReachableAndWritable) {
  spit(p("f"), "before");
  FileTable t(root_fd_);
  ASSERT_EQ(t.add(0x70, root_fd_, "f"), 0);
  int observer = open(p("f").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(observer, 0);
  ASSERT_EQ(unlink(p("f").c_str()), 0);
  t.maybe_orphaned(0x70);
  ASSERT_GE(t.path_fd(0x70), 0);
  int rw = t.rw_fd(0x70);  // first opened after the unlink
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

TEST_F(FileTableTest, ScanAfterRestartFindsEveryIdAndSkipsMetadataFolder) {
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
  FileTable& t = s.files();
  EXPECT_EQ(t.path_fd(kF1), -1) << "knew files before the scan";
  size_t found = t.scan();

  const std::map<FileId, std::string> want = {
      {kDirA, "a"},           {kF1, "a/f1"},       {kDirB, "a/b"},   {kF2, "a/b/f2"},
      {kDirMeta, "a/b/.blockrepl"}, {kNested, "a/b/.blockrepl/f3"}, {kLink, "link"},
      {kFifo, "fifo"},        {kF3, "a/b/f3"}};
  EXPECT_EQ(found, want.size());
  EXPECT_EQ(t.size(), want.size() + 1);  // + root
  for (const auto& [fid, rel] : want) EXPECT_TRUE(fd_is(t.path_fd(fid), p(rel))) << rel;
  EXPECT_EQ(t.path_fd(kPrivate), -1) << "scan learnt a file inside the metadata folder";
  EXPECT_EQ(t.path_fd(kPrivate + 1), -1) << "scan learnt the metadata folder";
  EXPECT_TRUE(fd_is(t.path_fd(kRootFileId), root_));

  // rw_fd works after the scan: records apply by id.
  std::string more = "+more";
  ASSERT_EQ(s.apply(rec_write(kF1, 3, more)), 0);
  ASSERT_EQ(s.apply(rec_write(kNested, 0, "nested")), 0);
  EXPECT_EQ(slurp(p("a/f1")), "one+more");
  EXPECT_EQ(slurp(p("a/b/.blockrepl/f3")), "nested");
  ASSERT_EQ(s.apply(rec_create(Op::create, kDirB, "new", 0x3000000000000001ull, S_IFREG | 0644)), 0);
  EXPECT_TRUE(std::filesystem::exists(p("a/b/new")));
  EXPECT_EQ(t.rw_fd(kLink), -1);
}

TEST_F(FileTableTest, ScanLearnsHardLinkedFileOnce) {
  spit(p("a"), "A");
  ASSERT_EQ(link(p("a").c_str(), p("b").c_str()), 0);
  ASSERT_EQ(write_file_id(root_fd_, "a", 0x99), 0);  // both names: one inode
  FileTable t(root_fd_);
  t.scan();
  EXPECT_EQ(t.size(), 2u);
  EXPECT_TRUE(fd_is(t.path_fd(0x99), p("a")));
}

TEST_F(FileTableTest, ScanNeverFollowsSymlinksOutOfTheTree) {
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

  FileTable t(root_fd_);
  EXPECT_EQ(t.scan(), 1u);
  EXPECT_TRUE(fd_is(t.path_fd(0xabc3), p("esc")));
  EXPECT_EQ(t.path_fd(0xabc1), -1);
  EXPECT_EQ(t.path_fd(0xabc2), -1);
}

TEST_F(FileTableTest, ScanOfDeepTree) {
  Store s(root_fd_, true);
  FileId parent = kRootFileId;
  for (int i = 0; i < 40; i++) {
    FileId d = 0x4000 + i;
    ASSERT_EQ(s.apply(rec_create(Op::mkdir, parent, "d", d, 0755)), 0);
    ASSERT_EQ(s.apply(rec_create(Op::create, d, "f", 0x8000 + i, S_IFREG | 0644)), 0);
    parent = d;
  }
  FileTable t(root_fd_);
  EXPECT_EQ(t.scan(), 80u);
  EXPECT_GE(t.path_fd(0x8000 + 39), 0);
  EXPECT_GE(t.rw_fd(0x8000 + 39), 0);
}

}  // namespace
}  // namespace blockrepl
