// Running `mount` in the background: the parent returns only once the child reports that the
// mount is ready (exit 0) or failed (its one-line error, exit 1). Also tells systemd (Type=notify).
#pragma once
#include <string>

namespace blockrepl::cli {

class Readiness {
 public:
  // Forks unless foreground. Returns in the child (or in the only process when foreground);
  // the parent waits for the child's report and exits with it.
  void start(bool foreground);
  // The child is serving: release the waiting parent; stdio is detached in the background.
  void ready(const std::string& log_file);
  // The child could not start: the parent prints `message` and exits 1.
  void failed(const std::string& message);
  bool in_background() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// Sends "READY=1" (or any state) to systemd when NOTIFY_SOCKET is set; a no-op otherwise.
void sd_notify_state(const std::string& state);

}  // namespace blockrepl::cli
