// How a slave's applier tells the FUSE layer what changed under it, so that readers of the mount
// see replicated changes (the kernel's cached pages, attributes and names are dropped). Its own
// header so that the FUSE layer need not know the follower.
#pragma once
#include "blockrepl/record.h"

namespace blockrepl {

class CacheInvalidator {
 public:
  virtual ~CacheInvalidator() = default;
  // Told about every applied record (from the applier thread, never from inside a file-system
  // operation: invalidating from there deadlocks).
  virtual void invalidate(const Record& rec) = 0;
  // Everything may have changed (a Merkle re-attach replaced files and names).
  virtual void invalidate_all() = 0;
  // Around a stage switch, which rewrites many files and names in several passes: operations
  // on the mount wait (hold_readers returns once none is in flight), so that no request sees the
  // backing directory half switched. Then invalidate_all.
  virtual void hold_readers() {}
  virtual void release_readers() {}
};

}  // namespace blockrepl
