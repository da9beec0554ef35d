// `blockrepl mount`, `blockrepl umount` and `blockrepl status`.
#pragma once
#include <string>

#include "blockrepl/replica.h"
#include "tools/cli/security_options.h"

namespace blockrepl::cli {

struct MountOptions {
  std::string data;
  std::string mountpoint;
  bool foreground = false;
  int verbose = 0;
  bool fuse_debug = false;
  std::string log_file;
  // Replication: everything but data_path, which is `data` once checked, and security, which
  // comes from `security` once its files are read.
  ReplicaConfig replica;
  SecurityOptions security;
  bool trace = false;  // barrier stage histograms (blockrepl/trace.h)
};

int run_mount(const MountOptions& opts);
int run_umount(const std::string& mountpoint, bool lazy);
// verbosity: -1 quiet (errors only), 0 a summary line, 1 info, 2 debug.
// discard_my_data: DIR may be replaced (files that are not a volume, a diverged volume).
// compress: ask the master to compress the records it streams (off: do not ask).
int run_pull(const std::string& address, const std::string& dir, int verbosity, bool discard_my_data,
             const SecurityOptions& security, const Compression& compress = {});
int run_promote(const std::string& mountpoint);
int run_verify(const std::string& mountpoint, bool deep);
int run_status(const std::string& mountpoint, bool json);

}  // namespace blockrepl::cli
