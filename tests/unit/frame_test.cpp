// The frame reader (FrameAssembler): memory that follows the bytes that arrived, the length limit
// (lower before a hello), frames split across reads, and the field limits of decoded records.
#include <gtest/gtest.h>

#include <endian.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "blockrepl/error.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/wire.h"

namespace blockrepl {
namespace {

// A connected socket pair, both ends non-blocking: the test writes into one and reads the other.
struct SocketPair {
  OwnedFd writer, reader;
  SocketPair() {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    writer.reset(sv[0]);
    reader.reset(sv[1]);
    int buf = 4 << 20;
    setsockopt(writer.get(), SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
    setsockopt(reader.get(), SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
  }
  void write_bytes(const std::string& bytes) {
    ASSERT_EQ(write(writer.get(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  }
};

std::string length_prefix(uint32_t n) {
  uint32_t le = htole32(n);
  return std::string(reinterpret_cast<const char*>(&le), sizeof le);
}

// A frame as Connection::send writes it: length prefix, then the flat message.
std::string frame_of(capnp::MessageBuilder& mb) {
  auto words = capnp::messageToFlatArray(mb);
  auto bytes = words.asBytes();
  return length_prefix(static_cast<uint32_t>(bytes.size())) + std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

std::string hello_frame(const std::string& node_id) {
  capnp::MallocMessageBuilder mb;
  auto h = mb.initRoot<wire::Message>().initHello();
  h.setProtocolVersion(kProtocolVersion);
  h.setNodeId(node_id);
  return frame_of(mb);
}

// Reads until the assembler stops making progress (the socket is drained) or completes a frame.
FrameAssembler::Status read_available(FrameAssembler& fa, int fd) {
  for (int i = 0; i < 100000; i++) {
    uint64_t before = fa.bytes_received();
    auto st = fa.read_some(fd, "test-peer");
    if (st != FrameAssembler::Status::incomplete || fa.bytes_received() == before) return st;
  }
  return FrameAssembler::Status::incomplete;
}

TEST(FrameAssembler, BufferFollowsTheBytesThatArrivedNotTheAnnouncedLength) {
  SocketPair sp;
  FrameAssembler fa;
  sp.write_bytes(length_prefix(kMaxFrameBytes) + std::string(1000, 'x'));
  EXPECT_EQ(read_available(fa, sp.reader.get()), FrameAssembler::Status::incomplete);
  EXPECT_LE(fa.buffered_capacity(), kFrameChunkBytes) << "a 64 MiB announcement with 1000 bytes sent";
  sp.write_bytes(std::string(200000, 'y'));
  EXPECT_EQ(read_available(fa, sp.reader.get()), FrameAssembler::Status::incomplete);
  EXPECT_GE(fa.buffered_capacity(), 201000u);
  EXPECT_LE(fa.buffered_capacity(), 2 * 201000u + kFrameChunkBytes) << "growth is geometric from what arrived";
}

TEST(FrameAssembler, FrameSplitAcrossReadsIsReassembledExactly) {
  SocketPair sp;
  FrameAssembler fa;
  const std::string big_id(300000, 'n');  // a frame of several growth steps
  const std::string f = hello_frame(big_id);
  // Byte by byte for the prefix, then in odd pieces.
  for (size_t i = 0; i < 4; i++) {
    sp.write_bytes(f.substr(i, 1));
    ASSERT_EQ(read_available(fa, sp.reader.get()), FrameAssembler::Status::incomplete);
  }
  size_t pos = 4;
  FrameAssembler::Status st = FrameAssembler::Status::incomplete;
  while (pos < f.size()) {
    size_t n = std::min<size_t>(7777, f.size() - pos);
    sp.write_bytes(f.substr(pos, n));
    pos += n;
    st = read_available(fa, sp.reader.get());
    if (pos < f.size()) {
      ASSERT_EQ(st, FrameAssembler::Status::incomplete);
    }
  }
  ASSERT_EQ(st, FrameAssembler::Status::complete);
  EXPECT_EQ(fa.buffered_capacity(), f.size() - 4) << "the last growth step is the announced length exactly";
  auto frame = fa.take("test-peer");
  ASSERT_EQ(frame->root().which(), wire::Message::HELLO);
  EXPECT_EQ(std::string(frame->root().getHello().getNodeId().cStr()), big_id);
  EXPECT_EQ(fa.buffered_capacity(), 0u) << "take() hands the buffer over";
}

TEST(FrameAssembler, TwoFramesBackToBackAreReadOneAtATime) {
  SocketPair sp;
  FrameAssembler fa;
  sp.write_bytes(hello_frame("first") + hello_frame("second"));
  ASSERT_EQ(read_available(fa, sp.reader.get()), FrameAssembler::Status::complete);
  EXPECT_STREQ(fa.take("p")->root().getHello().getNodeId().cStr(), "first");
  ASSERT_EQ(read_available(fa, sp.reader.get()), FrameAssembler::Status::complete);
  EXPECT_STREQ(fa.take("p")->root().getHello().getNodeId().cStr(), "second");
}

TEST(FrameAssembler, LengthOverTheLimitIsRefusedAtThePrefixNamingThePeer) {
  SocketPair sp;
  FrameAssembler fa(kMaxHelloFrameBytes);
  sp.write_bytes(length_prefix(kMaxHelloFrameBytes + 8));
  try {
    read_available(fa, sp.reader.get());
    FAIL() << "a frame over the hello limit was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("test-peer"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("too large"), std::string::npos) << e.what();
  }
  EXPECT_EQ(fa.buffered_capacity(), 0u) << "nothing is allocated for a refused frame";
}

TEST(FrameAssembler, MalformedLengthsAreRefused) {
  for (uint32_t len : {0u, 13u, 0x80000000u}) {
    SocketPair sp;
    FrameAssembler fa;
    sp.write_bytes(length_prefix(len));
    EXPECT_THROW(read_available(fa, sp.reader.get()), Error) << "length " << len;
  }
}

TEST(FrameAssembler, CloseBeforeAFrameIsOrderlyAndInsideOneIsAnError) {
  {
    SocketPair sp;
    FrameAssembler fa;
    sp.writer.reset();
    EXPECT_EQ(read_available(fa, sp.reader.get()), FrameAssembler::Status::closed);
  }
  {
    SocketPair sp;
    FrameAssembler fa;
    sp.write_bytes(length_prefix(64) + std::string(10, 'x'));
    sp.writer.reset();
    EXPECT_THROW(read_available(fa, sp.reader.get()), Error);
  }
}

TEST(WireLimits, RecordFieldsOverTheirLimitsAreRefusedNamingPeerAndField) {
  struct Case {
    Op op;
    size_t name, data;
    const char* field;
  };
  for (const Case& c : {Case{Op::create, kMaxNameBytes + 1, 0, "name"}, Case{Op::setxattr, 10, kMaxXattrValueBytes + 1, "data"},
                        Case{Op::symlink, 10, kMaxPathBytes + 1, "data"}, Case{Op::unlink, 10, 1, "data"}}) {
    capnp::MallocMessageBuilder mb;
    auto r = mb.initRoot<wire::Record>();
    r.setLsn(7);
    r.setOp(static_cast<uint8_t>(c.op));
    std::string name(c.name, 'a'), data(c.data, 'd');
    r.setName(kj::arrayPtr(reinterpret_cast<const kj::byte*>(name.data()), name.size()));
    if (!data.empty()) r.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(data.data()), data.size()));
    try {
      from_wire(r.asReader(), false, "10.0.0.9:7000");
      ADD_FAILURE() << op_name(c.op) << ": an oversized " << c.field << " was accepted";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find("10.0.0.9:7000"), std::string::npos) << what;
      EXPECT_NE(what.find(c.field), std::string::npos) << what;
      EXPECT_EQ(what.find('\n'), std::string::npos) << "one line: " << what;
    }
  }
  // At the limits, accepted.
  capnp::MallocMessageBuilder mb;
  auto r = mb.initRoot<wire::Record>();
  r.setOp(static_cast<uint8_t>(Op::setxattr));
  std::string name(kMaxNameBytes, 'a'), value(kMaxXattrValueBytes, 'v');
  r.setName(kj::arrayPtr(reinterpret_cast<const kj::byte*>(name.data()), name.size()));
  r.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(value.data()), value.size()));
  EXPECT_NO_THROW(from_wire(r.asReader(), false, "peer"));
}

}  // namespace
}  // namespace blockrepl
