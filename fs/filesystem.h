// The FUSE low-level file system: passes every operation through to the backing directory and
// turns each change into a Record that the Node applies and publishes. No replication logic here.
#pragma once
#include <functional>
#include <string>

#include "blockrepl/cache_invalidator.h"
#include "blockrepl/node.h"

struct fuse_session;

namespace blockrepl::fs {

struct MountConfig {
  std::string mountpoint;
  // The one question the mount asks the replica before every change: false refuses it with
  // EROFS (a slave, until promoted). Asked at mount too: a volume that is not writable then is
  // mounted without the writeback cache, and stays so after a promotion.
  std::function<bool()> writable = [] { return true; };
  bool debug = false;          // libfuse's request trace
  double timeout = 86400.0;    // entry/attr cache timeout (seconds); only we change the backing dir
  unsigned max_threads = 16;
};

class Filesystem {
 public:
  Filesystem(Node& node, MountConfig cfg);
  ~Filesystem();
  Filesystem(const Filesystem&) = delete;
  Filesystem& operator=(const Filesystem&) = delete;

  // Mounts; throws Error with a clear message if that fails.
  void mount();
  // Serves requests until unmounted or signalled (SIGINT/SIGTERM/SIGHUP). Returns 0 on a clean exit.
  int serve();
  // Asks serve() to return (from any thread).
  void stop();

  // Drops what the kernel caches for what a record changed (a slave's applier calls it after
  // applying each record, never from inside a file-system operation).
  CacheInvalidator* invalidator();

  fuse_session* session() { return se_; }

  struct Impl;

 private:
  Node& node_;
  MountConfig cfg_;
  fuse_session* se_ = nullptr;
  Impl* impl_ = nullptr;
  bool mounted_ = false;
};

}  // namespace blockrepl::fs
