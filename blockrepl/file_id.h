// Stable file ids. Every file and directory of a volume carries its FileId in an extended
// attribute of the backing file, so the id follows the inode through renames and hard links,
// survives restarts, and is the same on the master and every slave (the records carry it).
#pragma once
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "blockrepl/record.h"

namespace blockrepl {

// trusted.* works on every inode type (symlinks too) and is invisible to unprivileged users.
inline constexpr const char kFileIdXattr[] = "trusted.blockrepl.fid";
// Names in this namespace belong to blockrepl and are hidden from the mount.
inline constexpr const char kReservedXattrPrefix[] = "trusted.blockrepl.";

// "/proc/self/fd/<dirfd>/<name>" (or "/proc/self/fd/<fd>" when name is empty): a path that
// reaches an inode held by an fd, usable by the *xattr and *at calls that lack an fd form.
std::string fd_path(int fd, const char* name = nullptr);
// The extended attributes of `path` (not following a symlink), sorted by name, without ours.
std::vector<std::pair<std::string, std::string>> list_xattrs(const std::string& path);

// The id of `name` in directory `dirfd` (name may be "" for dirfd itself); nullopt if none.
std::optional<FileId> read_file_id(int dirfd, const char* name);
// Returns 0 or an errno.
int write_file_id(int dirfd, const char* name, FileId fid);

// A fresh random id (never kInvalidFileId or kRootFileId).
FileId new_file_id();

// The one place where a file that has no id gets one (a master meeting a file put into the
// backing directory behind its back): atomically, so that two threads meeting the file at once
// (a lookup racing a full copy's walk) agree on one id. Returns the id the file has now, or
// kInvalidFileId with *err set.
FileId assign_file_id(int dirfd, const char* name, int* err);

}  // namespace blockrepl
