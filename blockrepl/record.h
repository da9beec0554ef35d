// A record is one change to the volume. The master makes records from file-system operations,
// applies them with the Store and publishes them; a slave receives the same records and applies
// them with the same Store. Records name files by a stable FileId, never by FUSE inode.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>

namespace blockrepl {

using Lsn = uint64_t;
using FileId = uint64_t;

constexpr FileId kInvalidFileId = 0;
constexpr FileId kRootFileId = 1;  // the volume's root directory

enum class Op : uint8_t {
  write = 1,       // fid, offset, data
  truncate,        // fid, size
  fallocate,       // fid, mode, offset, length
  setattr,         // fid, attr_valid mask with mode/uid/gid/atime/mtime
  create,          // parent, name, new fid, mode (any type but dir/symlink), rdev, uid, gid
  mkdir,           // parent, name, new fid, mode, uid, gid
  symlink,         // parent, name, new fid, data = link target, uid, gid
  link,            // fid (existing), parent, name
  unlink,          // parent, name, fid of the victim
  rmdir,           // parent, name, fid of the victim
  rename,          // fid (the renamed file), parent, name -> parent2, name2, flags (RENAME_NOREPLACE,
                   // RENAME_EXCHANGE, RENAME_WHITEOUT). With RENAME_WHITEOUT the rename also creates
                   // the whiteout (a character device 0/0, mode 0) at parent/name, atomically, as
                   // one record: whiteout_fid is its new file id, uid/gid its owner, and
                   // kAttrStampMtime/mtime its mtime, as for a created entry.
  setxattr,        // fid, name, data = value, flags
  removexattr,     // fid, name
  fsync,           // fid (kInvalidFileId = whole volume), flags & kDataSync for fdatasync
  release,         // fid: an unlinked file's last handle closed on the master; replicas let go of
                   // it (until then they keep it open, for writes through handles still open)
};

const char* op_name(Op op);

// attr_valid bits for Op::setattr (a subset of what a FUSE setattr may change).
enum AttrBits : uint32_t {
  kAttrMode = 1u << 0,
  kAttrUid = 1u << 1,
  kAttrGid = 1u << 2,
  kAttrAtime = 1u << 3,
  kAttrMtime = 1u << 4,
  kAttrAtimeNow = 1u << 5,
  kAttrMtimeNow = 1u << 6,
  // On write/truncate/fallocate/create/mkdir/symlink/mknod: after applying, give the file the
  // master's resulting mtime (`mtime`), so replicas match the master's metadata exactly.
  kAttrStampMtime = 1u << 7,
  // On create/mkdir/symlink/link/unlink/rmdir/rename: after applying, give the parent directory
  // the master's resulting mtime (`dir_mtime`) and, for a rename, the target's directory too
  // (`dir2_mtime`), so directories' times match the master's exactly.
  kAttrStampDirs = 1u << 8,
};

constexpr uint32_t kDataSync = 1;  // Op::fsync flag: fdatasync rather than fsync

struct Record {
  Lsn lsn = 0;
  Op op = Op::write;
  FileId fid = kInvalidFileId;      // the file the record changes (or creates)
  FileId parent = kInvalidFileId;   // directory for namespace operations
  FileId parent2 = kInvalidFileId;  // rename target directory
  std::string name;                 // entry name, or xattr name
  std::string name2;                // rename target name
  uint64_t offset = 0;              // write/fallocate offset; truncate size
  uint64_t length = 0;              // fallocate length
  uint32_t mode = 0;                // file mode (type bits included for create)
  uint32_t flags = 0;               // rename flags, fallocate mode, xattr flags, fsync flags
  uint32_t uid = 0, gid = 0;
  uint32_t attr_valid = 0;          // AttrBits for setattr
  uint64_t rdev = 0;
  timespec atime{0, 0}, mtime{0, 0};
  timespec dir_mtime{0, 0}, dir2_mtime{0, 0};  // kAttrStampDirs
  FileId whiteout_fid = kInvalidFileId;  // rename with RENAME_WHITEOUT: the whiteout's new id
  // Payload: write data, symlink target or xattr value. A view so the master's write path
  // does not copy; a record that must outlive its source owns its bytes in `owned`.
  std::string_view data;
  std::string owned;

  Record() = default;
  // A copy or move of a record that owns its bytes must point at its own copy of them.
  Record(const Record& o) : Record() { *this = o; }
  Record(Record&& o) noexcept : Record() { *this = std::move(o); }
  Record& operator=(const Record& o) {
    if (this == &o) return *this;
    copy_fields(o);
    owned = o.owned;
    data = o.owns_data() ? std::string_view(owned) : o.data;
    return *this;
  }
  Record& operator=(Record&& o) noexcept {
    if (this == &o) return *this;
    const bool owns = o.owns_data();
    copy_fields(o);
    owned = std::move(o.owned);
    data = owns ? std::string_view(owned) : o.data;
    o.data = {};
    return *this;
  }
  bool owns_data() const { return !owned.empty() && data.data() == owned.data(); }

  void own_data() {
    if (!owns_data()) {
      owned.assign(data.data(), data.size());
      data = owned;
    }
  }
  // Whether applying this record makes a barrier (a durability point).
  bool is_barrier() const { return op == Op::fsync; }
  std::string describe() const;  // "lsn 42 write fid 0x.. off 4096 len 4096" for logs and errors

 private:
  void copy_fields(const Record& o) {
    lsn = o.lsn; op = o.op; fid = o.fid; parent = o.parent; parent2 = o.parent2;
    name = o.name; name2 = o.name2; offset = o.offset; length = o.length; mode = o.mode;
    flags = o.flags; uid = o.uid; gid = o.gid; attr_valid = o.attr_valid; rdev = o.rdev;
    atime = o.atime; mtime = o.mtime; dir_mtime = o.dir_mtime; dir2_mtime = o.dir2_mtime;
    whiteout_fid = o.whiteout_fid;
  }
};

}  // namespace blockrepl
