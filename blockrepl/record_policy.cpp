#include "blockrepl/record_policy.h"

#include <cerrno>
#include <cstdint>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <sys/xattr.h>

#include "blockrepl/file_id.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/wire.h"

namespace blockrepl {

namespace {

// A refusal: the errno and why. `ok` is the verdict of an allowed record.
struct Verdict {
  int err = 0;
  const char* reason = "";
};
constexpr Verdict ok{};
Verdict malformed(const char* why) { return {EINVAL, why}; }

constexpr uint64_t kMaxOffset = INT64_MAX;   // what off_t holds
constexpr uint32_t kNoOwner = UINT32_MAX;    // (uid_t)-1: chown would leave the owner as it is
constexpr uint32_t kKnownAttrBits = kAttrMode | kAttrUid | kAttrGid | kAttrAtime | kAttrMtime | kAttrAtimeNow |
                                    kAttrMtimeNow | kAttrStampMtime | kAttrStampDirs;
constexpr uint32_t kKnownRenameFlags = RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT;
// FALLOC_FL_NO_HIDE_STALE is left out: no file system applies it, and it would expose old data.
constexpr uint32_t kKnownFallocateFlags = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_COLLAPSE_RANGE |
                                          FALLOC_FL_ZERO_RANGE | FALLOC_FL_INSERT_RANGE | FALLOC_FL_UNSHARE_RANGE;
constexpr uint32_t kKnownXattrFlags = XATTR_CREATE | XATTR_REPLACE;

bool is_file_type(uint32_t type) {
  switch (type) {
    case S_IFREG: case S_IFDIR: case S_IFLNK: case S_IFIFO: case S_IFSOCK: case S_IFCHR: case S_IFBLK:
      return true;
    default:
      return false;
  }
}

bool is_device(uint32_t mode) { return S_ISCHR(mode) || S_ISBLK(mode); }

// Mode bits a record may carry: permissions and set-id/sticky bits, plus a type (or none).
Verdict check_mode_bits(uint32_t mode) {
  if (mode & ~static_cast<uint32_t>(S_IFMT | 07777)) return malformed("mode bits outside 07777");
  const uint32_t type = mode & S_IFMT;
  if (type != 0 && !is_file_type(type)) return malformed("an unknown file type");
  return ok;
}

// The type a created entry may have: create makes what mknod makes, mkdir and symlink their own
// (the type bits may be left out for them: the operation says it).
Verdict check_created_type(const Record& rec) {
  const uint32_t type = rec.mode & S_IFMT;
  switch (rec.op) {
    case Op::mkdir:
      return type == 0 || type == S_IFDIR ? ok : malformed("mkdir of something not a directory");
    case Op::symlink:
      return type == 0 || type == S_IFLNK ? ok : malformed("symlink of something not a symlink");
    default:
      if (type == 0 || type == S_IFDIR || type == S_IFLNK) return malformed("create of no file type, a directory or a symlink");
      return ok;
  }
}

Verdict check_owner(uint32_t uid, uint32_t gid) {
  return uid == kNoOwner || gid == kNoOwner ? malformed("owner -1") : ok;
}

Verdict check_name(const std::string& name) {
  return valid_path_component(name) ? ok : malformed("a name that is not one path component");
}

// A created entry: create, mkdir, symlink.
Verdict check_created(const Record& rec) {
  if (Verdict v = check_name(rec.name); v.err) return v;
  if (rec.fid == kInvalidFileId || rec.fid == kRootFileId) return malformed("a new entry without a file id of its own");
  if (Verdict v = check_mode_bits(rec.mode); v.err) return v;
  if (Verdict v = check_created_type(rec); v.err) return v;
  if (rec.rdev != 0 && !(rec.op == Op::create && is_device(rec.mode))) return malformed("a device number on a non-device");
  if (Verdict v = check_owner(rec.uid, rec.gid); v.err) return v;
  if (rec.op == Op::symlink) {
    if (rec.data.empty() || rec.data.size() >= kMaxPathBytes || rec.data.find('\0') != std::string_view::npos)
      return malformed("a symlink target that is empty, has a NUL or is PATH_MAX long");
  }
  return ok;
}

Verdict check_setattr(const Record& rec) {
  if (rec.attr_valid & ~kKnownAttrBits) return malformed("unknown setattr bits");
  // A mode as FUSE gives it carries the entry's type; only the permission bits are applied.
  if (rec.attr_valid & kAttrMode)
    if (Verdict v = check_mode_bits(rec.mode); v.err) return v;
  if ((rec.attr_valid & kAttrUid) && rec.uid == kNoOwner) return malformed("owner -1");
  if ((rec.attr_valid & kAttrGid) && rec.gid == kNoOwner) return malformed("group -1");
  return ok;
}

Verdict check_rename(const Record& rec) {
  if (Verdict v = check_name(rec.name); v.err) return v;
  if (Verdict v = check_name(rec.name2); v.err) return v;
  if (rec.flags & ~kKnownRenameFlags) return malformed("unknown rename flags");
  if (rec.flags & RENAME_WHITEOUT) {
    if (rec.whiteout_fid == kRootFileId) return malformed("a whiteout with the volume root's file id");
    if (rec.whiteout_fid != kInvalidFileId)
      if (Verdict v = check_owner(rec.uid, rec.gid); v.err) return v;
  }
  return ok;
}

bool has_prefix(std::string_view s, std::string_view prefix) { return s.substr(0, prefix.size()) == prefix; }

// The xattr namespaces a volume keeps. The reserved prefix first: it lies inside trusted.*.
Verdict check_xattr_name(const std::string& name) {
  if (name.empty() || name.size() > kMaxNameBytes || name.find('\0') != std::string::npos)
    return malformed("an xattr name that is empty, has a NUL or is over 255 bytes");
  if (has_prefix(name, kReservedXattrPrefix)) return {EPERM, "an xattr of the node's own (trusted.blockrepl.*)"};
  for (std::string_view ns : {"user.", "trusted.", "security."})
    if (has_prefix(name, ns)) return ok;
  if (name == "system.posix_acl_access" || name == "system.posix_acl_default") return ok;
  return {EOPNOTSUPP, "an xattr outside user., trusted., security. and the POSIX ACLs"};
}

Verdict check_setxattr(const Record& rec) {
  if (Verdict v = check_xattr_name(rec.name); v.err) return v;
  if (rec.data.size() > kMaxXattrValueBytes) return malformed("an xattr value over 64 KiB");
  if (rec.flags & ~kKnownXattrFlags) return malformed("unknown setxattr flags");
  return ok;
}

Verdict check_data_range(uint64_t offset, uint64_t length) {
  if (offset > kMaxOffset || length > kMaxOffset - offset) return malformed("a range past the largest file offset");
  return ok;
}

Verdict check(const Record& rec) {
  switch (rec.op) {
    case Op::write:
      // A write's length is bounded where it is decoded (wire.h, kMaxRecordDataBytes): here
      // only where it lands matters, as local writes (a stage's zero fill) may be longer.
      return check_data_range(rec.offset, rec.data.size());
    case Op::truncate:
      return check_data_range(rec.offset, 0);
    case Op::fallocate:
      if (rec.flags & ~kKnownFallocateFlags) return malformed("unknown fallocate flags");
      return check_data_range(rec.offset, rec.length);
    case Op::setattr:
      return check_setattr(rec);
    case Op::create:
    case Op::mkdir:
    case Op::symlink:
      return check_created(rec);
    case Op::link:
    case Op::unlink:
    case Op::rmdir:
      return check_name(rec.name);
    case Op::rename:
      return check_rename(rec);
    case Op::setxattr:
      return check_setxattr(rec);
    case Op::removexattr:
      return check_xattr_name(rec.name);
    case Op::fsync:
    case Op::release:
      return ok;
  }
  return malformed("an unknown operation");
}

}  // namespace

int check_record(const Record& rec, std::string* reason) {
  const Verdict v = check(rec);
  if (v.err && reason) *reason = v.reason;
  return v.err;
}

}  // namespace blockrepl
