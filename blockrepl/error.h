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

// A refusal the operator must act on (cluster or block-size mismatch, protocol version, a wrong
// secret or certificate, ...): a slave stops trying instead of reconnecting.
class FatalAttachError : public Error {
 public:
  using Error::Error;
};

// "what: strerror(err)"
std::string errno_message(const std::string& what, int err);
[[noreturn]] void throw_errno(const std::string& what, int err);

}  // namespace blockrepl
