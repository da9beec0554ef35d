// The namespace tree above the per-file block hash trees (DESIGN.md section 3): every directory
// entry gets a hash over its name, file id, type, owner, mode, size, mtime, link target, xattrs
// and content (a file's block-tree root, a directory's listing hash), and every directory a
// hash over its sorted entries. Two volumes with equal root hashes are equal; the Merkle diff
// descends only into directories whose hashes differ.
//
// A snapshot is taken by walking the volume with stat calls only: file contents come from the
// HashIndex, which rereads nothing but blocks changed since it last hashed them.
#pragma once
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "blockrepl/hash_index.h"
#include "blockrepl/wire.h"

namespace blockrepl {

struct NsEntryInfo {
  std::string name;
  FileId fid = kInvalidFileId;
  uint32_t mode = 0, uid = 0, gid = 0;
  uint64_t size = 0, rdev = 0;
  timespec mtime{0, 0};
  std::string link_target;
  std::vector<std::pair<std::string, std::string>> xattrs;  // sorted by name, reserved ones left out
  Hash128 content;  // regular file: block-tree root; directory: listing hash; else zero
  Hash128 hash;     // of everything above (see entry_hash)

  bool is_dir() const { return S_ISDIR(mode); }
  bool is_reg() const { return S_ISREG(mode); }
};

// The hash of an entry's fields. Directories' sizes are left out: they depend on each file
// system's history. Their mtimes are in: replicas copy them from the master's records.
Hash128 entry_hash(const NsEntryInfo& e);

struct DirInfo {
  FileId fid = kInvalidFileId;
  timespec mtime{0, 0};  // the directory's own (the root has no entry to carry it)
  std::vector<NsEntryInfo> entries;  // sorted by name
  Hash128 listing_hash;
  const NsEntryInfo* find(const std::string& name) const;
};

class NamespaceSnapshot {
 public:
  // Walks the volume at root_fd (skipping the metadata folder). Entries without a file id get
  // one when assign_ids (a master), else are skipped. deep: rehash every file's data first.
  static NamespaceSnapshot take(int root_fd, HashIndex& hashes, bool assign_ids, bool deep = false);

  // "" is the root; nullptr if the snapshot holds no directory there.
  const DirInfo* dir(const std::string& path) const;
  struct Place {
    std::string path;  // of the first name seen for the file id
    const NsEntryInfo* entry = nullptr;
  };
  const Place* find(FileId fid) const;
  Hash128 root_hash() const;
  size_t files() const { return by_fid_.size(); }  // entries with a file id, directories included
  size_t dirs() const { return dirs_.size(); }       // the root included

 private:
  Hash128 walk(int dirfd, const std::string& rel, FileId fid, HashIndex& hashes, bool assign_ids, bool deep);
  std::map<std::string, DirInfo> dirs_;
  std::unordered_map<FileId, Place> by_fid_;
};

std::string join_path(const std::string& dir, const std::string& name);

void to_wire(const NsEntryInfo& e, wire::NsEntry::Builder out);
// Validates what a peer controls (one path component as name, a hash of 16 bytes); throws Error.
// at_volume_root: the entry is listed in the volume's root directory, where the metadata
// folder's name is refused; below the root it is an ordinary name (the mount and the Store allow
// it there, and a master lists it).
NsEntryInfo from_wire(wire::NsEntry::Reader in, bool at_volume_root = true);
// 16 bytes <-> Hash128.
kj::ArrayPtr<const kj::byte> hash_bytes_of(const Hash128& h);
Hash128 hash_from(capnp::Data::Reader d);

// Opens directory `rel` under root_fd as O_PATH, resolved beneath root_fd without following
// any symlink (open_beneath in fsutil.h); -1 with errno set if it does not exist, is not a
// directory or a component is a symlink (ELOOP). A path from a peer with "..", empty or
// absolute components, or leading into the metadata folder is refused with EINVAL.
// valid_relative_path is that check: each component valid_path_component, the first not the
// metadata folder.
int open_dir_path(int root_fd, const std::string& rel);
bool valid_relative_path(const std::string& rel);

}  // namespace blockrepl
