// `blockrepl mount`, `blockrepl umount` and `blockrepl status`.
#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

namespace blockrepl::cli {

struct MountOptions {
  std::string data;
  std::string mountpoint;
  bool foreground = false;
  int verbose = 0;
  bool fuse_debug = false;
  std::string log_file;
  // Replication.
  std::string listen;       // serve slaves here
  std::string master;       // be a slave of this master
  std::string ack = "sync";
  std::string ack_timeout = "5s";
  unsigned min_sync_slaves = 0;
  std::string journal_size = "256M";
  unsigned fd_budget = 1024;  // the file registry's descriptor cache
  bool no_fsync = false;
  bool exit_on_disconnect = false;
  bool discard_my_data = false;
  std::optional<uint32_t> block_size;  // not given: the volume's (4096 for a new one)
};

int run_mount(const MountOptions& opts);
int run_umount(const std::string& mountpoint, bool lazy);
// verbosity: -1 quiet (errors only), 0 a summary line, 1 info, 2 debug.
// discard_my_data: DIR may be replaced (files that are not a volume, a diverged volume).
int run_pull(const std::string& address, const std::string& dir, int verbosity, bool discard_my_data);
int run_promote(const std::string& mountpoint);
int run_verify(const std::string& mountpoint, bool deep);
int run_status(const std::string& mountpoint, bool json);

// "5s", "500ms", "2.5" (seconds) -> milliseconds; false on a bad value.
bool parse_duration(const std::string& s, std::chrono::milliseconds* out);
// "256M", "1G", "4096", "0" -> bytes; false on a bad value.
bool parse_size(const std::string& s, uint64_t* out);

}  // namespace blockrepl::cli
