// Checks on the paths given to `mount`, done before anything is written, each failing with one
// clear sentence.
#pragma once
#include <optional>
#include <string>

namespace blockrepl::cli {

// Returns an error sentence, or nullopt when the data directory and mount point are usable.
// On success sets the canonical (absolute) paths.
std::optional<std::string> check_mount_paths(const std::string& data, const std::string& mountpoint,
                                             std::string* data_abs, std::string* mountpoint_abs);

// Raises the kernel's dirty-page limits for the FUSE mount at `mountpoint_abs` (best effort).
void lift_fuse_writeback_limit(const std::string& mountpoint_abs);

// Whether `path` (canonical) is a mount point according to /proc/self/mountinfo.
bool is_mount_point(const std::string& path);
// For a blockrepl mount: the backing directory from its fsname ("blockrepl:/srv/db"); nullopt if
// `path` is not a blockrepl mount.
std::optional<std::string> blockrepl_data_dir_of(const std::string& mountpoint_abs);

// One daemon (or pull) per data directory: takes an exclusive lock on DATA/.blockrepl/lock held
// until the returned descriptor is closed; throws Error naming the daemon that holds it.
int lock_data_dir(const std::string& data_abs);

inline constexpr const char kPidFile[] = "daemon.pid";

}  // namespace blockrepl::cli
