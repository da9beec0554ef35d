// Records for the POSIX details where a FUSE mount differs from ext4 by default: renames that
// leave a whiteout, and fallocate modes that shift data (collapse, insert). Applied by the Store
// with a HashIndex, as every node applies them, without FUSE.
#include <gtest/gtest.h>

#include <capnp/message.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stdio.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <memory>
#include <string>

#include "blockrepl.capnp.h"
#include "blockrepl/file_id.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/hash_tree.h"
#include "blockrepl/metadata.h"
#include "blockrepl/store.h"
#include "blockrepl/wire.h"
#include "hashed_volume.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

constexpr uint32_t kBs = 4096;

struct Volume : HashedVolume {
  Volume() : HashedVolume(kBs) {}
  int write(FileId fid, uint64_t off, const std::string& data) {
    Record r;
    r.op = Op::write;
    r.fid = fid;
    r.offset = off;
    r.data = data;
    return store->apply(r);
  }
  int fallocate(FileId fid, uint32_t mode, uint64_t off, uint64_t len) {
    Record r;
    r.op = Op::fallocate;
    r.fid = fid;
    r.flags = mode;
    r.offset = off;
    r.length = len;
    return store->apply(r);
  }
};

std::string pattern(size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i++) s[i] = static_cast<char>((i / kBs) * 7 + i % 251);
  return s;
}

std::string slurp(const std::string& p) {
  int fd = open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "<cannot open " + p + ">";
  std::string out;
  char buf[65536];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

// --- collapse and insert ----------------------------------------------------------------------

TEST(ShiftingFallocate, CollapseAndInsertGiveExt4sBytesAndAnExactHashTree) {
  Volume v;
  constexpr uint64_t KiB = 1024, MiB = 1024 * KiB;
  const std::string data = pattern(MiB);
  FileId f = v.create("f");
  ASSERT_EQ(v.write(f, 0, data), 0);
  EXPECT_EQ(v.index_root(f, "f"), v.fresh_root("f"));

  // The same calls on a plain file of the same file system.
  const std::string plain = v.path("plain");
  {
    int fd = open(plain.c_str(), O_CREAT | O_RDWR | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(pwrite(fd, data.data(), data.size(), 0), static_cast<ssize_t>(data.size()));
    ASSERT_EQ(fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 128 * KiB, 64 * KiB), 0) << strerror(errno);
    ASSERT_EQ(fallocate(fd, FALLOC_FL_INSERT_RANGE, 256 * KiB, 64 * KiB), 0) << strerror(errno);
    close(fd);
  }
  ASSERT_EQ(v.fallocate(f, FALLOC_FL_COLLAPSE_RANGE, 128 * KiB, 64 * KiB), 0);
  EXPECT_EQ(v.index_root(f, "f"), v.fresh_root("f")) << "tree after the collapse";
  ASSERT_EQ(v.fallocate(f, FALLOC_FL_INSERT_RANGE, 256 * KiB, 64 * KiB), 0);
  EXPECT_EQ(v.index_root(f, "f"), v.fresh_root("f")) << "tree after the insert";
  EXPECT_TRUE(slurp(v.path("f")) == slurp(plain)) << "bytes differ from the plain file's";

  // Unaligned ranges, and ranges reaching the end, are refused as ext4 refuses them.
  EXPECT_EQ(v.fallocate(f, FALLOC_FL_COLLAPSE_RANGE, 1000, 4096), EINVAL);
  EXPECT_EQ(v.fallocate(f, FALLOC_FL_INSERT_RANGE, 4096, 100), EINVAL);
  EXPECT_EQ(v.fallocate(f, FALLOC_FL_COLLAPSE_RANGE, MiB - 64 * KiB, 64 * KiB), EINVAL) << "collapse up to EOF";
  EXPECT_EQ(v.index_root(f, "f"), v.fresh_root("f"));
}

TEST(ShiftingFallocate, UncleanStopAfterAShiftRecoversAnExactTree) {
  Volume v;
  constexpr uint64_t MiB = 1 << 20;
  FileId f = v.create("f");
  ASSERT_EQ(v.write(f, 0, pattern(16 * MiB)), 0);
  v.index_root(f, "f");
  ASSERT_TRUE(v.hashes->checkpoint());
  // The size stays, but everything between 1 MiB and 15 MiB moves by one block: the extents in
  // between are neither at the offsets nor within the lengths of the two records.
  ASSERT_EQ(v.fallocate(f, FALLOC_FL_INSERT_RANGE, 1 * MiB, kBs), 0);
  ASSERT_EQ(v.fallocate(f, FALLOC_FL_COLLAPSE_RANGE, 15 * MiB, kBs), 0);
  v.crash_hashes();
  EXPECT_EQ(v.index_root(f, "f"), v.fresh_root("f")) << "the recovered tree misses shifted extents";
}

// --- rename with a whiteout ---------------------------------------------------------------------

Record whiteout_rename(FileId fid, const std::string& from, const std::string& to, FileId whiteout) {
  Record r;
  r.op = Op::rename;
  r.fid = fid;
  r.parent = r.parent2 = kRootFileId;
  r.name = from;
  r.name2 = to;
  r.flags = RENAME_WHITEOUT;
  r.whiteout_fid = whiteout;
  r.uid = 1234;
  r.gid = 5678;
  r.attr_valid = kAttrStampMtime;
  r.mtime = {1200000000, 5};
  return r;
}

TEST(RenameWhiteout, LeavesATaggedOwnedWhiteoutAndReplaysIdempotently) {
  Volume v;
  FileId f = v.create("a");
  const FileId w = new_file_id();
  const Record r = whiteout_rename(f, "a", "b", w);
  ASSERT_EQ(v.store->apply(r), 0);
  struct stat st;
  ASSERT_EQ(lstat(v.path("a").c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  EXPECT_EQ(st.st_rdev, makedev(0, 0));
  EXPECT_EQ(st.st_uid, 1234u);
  EXPECT_EQ(st.st_gid, 5678u);
  EXPECT_EQ(st.st_mtim.tv_sec, 1200000000) << "the master's mtime";
  EXPECT_EQ(read_file_id(v.root_fd, "a"), w);
  EXPECT_EQ(read_file_id(v.root_fd, "b"), f);
  EXPECT_GE(v.store->files().path(w).get(), 0) << "the whiteout is not in the file table";

  // Replayed (a re-attach resends it): nothing changes.
  ASSERT_EQ(v.store->apply_replayed(r), 0);
  EXPECT_EQ(read_file_id(v.root_fd, "a"), w);
  EXPECT_EQ(read_file_id(v.root_fd, "b"), f);

  // The daemon died between the rename and the tag: the replay finishes the job.
  ASSERT_EQ(lremovexattr(v.path("a").c_str(), kFileIdXattr), 0);
  ASSERT_EQ(v.store->apply_replayed(r), 0);
  EXPECT_EQ(read_file_id(v.root_fd, "a"), w);
}

TEST(RenameWhiteout, WhiteoutIdTravelsOnTheWire) {
  Record r = whiteout_rename(0x1111, "a", "b", 0x2222);
  capnp::MallocMessageBuilder msg;
  auto b = msg.initRoot<wire::Record>();
  to_wire(r, b);
  Record back = from_wire(b.asReader());
  EXPECT_EQ(back.whiteout_fid, 0x2222u);
  EXPECT_EQ(back.flags, static_cast<uint32_t>(RENAME_WHITEOUT));
  EXPECT_EQ(back.uid, 1234u);
  EXPECT_NE(r.describe().find("whiteout 0000000000002222"), std::string::npos) << r.describe();
}

}  // namespace
}  // namespace blockrepl
