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
#include "blockrepl/transport.h"

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
// Until its hello is accepted a peer is a stranger: its first frame may be at most this large.
inline constexpr size_t kMaxHelloFrameBytes = 64u << 10;
// A frame's buffer starts this large and doubles as its bytes arrive (never the announced length
// up front: a length prefix costs the sender nothing).
inline constexpr size_t kFrameChunkBytes = 64u << 10;

// Longest value of each field a peer sends (checked where messages are decoded; the names of
// entries and xattrs are kMaxNameBytes, fsutil.h).
inline constexpr size_t kMaxIdBytes = 255;             // node id, cluster id, lineage id
inline constexpr size_t kMaxAddressBytes = 255;        // a listen address (host:port)
inline constexpr size_t kMaxHashNameBytes = 32;        // hello.hashAlgorithm
inline constexpr size_t kMaxLineageEntries = 4096;     // one per promotion in the cluster's history
inline constexpr size_t kMaxPathBytes = 4096;          // PATH_MAX: paths in a copy or a diff
inline constexpr size_t kMaxXattrValueBytes = 64u << 10;  // XATTR_SIZE_MAX
inline constexpr size_t kMaxRecordDataBytes = 16u << 20;  // a write's data (FUSE sends 1 MiB at most)
inline constexpr size_t kMaxReasonBytes = 4096;        // an error message's reason

// Throws Error(EPROTO) "<what> from <peer>: <field> is N bytes (at most M)" when size > limit.
void check_field_size(size_t size, size_t limit, const char* field, const std::string& peer, const char* what = "message");
// A lineage as peers send it (hello, welcome, heartbeat): at most kMaxLineageEntries entries, ids
// at most kMaxIdBytes.
void check_lineage_sizes(capnp::List<wire::LineageEntry>::Reader lineage, const std::string& peer, const char* what);

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
  friend class FrameAssembler;
  kj::Array<capnp::word> words_;
  std::unique_ptr<capnp::FlatArrayMessageReader> reader_;
};

// Reads one frame at a time from a socket, blocking or not: the length prefix first, then the
// message into a buffer that grows as its bytes arrive. It never reads past the frame, so the
// next frame's bytes stay in the socket.
class FrameAssembler {
 public:
  enum class Status { incomplete, complete, closed };
  explicit FrameAssembler(size_t max_frame_bytes = kMaxFrameBytes) : max_frame_bytes_(max_frame_bytes) {}

  // One read(2) of what the current frame still lacks. `closed`: an orderly close before a frame
  // began; `incomplete`: more bytes are needed (or EAGAIN on a non-blocking socket). Throws Error
  // naming the peer for a length over the limit, a close inside a frame, or a failed read.
  Status read_some(Transport& from, const std::string& peer);
  // The same on a plain socket.
  Status read_some(int fd, const std::string& peer);
  // The complete frame, validated; the reader is then ready for the next one.
  std::unique_ptr<Frame> take(const std::string& peer);

  void set_max_frame_bytes(size_t n) { max_frame_bytes_ = n; }
  size_t max_frame_bytes() const { return max_frame_bytes_; }
  // Bytes of the frame being read that are held in memory now (its buffer's capacity).
  size_t buffered_capacity() const { return buffer_.size() * sizeof(capnp::word); }
  uint64_t bytes_received() const { return bytes_received_; }

 private:
  bool have_length() const { return prefix_got_ == sizeof prefix_; }
  void accept_length(const std::string& peer);
  // `waiting`: bytes a read would return now.
  void grow_for_next_read(size_t waiting);
  template <class Read, class Readable>
  Status read_with(Read read, Readable readable, const std::string& peer);

  size_t max_frame_bytes_;
  unsigned char prefix_[4] = {};
  size_t prefix_got_ = 0;
  size_t length_ = 0;  // announced message length, once the prefix is complete
  size_t got_ = 0;     // message bytes received so far
  kj::Array<capnp::word> buffer_;
  uint64_t bytes_received_ = 0;
};

// Frames over a Transport (a socket, or TLS over one), plus what the handshake established about
// the peer.
class Connection {
 public:
  Connection(int fd, std::string peer);  // a plain socket; takes ownership of fd
  Connection(std::unique_ptr<Transport> transport, std::string peer);
  ~Connection();
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Sends one message (thread-safe against other senders). Throws Error on failure.
  void send(capnp::MessageBuilder& msg);
  // Receives the next message. Returns nullptr on an orderly close by the peer; throws Error on
  // a timeout (timeout_ms > 0), a broken connection or a malformed or oversized frame.
  std::unique_ptr<Frame> receive(int timeout_ms = 0);
  // During a handshake, on a non-blocking transport: the next message if all of it has arrived,
  // nullptr if not yet. Throws Error when the peer closed or sent something malformed.
  std::unique_ptr<Frame> poll_receive();
  // The handshake is over: reads may block, a peer that stops reading gets send_timeout
  // (0: no limit).
  void start_session(std::chrono::milliseconds send_timeout) { transport_->start_session(send_timeout); }
  // Wakes up a blocked receive()/send() from another thread; the connection is unusable after.
  void shutdown();
  // Sends an error message with a reason, best effort, then shuts down.
  void send_error(const std::string& reason, bool fatal);
  // Frames larger than this are refused (kMaxFrameBytes unless lowered, e.g. before a hello).
  void set_max_frame_bytes(size_t n) { reader_.set_max_frame_bytes(n); }

  const std::string& peer() const { return peer_; }
  uint64_t bytes_sent() const { return bytes_sent_; }
  uint64_t bytes_received() const { return reader_.bytes_received(); }
  int fd() const { return transport_->fd(); }
  Transport& transport() { return *transport_; }
  bool encrypted() const { return transport_->encrypted(); }
  // Set by the handshake once the peer proved that it holds the cluster's secret (auth.h); for
  // a downstream node, the upstream's proven cluster id.
  bool authenticated() const { return authenticated_; }
  const std::string& authenticated_cluster() const { return authenticated_cluster_; }
  void set_authenticated(std::string cluster) {
    authenticated_ = true;
    authenticated_cluster_ = std::move(cluster);
  }

 private:
  void wait_readable(int timeout_ms);
  std::unique_ptr<Transport> transport_;
  std::string peer_;
  std::mutex send_mu_;
  uint64_t bytes_sent_ = 0;
  FrameAssembler reader_;
  bool authenticated_ = false;
  std::string authenticated_cluster_;
};

// "host:port" -> connected TCP socket; throws Error naming the address on failure.
OwnedFd connect_socket(const std::string& address, int timeout_ms);
// The same as a plain Connection (handshake.h adds TLS and authentication).
std::unique_ptr<Connection> connect_to(const std::string& address, int timeout_ms);
// "host:port" or "[v6]:port" -> host and port; false if malformed.
bool split_address(const std::string& address, std::string* host, std::string* port);
// Whether every address the host resolves to is a loopback one (127/8, ::1): only local
// processes can reach a listener there.
bool is_loopback_address(const std::string& address);
// "addr:port" -> listening socket fd; throws Error ("address in use", ...) naming the address.
int listen_on(const std::string& address);
// Accepts one connection (blocking); nullptr when the listener was shut down.
std::unique_ptr<Connection> accept_from(int listen_fd);
// A connected socket's peer as "host:port" ("?" if unknown).
std::string peer_name_of(int fd);

// Record <-> wire form. from_wire validates every field a peer controls and throws Error.
void to_wire(const Record& rec, wire::Record::Builder out);
// With view_data, the record's data points into the message (which must outlive the record).
// `peer` names the sender (or the file a record was kept in) in errors.
Record from_wire(wire::Record::Reader in, bool view_data = false, const std::string& peer = "peer");

}  // namespace blockrepl
