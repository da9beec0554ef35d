// The control socket of a running daemon: `blockrepl status` (and later promote, verify) ask the
// daemon behind a mount through it. One request line in, one response (JSON) out. The socket is
// abstract ("@blockrepl/<node id>"), so long data paths do not matter and nothing is left behind.
#pragma once
#include <atomic>
#include <functional>
#include <string>
#include <thread>

namespace blockrepl {

std::string control_socket_name(const std::string& node_id);

class ControlServer {
 public:
  using Handler = std::function<std::string(const std::string& request)>;
  ControlServer(const std::string& name, Handler handler);  // throws Error
  ~ControlServer();
  ControlServer(const ControlServer&) = delete;
  ControlServer& operator=(const ControlServer&) = delete;

 private:
  void loop();
  int fd_;
  Handler handler_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

// Sends one request and returns the response; throws Error if the daemon cannot be reached.
std::string control_request(const std::string& name, const std::string& request, int timeout_ms = 10000);

}  // namespace blockrepl
