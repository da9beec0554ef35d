// Errors that carry their context (which file, which peer, which LSN) in the message.
#pragma once
#include <stdexcept>
#include <string>

namespace blockrepl {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what, int err = 0) : std::runtime_error(what), errno_(err) {}
  int errno_value() const { return errno_; }

 private:
  int errno_;
};

// "what: strerror(err)"
std::string errno_message(const std::string& what, int err);
[[noreturn]] void throw_errno(const std::string& what, int err);

}  // namespace blockrepl
