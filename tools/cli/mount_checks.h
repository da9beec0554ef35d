// Checks on the paths given to `mount`, done before anything is written, each failing with one
// clear sentence.
#pragma once
#include <optional>
#include <string>

namespace blockrepl::cli {

struct MountPaths {
  std::string data_abs, mountpoint_abs;  // canonical
  // The mount point holds the dead mount of a daemon of this data directory that crashed:
  // detach_dead_mount() it before mounting.
  bool replace_dead_mount = false;
};

// Returns an error sentence, or nullopt when the data directory and mount point are usable:
// they exist, are apart, and neither is, contains or lies inside another running daemon's data
// directory or mount point. On success fills *out. Writes nothing.
std::optional<std::string> check_mount_paths(const std::string& data, const std::string& mountpoint, MountPaths* out);
// The same overlap rule for a directory that is about to be written without a mount (pull).
std::optional<std::string> check_data_dir_overlaps(const std::string& data_abs);

// A replica's data directory must be empty (a file system's lost+found aside), or hold a
// blockrepl volume (whose master then checks that it is of its cluster): its first attach
// replaces whatever else is there. Returns the error sentence for anything else; `who` ("slave",
// "pull") is what would replace it. Pass --discard-my-data to skip this check. Writes nothing.
std::optional<std::string> check_replica_data_dir(const std::string& data_abs, const std::string& who);

// A replica's backing directory holds set-id files, file capabilities and device nodes as root
// on its master made them; only the mount is nosuid,nodev, not the backing file system. So no
// unprivileged local user may reach it: at least one ancestor of `data_abs` (canonical; the
// directory itself has the volume root's mode, replicated from the master) must be root-only:
// owned by root, no execute bit for others, none for its group unless that is gid 0, and no
// POSIX ACL (system.posix_acl_access) that could grant traversal. Returns the error sentence
// otherwise, for a slave and for pull (masters are not checked). Writes nothing.
std::optional<std::string> check_backing_dir_private(const std::string& data_abs);

// Removes (lazily) the dead mount found by check_mount_paths; throws Error.
void detach_dead_mount(const std::string& mountpoint_abs);

// For a blockrepl mount: the backing directory from its fsname ("blockrepl:/srv/db"); nullopt if
// `path` is not a blockrepl mount.
std::optional<std::string> blockrepl_data_dir_of(const std::string& mountpoint_abs);

// One daemon (or pull) per data directory: takes an exclusive lock on DATA/.blockrepl/lock held
// until the returned descriptor is closed; throws Error naming the daemon that holds it.
int lock_data_dir(const std::string& data_abs);

inline constexpr const char kPidFile[] = "daemon.pid";

}  // namespace blockrepl::cli
