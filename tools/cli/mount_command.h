// `blockrepl mount` and `blockrepl umount`.
#pragma once
#include <string>

namespace blockrepl::cli {

struct MountOptions {
  std::string data;
  std::string mountpoint;
  bool foreground = false;
  int verbose = 0;
  bool fuse_debug = false;
  std::string log_file;
};

int run_mount(const MountOptions& opts);
int run_umount(const std::string& mountpoint, bool lazy);

}  // namespace blockrepl::cli
