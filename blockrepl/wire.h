// Framed Cap'n Proto messages over a TCP connection (see proto/blockrepl.capnp for the framing
// and the conversation), plus the conversions between Records and their wire form.
#pragma once
#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "blockrepl.capnp.h"
#include "blockrepl/record.h"

namespace blockrepl {

// The protocol's constants come from the schema, so that they are defined once.
inline constexpr uint32_t kProtocolVersion = wire::PROTOCOL_VERSION;
inline const char* const kHashAlgorithm = wire::HASH_ALGORITHM.get().cStr();

// When a barrier returns (a slave asks for one in its hello, the master grants at most its own):
// once durable locally only, once every sync slave received the records, or once they made
// them durable. The values are the schema's (wire::AckLevel).
enum class AckLevel { async = 0, recv = 1, sync = 2 };
const char* ack_level_name(AckLevel level);

// Limits that keep a broken or hostile peer from exhausting memory.
inline constexpr size_t kMaxFrameBytes = 64u << 20;
inline constexpr uint64_t kTraversalLimitWords = kMaxFrameBytes / 8 * 2;

// A received message: owns its bytes; root() is valid while it lives.
class Frame {
 public:
  wire::Message::Reader root() { return reader_->getRoot<wire::Message>(); }
  size_t bytes() const { return words_.size() * sizeof(capnp::word); }
  // The message as it came off the wire (without the length prefix), e.g. to stage it on disk.
  kj::ArrayPtr<const capnp::word> words() const { return words_.asPtr(); }
  // A frame from bytes kept earlier (a staged message), validated like a received one; `where`
  // names the source in the Error thrown for malformed bytes.
  static std::unique_ptr<Frame> parse(kj::Array<capnp::word> words, const std::string& where);

 private:
  friend class Connection;
  kj::Array<capnp::word> words_;
  std::unique_ptr<capnp::FlatArrayMessageReader> reader_;
};

class Connection {
 public:
  Connection(int fd, std::string peer);  // takes ownership of fd
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Sends one message (thread-safe against other senders). Throws Error on failure.
  void send(capnp::MessageBuilder& msg);
  // Receives the next message. Returns nullptr on an orderly close by the peer; throws Error on
  // a timeout (timeout_ms > 0), a broken connection or a malformed or oversized frame.
  std::unique_ptr<Frame> receive(int timeout_ms = 0);
  // Wakes up a blocked receive()/send() from another thread; the connection is unusable after.
  void shutdown();
  // Sends an error message with a reason, best effort, then shuts down.
  void send_error(const std::string& reason, bool fatal);

  const std::string& peer() const { return peer_; }
  uint64_t bytes_sent() const { return bytes_sent_; }
  uint64_t bytes_received() const { return bytes_received_; }
  int fd() const { return fd_; }

 private:
  bool read_full(void* buf, size_t n, int timeout_ms, bool eof_ok);
  int fd_;
  std::string peer_;
  std::mutex send_mu_;
  uint64_t bytes_sent_ = 0;
  uint64_t bytes_received_ = 0;
};

// "host:port" -> connected socket; throws Error naming the address on failure.
std::unique_ptr<Connection> connect_to(const std::string& address, int timeout_ms);
// "addr:port" -> listening socket fd; throws Error ("address in use", ...) naming the address.
int listen_on(const std::string& address);
// Accepts one connection (blocking); nullptr when the listener was shut down.
std::unique_ptr<Connection> accept_from(int listen_fd);

// Record <-> wire form. from_wire validates every field a peer controls and throws Error.
void to_wire(const Record& rec, wire::Record::Builder out);
// With view_data, the record's data points into the message (which must outlive the record).
Record from_wire(wire::Record::Reader in, bool view_data = false);

}  // namespace blockrepl
