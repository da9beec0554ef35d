// Running `mount` in the background: the parent returns only once the child reports that the
// mount is ready (exit 0) or failed (its one-line error, exit 1). Also tells systemd (Type=notify)
// through libsystemd's sd_notify, which is a no-op when NOTIFY_SOCKET is not set.
#pragma once
#include <string>

namespace blockrepl::cli {

class Readiness {
 public:
  Readiness() = default;
  Readiness(const Readiness&) = delete;
  Readiness& operator=(const Readiness&) = delete;
  // Once ready was sent, tells systemd the daemon is stopping: the mount command's scope ends
  // only after the unmount and the final saves, so this is the last thing the service says.
  ~Readiness();
  // Forks unless foreground. Returns in the child (or in the only process when foreground);
  // the parent waits for the child's report and exits with it.
  void start(bool foreground);
  // The child is serving: tell systemd READY=1, release the waiting parent; stdio is detached
  // in the background.
  void ready(const std::string& log_file);
  // The child could not start: the parent prints `message` and exits 1.
  void failed(const std::string& message);
  bool in_background() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
  bool told_systemd_ready_ = false;
};

}  // namespace blockrepl::cli
