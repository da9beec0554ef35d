// Compression of the record stream (protocol 5; proto/blockrepl.capnp: hello.codecs, hello.compress,
// welcome.codec, compressedBatch). A slave far from its master (a WAN link) can have the batches
// it receives compressed; DRBD needs a separate proxy for that, LiteFS compresses with LZ4.
//
// Negotiation: the slave's hello lists the codecs it decodes and whether it asks for one (its
// --compress: it is the one that knows it is far away); the master compresses when it runs with
// --compress itself or the slave asked, provided the slave decodes the codec; its welcome names
// the codec and level of the session (none: every batch goes plain). Off by default: on a fast
// link compression only adds CPU time to every barrier.
//
// Batch codec format 1 (what a compressedBatch holds; changing it needs a new Codec value or a
// protocol version):
//   codec             zstd (the only one)
//   uncompressedSize  N: the exact size of the decompressed bytes; 8 <= N <= the receiver's
//                     frame limit (kMaxFrameBytes), a multiple of 8
//   data              one zstd frame (RFC 8878) whose header announces the content size N (no
//                     dictionary); its N bytes are one Cap'n Proto message in flat-array form
//                     (segment table, segments: what Connection::send would have written
//                     without the length prefix) whose root is a Message holding a `batch`
// The receiver checks N and the frame's announced size before it allocates anything, and
// refuses (EPROTO, naming the master) a frame that decompresses to another size, fails, or does
// not hold a batch. A compressed session mixes compressedBatch and plain batch messages: a batch
// under kMinCompressedBatchBytes, or one that compression does not shrink, goes plain.
#pragma once
#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "blockrepl/wire.h"

namespace blockrepl {

inline constexpr unsigned kBatchCodecFormat = 1;
inline constexpr int kDefaultZstdLevel = 3;
inline constexpr int kMinZstdLevel = 1;
inline constexpr int kMaxZstdLevel = 19;
// Smaller batches (a barrier alone, a metadata change) gain nothing worth a zstd frame's overhead.
inline constexpr size_t kMinCompressedBatchBytes = 256;
// Longest hello.codecs list a master accepts.
inline constexpr size_t kMaxCodecsListed = 16;

// What a node asks for (--compress) or a session uses.
struct Compression {
  wire::Codec codec = wire::Codec::NONE;
  int level = 0;  // zstd: kMinZstdLevel..kMaxZstdLevel
  bool on() const { return codec != wire::Codec::NONE; }
  bool operator==(const Compression&) const = default;
};

// "zstd" (level kDefaultZstdLevel), "zstd:LEVEL", or "off". nullopt and *why (one sentence
// naming the value) for anything else.
std::optional<Compression> parse_compression(const std::string& text, std::string* why);
// "zstd:3" or "off".
std::string compression_name(const Compression& c);

// Slave: the hello's codec fields: every codec this build decodes, and `asked` (off: it does
// not ask).
void offer_compression(wire::Hello::Builder h, const Compression& asked);
// Master: the session's compression for this hello: `mine` (--compress) if the slave decodes it,
// else what the slave asked for (its level, or the default) if it decodes that, else off.
Compression choose_compression(const Compression& mine, wire::Hello::Reader h);
void set_welcome_compression(wire::Welcome::Builder w, const Compression& session);
// Slave: the session's compression as the welcome names it. Throws Error(EPROTO) naming `who`
// (e.g. "master HOST:PORT") for a codec this node did not offer or a level out of range.
Compression welcome_compression(wire::Welcome::Reader w, const std::string& who);

// Master: sends batches to one slave, compressed as the session says. One per session (it keeps
// a zstd context and a buffer); the byte counters may be read from other threads.
class BatchEncoder {
 public:
  BatchEncoder();
  ~BatchEncoder();
  BatchEncoder(const BatchEncoder&) = delete;
  BatchEncoder& operator=(const BatchEncoder&) = delete;

  // The session's compression (off until called).
  void start(const Compression& c);
  Compression compression() const {
    const int level = level_;
    return {level ? wire::Codec::ZSTD : wire::Codec::NONE, level};
  }

  // `batch` (a Message holding a batch) as a compressedBatch message in `out`: true when it is
  // compressed, false when it should go as it is (compression off, a small batch, or no gain).
  bool encode(capnp::MessageBuilder& batch, capnp::MallocMessageBuilder& out);
  // encode(), then sends whichever message it chose.
  void send(Connection& conn, capnp::MessageBuilder& batch);

  // Bytes of batch messages given to encode(), and of what it chose to send for them.
  uint64_t batch_bytes() const { return batch_bytes_; }
  uint64_t sent_bytes() const { return sent_bytes_; }

 private:
  struct Zstd;
  std::unique_ptr<Zstd> zstd_;
  std::atomic<int> level_{0};  // 0: off
  std::vector<char> out_;      // compressed bytes of the last batch
  std::atomic<uint64_t> batch_bytes_{0}, sent_bytes_{0};
};

// Slave: the frame of the batch a compressedBatch holds (format 1 above), validated like a
// received frame; the decompressed size is at most max_bytes. Throws Error(EPROTO)
// "compressedBatch from master WHO: ..." for anything else (WHO: the master's address).
std::unique_ptr<Frame> decode_compressed_batch(wire::CompressedBatch::Reader in, const std::string& who,
                                               size_t max_bytes = kMaxFrameBytes);
// `frame` unchanged unless it is a compressedBatch, which becomes the frame of its batch; a
// compressedBatch in a session whose welcome named no codec (or another one) is refused.
std::unique_ptr<Frame> expand_batch(std::unique_ptr<Frame> frame, const Compression& session, const std::string& who);

}  // namespace blockrepl
