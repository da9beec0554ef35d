#include "blockrepl/wire.h"

#include <arpa/inet.h>
#include <cerrno>
#include <cstring>
#include <endian.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <algorithm>
#include <climits>
#include <vector>
#include <capnp/orphan.h>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/fsutil.h"

namespace blockrepl {

static_assert(static_cast<uint16_t>(AckLevel::async) == static_cast<uint16_t>(wire::AckLevel::ASYNC) &&
                  static_cast<uint16_t>(AckLevel::recv) == static_cast<uint16_t>(wire::AckLevel::RECV) &&
                  static_cast<uint16_t>(AckLevel::sync) == static_cast<uint16_t>(wire::AckLevel::SYNC),
              "AckLevel travels as wire::AckLevel: keep their values equal");

const char* ack_level_name(AckLevel level) {
  switch (level) {
    case AckLevel::async: return "async";
    case AckLevel::recv: return "recv";
    case AckLevel::sync: return "sync";
  }
  return "?";
}

namespace {

void tune_socket(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  // Batches are up to a few MiB: larger buffers mean fewer wake-ups on both sides.
  int buf = 8 << 20;
  setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
}

}  // namespace

Connection::Connection(int fd, std::string peer) : Connection(std::make_unique<PlainTransport>(OwnedFd(fd)), std::move(peer)) {}

Connection::Connection(std::unique_ptr<Transport> transport, std::string peer)
    : transport_(std::move(transport)), peer_(std::move(peer)) {
  tune_socket(transport_->fd());
}

Connection::~Connection() = default;

void Connection::shutdown() { transport_->shutdown(); }

void Connection::send(capnp::MessageBuilder& msg) {
  // The frame is the message's flat-array form (segment table, then segments), written straight
  // from the builder's segments so large record data is not copied once more.
  auto segments = msg.getSegmentsForOutput();
  const size_t nseg = segments.size();
  std::vector<uint32_t> table((nseg + 2) & ~size_t{1}, 0);  // count-1, sizes, padded to 8 bytes
  table[0] = htole32(static_cast<uint32_t>(nseg - 1));
  size_t n = table.size() * sizeof(uint32_t);
  for (size_t i = 0; i < nseg; i++) {
    table[i + 1] = htole32(static_cast<uint32_t>(segments[i].size()));
    n += segments[i].size() * sizeof(capnp::word);
  }
  if (n > kMaxFrameBytes) throw Error("message to " + peer_ + " too large (" + std::to_string(n) + " bytes)");
  uint32_t len = htole32(static_cast<uint32_t>(n));
  std::vector<iovec> iov;
  iov.reserve(nseg + 2);
  iov.push_back({&len, sizeof len});
  iov.push_back({table.data(), table.size() * sizeof(uint32_t)});
  for (auto& seg : segments)
    iov.push_back({const_cast<capnp::word*>(seg.begin()), seg.size() * sizeof(capnp::word)});
  std::lock_guard lk(send_mu_);
  transport_->write_all(iov.data(), iov.size(), peer_);
  bytes_sent_ += sizeof len + n;
}

void check_field_size(size_t size, size_t limit, const char* field, const std::string& peer, const char* what) {
  if (size > limit)
    throw Error(std::string(what) + " from " + peer + ": " + field + " is " + std::to_string(size) + " bytes (at most " +
                    std::to_string(limit) + ")",
                EPROTO);
}

void check_lineage_sizes(capnp::List<wire::LineageEntry>::Reader lineage, const std::string& peer, const char* what) {
  if (lineage.size() > kMaxLineageEntries)
    throw Error(std::string(what) + " from " + peer + ": lineage has " + std::to_string(lineage.size()) + " entries (at most " +
                    std::to_string(kMaxLineageEntries) + ")",
                EPROTO);
  for (auto e : lineage) check_field_size(e.getId().size(), kMaxIdBytes, "lineage id", peer, what);
}

void FrameAssembler::accept_length(const std::string& peer) {
  uint32_t len_le;
  memcpy(&len_le, prefix_, sizeof len_le);
  const size_t len = le32toh(len_le);
  if (len == 0 || len % sizeof(capnp::word) != 0)
    throw Error("malformed frame from " + peer + " (length " + std::to_string(len) + ")", EPROTO);
  if (len > max_frame_bytes_)
    throw Error("frame from " + peer + " too large (" + std::to_string(len) + " bytes, at most " +
                    std::to_string(max_frame_bytes_) + (max_frame_bytes_ < kMaxFrameBytes ? " before the handshake is complete)" : ")"),
                EPROTO);
  length_ = len;
  got_ = 0;
}

// Grows the buffer (up to the announced length) when it is full: to twice its size, or at once
// to what already waits in the socket. Memory follows the bytes that arrived, so a peer that
// announces 64 MiB and sends little costs little, and a large frame that has arrived is not
// copied from buffer to buffer.
void FrameAssembler::grow_for_next_read(size_t waiting) {
  const size_t have = buffer_.size() * sizeof(capnp::word);
  if (got_ < have) return;
  const size_t arrived = got_ + waiting;
  size_t want = std::min(length_, std::max({kFrameChunkBytes, 2 * have, arrived}));
  want = (want + sizeof(capnp::word) - 1) / sizeof(capnp::word) * sizeof(capnp::word);
  auto bigger = kj::heapArray<capnp::word>(want / sizeof(capnp::word));
  if (got_ > 0) memcpy(bigger.begin(), buffer_.begin(), got_);
  buffer_ = kj::mv(bigger);
}

// read(into, want) -> bytes, 0 at a close, -1 with errno; readable() -> bytes waiting.
template <class Read, class Readable>
FrameAssembler::Status FrameAssembler::read_with(Read read, Readable readable, const std::string& peer) {
  void* into;
  size_t want;
  if (!have_length()) {
    into = prefix_ + prefix_got_;
    want = sizeof prefix_ - prefix_got_;
  } else {
    if (got_ == buffer_.size() * sizeof(capnp::word)) grow_for_next_read(readable());
    into = reinterpret_cast<char*>(buffer_.begin()) + got_;
    want = buffer_.size() * sizeof(capnp::word) - got_;
  }
  ssize_t r = read(into, want);
  if (r < 0) {
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) return Status::incomplete;
    throw_errno("receive from " + peer, errno);
  }
  if (r == 0) {
    if (prefix_got_ == 0) return Status::closed;
    throw Error("connection to " + peer + " closed in the middle of a message", ECONNRESET);
  }
  bytes_received_ += static_cast<size_t>(r);
  if (!have_length()) {
    prefix_got_ += static_cast<size_t>(r);
    if (have_length()) accept_length(peer);
    return Status::incomplete;
  }
  got_ += static_cast<size_t>(r);
  return got_ == length_ ? Status::complete : Status::incomplete;
}

FrameAssembler::Status FrameAssembler::read_some(Transport& from, const std::string& peer) {
  return read_with([&](void* into, size_t n) { return from.read_some(into, n, peer); }, [&] { return from.readable_bytes(); },
                   peer);
}

FrameAssembler::Status FrameAssembler::read_some(int fd, const std::string& peer) {
  return read_with([&](void* into, size_t n) { return ::read(fd, into, n); },
                   [&] {
                     int waiting = 0;
                     if (ioctl(fd, FIONREAD, &waiting) != 0 || waiting < 0) waiting = 0;
                     return static_cast<size_t>(waiting);
                   },
                   peer);
}

std::unique_ptr<Frame> FrameAssembler::take(const std::string& peer) {
  // The last growth step sized the buffer to the announced length exactly.
  auto words = kj::mv(buffer_);
  prefix_got_ = 0;
  length_ = got_ = 0;
  return Frame::parse(kj::mv(words), peer);
}

void Connection::wait_readable(int timeout_ms) {
  for (;;) {
    pollfd pfd{transport_->fd(), POLLIN, 0};
    int r = poll(&pfd, 1, timeout_ms > 0 ? timeout_ms : -1);
    if (r < 0 && errno == EINTR) continue;
    if (r == 0) throw Error("no message from " + peer_ + " for " + std::to_string(timeout_ms / 1000.0).substr(0, 4) + " s", ETIMEDOUT);
    return;
  }
}

std::unique_ptr<Frame> Connection::receive(int timeout_ms) {
  // A blocking socket without a timeout waits in read(); otherwise poll first (TLS keeps
  // decrypted bytes that the socket no longer shows: those are read without waiting).
  const bool poll_first = timeout_ms > 0 || transport_->nonblocking();
  for (;;) {
    if (poll_first && !transport_->buffered()) wait_readable(timeout_ms);
    switch (reader_.read_some(*transport_, peer_)) {
      case FrameAssembler::Status::closed: return nullptr;
      case FrameAssembler::Status::complete: return reader_.take(peer_);
      case FrameAssembler::Status::incomplete: break;
    }
  }
}

std::unique_ptr<Frame> Connection::poll_receive() {
  for (;;) {
    const uint64_t before = reader_.bytes_received();
    switch (reader_.read_some(*transport_, peer_)) {
      case FrameAssembler::Status::closed:
        throw Error("connection from " + peer_ + " closed during the handshake", ECONNRESET);
      case FrameAssembler::Status::complete: return reader_.take(peer_);
      case FrameAssembler::Status::incomplete:
        if (reader_.bytes_received() == before) return nullptr;  // nothing more for now
        break;
    }
  }
}

std::unique_ptr<Frame> Frame::parse(kj::Array<capnp::word> words, const std::string& where) {
  auto frame = std::make_unique<Frame>();
  frame->words_ = kj::mv(words);
  capnp::ReaderOptions opts;
  // The limit counts every word a reader visits: receivers read a message a few times over, but
  // only lists that share their bytes (which no encoder makes) visit far more than its size.
  // Scaled to the frame, a small hostile frame cannot make decoding cost 128 MiB of reads.
  opts.traversalLimitInWords =
      std::min<uint64_t>(kTraversalLimitWords, std::max<uint64_t>(frame->words_.size() * 8, uint64_t{1} << 20));
  opts.nestingLimit = 16;
  try {
    frame->reader_ = std::make_unique<capnp::FlatArrayMessageReader>(frame->words_.asPtr(), opts);
    frame->root().which();  // validates the segment table and the root pointer now
  } catch (const kj::Exception& e) {
    throw Error("malformed message from " + where + ": " + e.getDescription().cStr(), EPROTO);
  }
  return frame;
}

void Connection::send_error(const std::string& reason, bool fatal) {
  try {
    capnp::MallocMessageBuilder mb;
    auto err = mb.initRoot<wire::Message>().initError();
    err.setReason(reason);
    err.setFatal(fatal);
    send(mb);
  } catch (...) {
  }
  shutdown();
}

bool split_address(const std::string& address, std::string* host, std::string* port) {
  auto colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) return false;
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() > 2 && host->front() == '[' && host->back() == ']') *host = host->substr(1, host->size() - 2);
  for (char c : *port)
    if (c < '0' || c > '9') return false;
  return port->size() <= 5 && std::stoul(*port) <= 65535;
}

bool is_loopback_address(const std::string& address) {
  std::string host, port;
  if (!split_address(address, &host, &port)) return false;
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &res) != 0) return false;
  bool all_loopback = res != nullptr;
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    if (ai->ai_family == AF_INET) {
      const auto* sin = reinterpret_cast<const sockaddr_in*>(ai->ai_addr);
      all_loopback &= (ntohl(sin->sin_addr.s_addr) >> 24) == 127;
    } else if (ai->ai_family == AF_INET6) {
      const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(ai->ai_addr);
      all_loopback &= IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr) != 0;
    } else {
      all_loopback = false;
    }
  }
  freeaddrinfo(res);
  return all_loopback;
}

namespace {

std::string peer_name(const sockaddr* sa) {
  char host[NI_MAXHOST], port[NI_MAXSERV];
  if (getnameinfo(sa, sa->sa_family == AF_INET ? sizeof(sockaddr_in) : sizeof(sockaddr_in6), host, sizeof host, port,
                  sizeof port, NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return "?";
  return std::string(sa->sa_family == AF_INET6 ? "[" : "") + host + (sa->sa_family == AF_INET6 ? "]" : "") + ":" + port;
}

}  // namespace

OwnedFd connect_socket(const std::string& address, int timeout_ms) {
  std::string host, port;
  if (!split_address(address, &host, &port)) throw Error("bad address " + address + " (expected HOST:PORT)", EINVAL);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) throw Error("cannot resolve " + address + ": " + gai_strerror(rc), EHOSTUNREACH);
  int last_err = ECONNREFUSED;
  for (addrinfo* ai = res; ai; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
      last_err = errno;
      close(fd);
      continue;
    }
    pollfd pfd{fd, POLLOUT, 0};
    int pr = poll(&pfd, 1, timeout_ms);
    int soerr = 0;
    socklen_t len = sizeof soerr;
    if (pr <= 0) soerr = ETIMEDOUT;
    else getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
    if (soerr != 0) {
      last_err = soerr;
      close(fd);
      continue;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    freeaddrinfo(res);
    return OwnedFd(fd);
  }
  freeaddrinfo(res);
  throw Error("cannot connect to " + address + ": " + strerror(last_err), last_err);
}

std::unique_ptr<Connection> connect_to(const std::string& address, int timeout_ms) {
  return std::make_unique<Connection>(connect_socket(address, timeout_ms).release(), address);
}

int listen_on(const std::string& address) {
  std::string host, port;
  if (!split_address(address, &host, &port)) throw Error("bad listen address " + address + " (expected ADDR:PORT)", EINVAL);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  int rc = getaddrinfo(host.empty() || host == "*" ? nullptr : host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0) throw Error("cannot resolve listen address " + address + ": " + gai_strerror(rc), EINVAL);
  int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
  if (fd < 0) {
    freeaddrinfo(res);
    throw_errno("cannot listen on " + address, errno);
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, SOMAXCONN) != 0) {
    int e = errno;
    close(fd);
    freeaddrinfo(res);
    if (e == EADDRINUSE) throw Error("cannot listen on " + address + ": the port is already in use", e);
    throw_errno("cannot listen on " + address, e);
  }
  freeaddrinfo(res);
  return fd;
}

std::string peer_name_of(int fd) {
  sockaddr_storage ss;
  socklen_t len = sizeof ss;
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) != 0) return "?";
  return peer_name(reinterpret_cast<sockaddr*>(&ss));
}

std::unique_ptr<Connection> accept_from(int listen_fd) {
  for (;;) {
    sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int fd = accept4(listen_fd, reinterpret_cast<sockaddr*>(&ss), &len, SOCK_CLOEXEC);
    if (fd >= 0) return std::make_unique<Connection>(fd, peer_name(reinterpret_cast<sockaddr*>(&ss)));
    if (errno == EINTR || errno == ECONNABORTED) continue;
    return nullptr;
  }
}

void to_wire(const Record& rec, wire::Record::Builder out) {
  out.setLsn(rec.lsn);
  out.setOp(static_cast<uint8_t>(rec.op));
  out.setFid(rec.fid);
  out.setParent(rec.parent);
  out.setParent2(rec.parent2);
  if (!rec.name.empty()) out.setName(kj::arrayPtr(reinterpret_cast<const kj::byte*>(rec.name.data()), rec.name.size()));
  if (!rec.name2.empty()) out.setName2(kj::arrayPtr(reinterpret_cast<const kj::byte*>(rec.name2.data()), rec.name2.size()));
  out.setOffset(rec.offset);
  out.setLength(rec.length);
  out.setMode(rec.mode);
  out.setFlags(rec.flags);
  out.setUid(rec.uid);
  out.setGid(rec.gid);
  out.setAttrValid(rec.attr_valid);
  out.setRdev(rec.rdev);
  out.setAtimeSec(rec.atime.tv_sec);
  out.setAtimeNsec(rec.atime.tv_nsec);
  out.setMtimeSec(rec.mtime.tv_sec);
  out.setMtimeNsec(rec.mtime.tv_nsec);
  out.setWhiteoutFid(rec.whiteout_fid);
  if (rec.attr_valid & kAttrStampDirs) {
    out.setDirMtimeSec(rec.dir_mtime.tv_sec);
    out.setDirMtimeNsec(rec.dir_mtime.tv_nsec);
    out.setDir2MtimeSec(rec.dir2_mtime.tv_sec);
    out.setDir2MtimeNsec(rec.dir2_mtime.tv_nsec);
  }
  if (rec.data.empty()) return;
  auto bytes = kj::arrayPtr(reinterpret_cast<const kj::byte*>(rec.data.data()), rec.data.size());
  // Large, aligned payloads are referenced rather than copied into the message (the caller keeps
  // the record alive until the message is sent); Cap'n Proto needs word alignment and length.
  if (bytes.size() >= 4096 && bytes.size() % sizeof(capnp::word) == 0 &&
      reinterpret_cast<uintptr_t>(bytes.begin()) % sizeof(capnp::word) == 0) {
    out.adoptData(capnp::Orphanage::getForMessageContaining(out).referenceExternalData(bytes));
  } else {
    out.setData(bytes);
  }
}

namespace {

// The largest data a record of this operation may carry: a symlink's target, an xattr's value,
// a write's data; the others carry none.
size_t max_record_data(Op op) {
  switch (op) {
    case Op::write: return kMaxRecordDataBytes;
    case Op::symlink: return kMaxPathBytes;
    case Op::setxattr: return kMaxXattrValueBytes;
    default: return 0;
  }
}

void check_record_sizes(wire::Record::Reader in, Op op, const std::string& peer) {
  const std::string what = std::string("record (") + op_name(op) + ", lsn " + std::to_string(in.getLsn()) + ")";
  check_field_size(in.getName().size(), kMaxNameBytes, "name", peer, what.c_str());
  check_field_size(in.getName2().size(), kMaxNameBytes, "name2", peer, what.c_str());
  check_field_size(in.getData().size(), max_record_data(op), "data", peer, what.c_str());
}

}  // namespace

Record from_wire(wire::Record::Reader in, bool view_data, const std::string& peer) {
  Record rec;
  rec.lsn = in.getLsn();
  uint8_t op = in.getOp();
  if (op < static_cast<uint8_t>(Op::write) || op > static_cast<uint8_t>(Op::release))
    throw Error("record with unknown operation " + std::to_string(op) + " at lsn " + std::to_string(rec.lsn), EPROTO);
  rec.op = static_cast<Op>(op);
  check_record_sizes(in, rec.op, peer);
  rec.fid = in.getFid();
  rec.parent = in.getParent();
  rec.parent2 = in.getParent2();
  auto name = in.getName();
  auto name2 = in.getName2();
  rec.name.assign(reinterpret_cast<const char*>(name.begin()), name.size());
  rec.name2.assign(reinterpret_cast<const char*>(name2.begin()), name2.size());
  rec.offset = in.getOffset();
  rec.length = in.getLength();
  rec.mode = in.getMode();
  rec.flags = in.getFlags();
  rec.uid = in.getUid();
  rec.gid = in.getGid();
  rec.attr_valid = in.getAttrValid();
  rec.rdev = in.getRdev();
  rec.atime = {static_cast<time_t>(in.getAtimeSec()), static_cast<long>(in.getAtimeNsec())};
  rec.mtime = {static_cast<time_t>(in.getMtimeSec()), static_cast<long>(in.getMtimeNsec())};
  rec.whiteout_fid = in.getWhiteoutFid();
  rec.dir_mtime = {static_cast<time_t>(in.getDirMtimeSec()), static_cast<long>(in.getDirMtimeNsec())};
  rec.dir2_mtime = {static_cast<time_t>(in.getDir2MtimeSec()), static_cast<long>(in.getDir2MtimeNsec())};
  for (const timespec* ts : {&rec.atime, &rec.mtime, &rec.dir_mtime, &rec.dir2_mtime})
    if (ts->tv_nsec < 0 || ts->tv_nsec >= 1000000000L)
      throw Error("record with an impossible time at lsn " + std::to_string(rec.lsn), EPROTO);
  auto data = in.getData();
  if (view_data) {
    rec.data = std::string_view(reinterpret_cast<const char*>(data.begin()), data.size());
  } else {
    rec.owned.assign(reinterpret_cast<const char*>(data.begin()), data.size());
    rec.data = rec.owned;
  }
  if (rec.offset > (uint64_t{1} << 62) || rec.length > (uint64_t{1} << 62))
    throw Error("record with an impossible offset at lsn " + std::to_string(rec.lsn), EPROTO);
  return rec;
}

}  // namespace blockrepl
