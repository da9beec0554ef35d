// The record policy (record_policy.h): every class of record nobody may send is refused with
// its errno, everything a trusted master may send is allowed; and the Store, through which
// records, full-copy entries and Merkle stages all pass, applies that verdict before anything
// reaches the disk (nothing is left behind by a refused record).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "blockrepl/copy.h"
#include "blockrepl/error.h"
#include "blockrepl/record_policy.h"
#include "blockrepl/wire.h"
#include "hashed_volume.h"

namespace blockrepl {
namespace {

constexpr FileId kNew = 0x5050000000000001ull;
constexpr FileId kFile = 0x5050000000000002ull;

Record created(Op op, uint32_t mode, const std::string& name = "e") {
  Record r;
  r.op = op;
  r.parent = kRootFileId;
  r.fid = kNew;
  r.name = name;
  r.mode = mode;
  if (op == Op::symlink) r.data = "target";
  return r;
}

Record xattr(Op op, const std::string& name, std::string_view value = "v") {
  Record r;
  r.op = op;
  r.fid = kFile;
  r.name = name;
  if (op == Op::setxattr) r.data = value;
  return r;
}

Record setattr_mode(uint32_t mode) {
  Record r;
  r.op = Op::setattr;
  r.fid = kFile;
  r.attr_valid = kAttrMode;
  r.mode = mode;
  return r;
}

// The errno and a non-empty reason.
int refusal(const Record& r) {
  std::string reason;
  const int err = check_record(r, &reason);
  if (err) {
    EXPECT_FALSE(reason.empty()) << r.describe();
  }
  return err;
}

// ---- what nobody may send ------------------------------------------------------------------

TEST(RecordPolicy, NamesThatAreNotOnePathComponentAreMalformed) {
  for (const std::string& bad : {std::string(), std::string("."), std::string(".."), std::string("a/b"),
                                 std::string("a\0b", 3), std::string(256, 'n')}) {
    SCOPED_TRACE("name of " + std::to_string(bad.size()) + " bytes");
    EXPECT_EQ(refusal(created(Op::create, S_IFREG | 0644, bad)), EINVAL);
    EXPECT_EQ(refusal(created(Op::mkdir, S_IFDIR | 0755, bad)), EINVAL);
    EXPECT_EQ(refusal(created(Op::symlink, S_IFLNK | 0777, bad)), EINVAL);
    for (Op op : {Op::link, Op::unlink, Op::rmdir}) {
      Record r;
      r.op = op;
      r.fid = kFile;
      r.parent = kRootFileId;
      r.name = bad;
      EXPECT_EQ(refusal(r), EINVAL) << op_name(op);
    }
    Record mv;
    mv.op = Op::rename;
    mv.parent = mv.parent2 = kRootFileId;
    mv.name = "ok";
    mv.name2 = bad;
    EXPECT_EQ(refusal(mv), EINVAL);
    std::swap(mv.name, mv.name2);
    EXPECT_EQ(refusal(mv), EINVAL);
  }
  EXPECT_EQ(check_record(created(Op::create, S_IFREG | 0644, std::string(255, 'n'))), 0);
}

TEST(RecordPolicy, FileTypesThatDoNotExistOrDoNotMatchTheOperationAreMalformed) {
  // 0170000 is S_IFMT itself; 0030000 and 0050000 are no type.
  for (uint32_t type : {0170000u, 0030000u, 0050000u, 0070000u, 0110000u, 0130000u, 0150000u})
    EXPECT_EQ(refusal(created(Op::create, type | 0644)), EINVAL) << std::oct << type;
  EXPECT_EQ(refusal(created(Op::create, 0644)), EINVAL) << "create without a type";
  EXPECT_EQ(refusal(created(Op::create, S_IFDIR | 0755)), EINVAL) << "create of a directory";
  EXPECT_EQ(refusal(created(Op::create, S_IFLNK | 0777)), EINVAL) << "create of a symlink";
  EXPECT_EQ(refusal(created(Op::mkdir, S_IFREG | 0755)), EINVAL);
  EXPECT_EQ(refusal(created(Op::symlink, S_IFCHR | 0777)), EINVAL);
  EXPECT_EQ(refusal(setattr_mode(0030000u | 0644)), EINVAL) << "a setattr mode of no type";
}

TEST(RecordPolicy, ModeBitsOutside07777AreMalformed) {
  EXPECT_EQ(refusal(created(Op::create, S_IFREG | 0200000)), EINVAL);
  EXPECT_EQ(refusal(created(Op::mkdir, 0x80000000u | 0755)), EINVAL);
  EXPECT_EQ(refusal(setattr_mode(0100000000u | 0644)), EINVAL);
  EXPECT_EQ(refusal(setattr_mode(0xffffffffu)), EINVAL);
}

TEST(RecordPolicy, DeviceNumbersOnAnythingButDevicesAreMalformed) {
  for (uint32_t mode : {S_IFREG | 0644u, S_IFIFO | 0644u, S_IFSOCK | 0644u}) {
    Record r = created(Op::create, mode);
    r.rdev = makedev(8, 0);
    EXPECT_EQ(refusal(r), EINVAL) << std::oct << mode;
  }
  Record d = created(Op::mkdir, S_IFDIR | 0755);
  d.rdev = 1;
  EXPECT_EQ(refusal(d), EINVAL);
  Record l = created(Op::symlink, S_IFLNK | 0777);
  l.rdev = 1;
  EXPECT_EQ(refusal(l), EINVAL);
}

TEST(RecordPolicy, OwnerMinusOneAndMissingFileIdsAreMalformed) {
  Record r = created(Op::create, S_IFREG | 0644);
  r.uid = UINT32_MAX;
  EXPECT_EQ(refusal(r), EINVAL) << "chown(-1) would leave the entry ours";
  r = created(Op::mkdir, S_IFDIR | 0755);
  r.gid = UINT32_MAX;
  EXPECT_EQ(refusal(r), EINVAL);
  Record s = setattr_mode(0644);
  s.attr_valid = kAttrUid;
  s.uid = UINT32_MAX;
  EXPECT_EQ(refusal(s), EINVAL);
  r = created(Op::create, S_IFREG | 0644);
  r.fid = kInvalidFileId;
  EXPECT_EQ(refusal(r), EINVAL);
  r.fid = kRootFileId;
  EXPECT_EQ(refusal(r), EINVAL) << "a second entry with the root's id";
}

TEST(RecordPolicy, SymlinkTargetsMustBeNonEmptyShorterThanPathMaxAndWithoutNul) {
  const std::string long_target(kMaxPathBytes, 'a');
  const std::string nul_target("a\0b", 3);
  for (const std::string* t : {&long_target, &nul_target}) {
    Record r = created(Op::symlink, S_IFLNK | 0777);
    r.data = *t;
    EXPECT_EQ(refusal(r), EINVAL);
  }
  Record empty = created(Op::symlink, 0);
  empty.data = "";
  EXPECT_EQ(refusal(empty), EINVAL);
}

TEST(RecordPolicy, XattrNamesOutsideTheKeptNamespacesAreRefused) {
  for (Op op : {Op::setxattr, Op::removexattr}) {
    SCOPED_TRACE(op_name(op));
    EXPECT_EQ(refusal(xattr(op, "trusted.blockrepl.fid")), EPERM) << "the node's own";
    EXPECT_EQ(refusal(xattr(op, "trusted.blockrepl.other")), EPERM);
    for (const char* n : {"foo.bar", "system.sockprotoname", "system.nfs4_acl", "system.posix_acl_accessX", "user"})
      EXPECT_EQ(refusal(xattr(op, n)), EOPNOTSUPP) << n;
    EXPECT_EQ(refusal(xattr(op, "")), EINVAL);
    EXPECT_EQ(refusal(xattr(op, "user." + std::string(251, 'x'))), EINVAL) << "a name over 255 bytes";
    EXPECT_EQ(refusal(xattr(op, std::string("user.a\0b", 8))), EINVAL);
  }
  const std::string big(kMaxXattrValueBytes + 1, 'v');
  EXPECT_EQ(refusal(xattr(Op::setxattr, "user.big", big)), EINVAL);
  Record f = xattr(Op::setxattr, "user.x");
  f.flags = 4;
  EXPECT_EQ(refusal(f), EINVAL) << "unknown setxattr flags";
}

TEST(RecordPolicy, SizesAndBitsBeyondTheLimitsAreMalformed) {
  Record w;
  w.op = Op::write;
  w.fid = kFile;
  w.data = "x";
  w.offset = INT64_MAX;
  EXPECT_EQ(refusal(w), EINVAL) << "past the largest offset";
  Record t;
  t.op = Op::truncate;
  t.fid = kFile;
  t.offset = uint64_t{1} << 63;
  EXPECT_EQ(refusal(t), EINVAL);
  Record fa;
  fa.op = Op::fallocate;
  fa.fid = kFile;
  fa.flags = FALLOC_FL_NO_HIDE_STALE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  EXPECT_EQ(refusal(fa), EINVAL);
  Record mv;
  mv.op = Op::rename;
  mv.parent = mv.parent2 = kRootFileId;
  mv.name = "a";
  mv.name2 = "b";
  mv.flags = 1u << 7;
  EXPECT_EQ(refusal(mv), EINVAL);
  Record sa = setattr_mode(0644);
  sa.attr_valid |= 1u << 20;
  EXPECT_EQ(refusal(sa), EINVAL);
  Record bad;
  bad.op = static_cast<Op>(200);
  EXPECT_EQ(refusal(bad), EINVAL);
}

// ---- what a trusted master may send --------------------------------------------------------

TEST(RecordPolicy, EveryFileTypeSetIdBitsDevicesAndAnyOwnerAreAllowed) {
  for (uint32_t mode : {S_IFREG | 04755u, S_IFREG | 02755u, S_IFIFO | 0600u, S_IFSOCK | 0755u, S_IFREG | 07777u})
    EXPECT_EQ(check_record(created(Op::create, mode)), 0) << std::oct << mode;
  Record blk = created(Op::create, S_IFBLK | 0666);
  blk.rdev = makedev(254, 0);
  blk.uid = 1000;
  EXPECT_EQ(check_record(blk), 0);
  Record chr = created(Op::create, S_IFCHR | 0666);
  chr.rdev = makedev(1, 3);
  EXPECT_EQ(check_record(chr), 0);
  EXPECT_EQ(check_record(created(Op::mkdir, S_IFDIR | 01777)), 0);
  EXPECT_EQ(check_record(created(Op::mkdir, 0755)), 0) << "mkdir's type may be left out";
  EXPECT_EQ(check_record(created(Op::symlink, 0)), 0) << "symlink's type may be left out";
  Record abs_link = created(Op::symlink, S_IFLNK | 0777);
  abs_link.data = "/etc";
  EXPECT_EQ(check_record(abs_link), 0) << "a symlink's target is data: the Store never follows it";
  EXPECT_EQ(check_record(setattr_mode(04755)), 0);
  EXPECT_EQ(check_record(setattr_mode(S_IFDIR | 0777)), 0) << "FUSE's setattr mode carries the type";
}

TEST(RecordPolicy, KeptXattrNamespacesAreAllowed) {
  for (const char* n : {"user.x", "trusted.overlay.opaque", "trusted.x", "security.capability", "security.selinux",
                        "system.posix_acl_access", "system.posix_acl_default"}) {
    EXPECT_EQ(check_record(xattr(Op::setxattr, n)), 0) << n;
    EXPECT_EQ(check_record(xattr(Op::removexattr, n)), 0) << n;
  }
  Record full = xattr(Op::setxattr, "user.full", std::string(kMaxXattrValueBytes, 'v'));
  std::string value(kMaxXattrValueBytes, 'v');
  full.data = value;
  full.flags = XATTR_CREATE;
  EXPECT_EQ(check_record(full), 0);
}

TEST(RecordPolicy, RenameWhiteoutAndDataRecordsAsTheMasterMakesThemAreAllowed) {
  Record mv;
  mv.op = Op::rename;
  mv.parent = mv.parent2 = kRootFileId;
  mv.name = "a";
  mv.name2 = "b";
  mv.flags = RENAME_WHITEOUT;
  mv.whiteout_fid = kNew;
  EXPECT_EQ(check_record(mv), 0);
  Record fa;
  fa.op = Op::fallocate;
  fa.fid = kFile;
  fa.flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
  fa.offset = 4096;
  fa.length = 4096;
  EXPECT_EQ(check_record(fa), 0);
}

// ---- through the Store ---------------------------------------------------------------------

struct PolicyVolume : HashedVolume {
  bool exists(const std::string& rel) const {
    struct stat st;
    return lstat(path(rel).c_str(), &st) == 0;
  }
  struct stat stat_of(const std::string& rel) const {
    struct stat st{};
    EXPECT_EQ(lstat(path(rel).c_str(), &st), 0) << rel << ": " << strerror(errno);
    return st;
  }
  bool can_mknod() {
    const std::string probe = path("probe-mknod");
    const bool ok = mknod(probe.c_str(), S_IFCHR | 0600, makedev(1, 3)) == 0;
    unlink(probe.c_str());
    return ok;
  }
};

TEST(RecordPolicyStore, RefusedRecordsLeaveNothingBehind) {
  PolicyVolume v;
  Record fifo_rdev = created(Op::create, S_IFIFO | 0600, "fifo");
  fifo_rdev.rdev = makedev(8, 0);
  EXPECT_EQ(v.apply(fifo_rdev), EINVAL);
  EXPECT_EQ(v.apply(created(Op::create, S_IFREG | 0200644, "wide")), EINVAL);
  EXPECT_EQ(v.apply(created(Op::create, 0030644, "notype")), EINVAL);
  Record nobody_owner = created(Op::mkdir, 0755, "d");
  nobody_owner.uid = UINT32_MAX;
  EXPECT_EQ(v.apply(nobody_owner), EINVAL);
  for (const char* n : {"fifo", "wide", "notype", "d"}) EXPECT_FALSE(v.exists(n)) << n;
  EXPECT_EQ(v.store->files().path(kNew).get(), -1) << "a refused record taught the store its id";

  const FileId f = v.create("f");
  Record x = xattr(Op::setxattr, "system.sockprotoname");
  x.fid = f;
  EXPECT_EQ(v.apply(x), EOPNOTSUPP);
  x.name = "trusted.blockrepl.fid";
  x.data = "12345678";
  EXPECT_EQ(v.apply(x), EPERM);
  EXPECT_EQ(read_file_id(v.root_fd, "f").value_or(kInvalidFileId), f) << "the file id was replaced";
  Record chmod_wide = setattr_mode(0100000000u | 0777);
  chmod_wide.fid = f;
  EXPECT_EQ(v.apply(chmod_wide), EINVAL);
  EXPECT_EQ(v.stat_of("f").st_mode & 07777, 0644u);
}

// A record replayed after a crash may find its entry created but untagged: that path finishes
// the job without apply(), and must still be judged first.
TEST(RecordPolicyStore, ReplayedRecordsAreJudgedBeforeTheHalfAppliedPath) {
  PolicyVolume v;
  const std::string p = v.path("half");
  ASSERT_EQ(mkfifo(p.c_str(), 0600), 0);
  Record r = created(Op::create, S_IFIFO | 0600 | 0200000, "half");
  r.lsn = 7;
  EXPECT_EQ(v.store->apply_replayed(r), EINVAL);
  EXPECT_FALSE(read_file_id(v.root_fd, "half")) << "the half-applied path tagged a refused record's entry";
  r.mode = S_IFIFO | 04600;
  r.uid = 1234;
  EXPECT_EQ(v.store->apply_replayed(r), 0);
  EXPECT_EQ(read_file_id(v.root_fd, "half").value_or(kInvalidFileId), kNew);
  EXPECT_EQ(v.stat_of("half").st_uid, 1234u);
}

// What the fake master sent, as a trusted master may: applied faithfully.
TEST(RecordPolicyStore, ATrustedMastersDevicesSetIdFilesCapabilitiesAndOwnersAreApplied) {
  PolicyVolume v;
  if (!v.can_mknod()) GTEST_SKIP() << "no CAP_MKNOD here";
  Record blk = created(Op::create, S_IFBLK | 0666, "blk");
  blk.rdev = makedev(254, 0);
  blk.uid = blk.gid = 1000;
  ASSERT_EQ(v.apply(blk), 0);
  struct stat st = v.stat_of("blk");
  EXPECT_TRUE(S_ISBLK(st.st_mode));
  EXPECT_EQ(st.st_rdev, makedev(254, 0));
  EXPECT_EQ(st.st_mode & 07777, 0666u);
  EXPECT_EQ(st.st_uid, 1000u);

  Record suid = created(Op::create, S_IFREG | 04755, "suid");
  suid.fid = kFile;
  ASSERT_EQ(v.apply(suid), 0);
  EXPECT_EQ(v.stat_of("suid").st_mode & 07777, 04755u);
  // security.capability with cap_setuid, as setcap writes it (VFS_CAP_REVISION_2).
  const std::string cap("\x01\x00\x00\x02\x80\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00", 20);
  ASSERT_EQ(v.apply(xattr(Op::setxattr, "security.capability", cap)), 0);
  ASSERT_EQ(v.apply(xattr(Op::setxattr, "trusted.app", "t")), 0);
  char buf[64];
  EXPECT_EQ(getxattr(v.path("suid").c_str(), "security.capability", buf, sizeof buf), 20);
  EXPECT_EQ(getxattr(v.path("suid").c_str(), "trusted.app", buf, sizeof buf), 1);

  Record root_mode = setattr_mode(0777);
  root_mode.fid = kRootFileId;
  ASSERT_EQ(v.apply(root_mode), 0) << "the volume root's mode is the master's";
  EXPECT_EQ(v.stat_of("").st_mode & 07777, 0777u);
}

// The full copy turns each entry into records: its type, mode and device number meet the same
// policy, with the copy's error naming the path.
TEST(RecordPolicyStore, FullCopyEntriesPassTheSamePolicy) {
  PolicyVolume v;
  CopyReceiver rx(*v.store);
  auto entry = [&](const std::string& path, uint32_t mode, uint64_t rdev, FileId fid) {
    capnp::MallocMessageBuilder mb;
    auto e = mb.initRoot<wire::Message>().initCopyEntry();
    e.setPath(kj::arrayPtr(reinterpret_cast<const kj::byte*>(path.data()), path.size()));
    e.setFid(fid);
    e.setMode(mode);
    e.setRdev(rdev);
    rx.apply(e.asReader());
  };
  try {
    entry("fifo", S_IFIFO | 0600, makedev(8, 0), kNew);
    ADD_FAILURE() << "a fifo with a device number was copied";
  } catch (const Error& e) {
    EXPECT_EQ(e.errno_value(), EINVAL);
    EXPECT_NE(std::string(e.what()).find("fifo"), std::string::npos) << e.what();
  }
  EXPECT_THROW(entry("odd", 0030644, 0, kNew), Error) << "an entry of no type";
  EXPECT_THROW(entry("wide", S_IFREG | 0200644, 0, kNew), Error);
  EXPECT_FALSE(v.exists("fifo"));
  EXPECT_FALSE(v.exists("odd"));
  EXPECT_FALSE(v.exists("wide"));
  entry("suid", S_IFREG | 04755, 0, kFile);
  EXPECT_EQ(v.stat_of("suid").st_mode & 07777, 04755u);
}

}  // namespace
}  // namespace blockrepl
