#include "blockrepl/batch_codec.h"

#include <endian.h>
#include <zstd.h>

#include <cerrno>
#include <charconv>

#include "blockrepl/error.h"

namespace blockrepl {

namespace {

[[noreturn]] void refuse(const std::string& master, const std::string& why) {
  throw Error("compressedBatch from master " + master + ": " + why, EPROTO);
}

bool decodes(wire::Codec c) { return c == wire::Codec::ZSTD; }

bool level_ok(int level) { return level >= kMinZstdLevel && level <= kMaxZstdLevel; }

}  // namespace

std::optional<Compression> parse_compression(const std::string& text, std::string* why) {
  if (text == "off") return Compression{};
  const std::string prefix = "zstd";
  if (text == prefix) return Compression{wire::Codec::ZSTD, kDefaultZstdLevel};
  if (text.rfind(prefix + ":", 0) == 0) {
    const char* begin = text.data() + prefix.size() + 1;
    const char* end = text.data() + text.size();
    int level = 0;
    auto [p, ec] = std::from_chars(begin, end, level);
    if (ec == std::errc() && p == end && begin != end && level_ok(level)) return Compression{wire::Codec::ZSTD, level};
  }
  *why = "must be zstd, zstd:LEVEL with LEVEL from " + std::to_string(kMinZstdLevel) + " to " + std::to_string(kMaxZstdLevel) +
         ", or off (got '" + text + "')";
  return std::nullopt;
}

std::string compression_name(const Compression& c) {
  return c.on() ? "zstd:" + std::to_string(c.level) : "off";
}

void offer_compression(wire::Hello::Builder h, const Compression& asked) {
  h.initCodecs(1).set(0, wire::Codec::ZSTD);
  h.setCompress(asked.codec);
  h.setCompressLevel(asked.on() ? asked.level : 0);
}

Compression choose_compression(const Compression& mine, wire::Hello::Reader h) {
  bool slave_decodes_zstd = false;
  for (auto c : h.getCodecs()) slave_decodes_zstd |= c == wire::Codec::ZSTD;
  if (!slave_decodes_zstd) return {};
  if (mine.on()) return mine;
  if (h.getCompress() != wire::Codec::ZSTD) return {};
  // The level is the slave's wish; the CPU is the master's, so an odd value gets the default.
  const int asked = h.getCompressLevel();
  return {wire::Codec::ZSTD, level_ok(asked) ? asked : kDefaultZstdLevel};
}

void set_welcome_compression(wire::Welcome::Builder w, const Compression& session) {
  w.setCodec(session.codec);
  w.setCodecLevel(session.on() ? session.level : 0);
}

Compression welcome_compression(wire::Welcome::Reader w, const std::string& who) {
  const wire::Codec c = w.getCodec();
  if (c == wire::Codec::NONE) return {};
  if (!decodes(c))
    throw Error(who + " chose codec " + std::to_string(static_cast<unsigned>(c)) + " for the stream, which this node did not offer",
                EPROTO);
  if (!level_ok(w.getCodecLevel()))
    throw Error(who + " announced zstd level " + std::to_string(w.getCodecLevel()) + " (must be " + std::to_string(kMinZstdLevel) +
                    ".." + std::to_string(kMaxZstdLevel) + ")",
                EPROTO);
  return {c, w.getCodecLevel()};
}

// ---- encoder ------------------------------------------------------------------------------------

struct BatchEncoder::Zstd {
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ~Zstd() { ZSTD_freeCCtx(cctx); }
};

BatchEncoder::BatchEncoder() = default;
BatchEncoder::~BatchEncoder() = default;

void BatchEncoder::start(const Compression& c) {
  if (!c.on()) {
    level_ = 0;
    return;
  }
  if (!zstd_) zstd_ = std::make_unique<Zstd>();
  if (!zstd_->cctx) throw Error("cannot create a zstd compression context", ENOMEM);
  ZSTD_CCtx_reset(zstd_->cctx, ZSTD_reset_session_and_parameters);
  size_t r = ZSTD_CCtx_setParameter(zstd_->cctx, ZSTD_c_compressionLevel, c.level);
  if (!ZSTD_isError(r)) r = ZSTD_CCtx_setParameter(zstd_->cctx, ZSTD_c_contentSizeFlag, 1);
  if (ZSTD_isError(r)) throw Error(std::string("cannot set up zstd: ") + ZSTD_getErrorName(r), EINVAL);
  level_ = c.level;
}

bool BatchEncoder::encode(capnp::MessageBuilder& batch, capnp::MallocMessageBuilder& out) {
  // The flat-array form, as Connection::send writes it: a segment table (count-1, sizes, padded
  // to 8 bytes), then the segments; fed to zstd piece by piece rather than copied into one array.
  auto segments = batch.getSegmentsForOutput();
  const size_t nseg = segments.size();
  std::vector<uint32_t> table((nseg + 2) & ~size_t{1}, 0);
  table[0] = htole32(static_cast<uint32_t>(nseg - 1));
  size_t n = table.size() * sizeof(uint32_t);
  for (size_t i = 0; i < nseg; i++) {
    table[i + 1] = htole32(static_cast<uint32_t>(segments[i].size()));
    n += segments[i].size() * sizeof(capnp::word);
  }
  batch_bytes_ += n;
  if (!level_ || n < kMinCompressedBatchBytes) {
    sent_bytes_ += n;
    return false;
  }
  ZSTD_CCtx* cctx = zstd_->cctx;
  ZSTD_CCtx_reset(cctx, ZSTD_reset_session_only);
  // The frame header then carries the content size, which the receiver checks before it
  // allocates.
  ZSTD_CCtx_setPledgedSrcSize(cctx, n);
  out_.resize(ZSTD_compressBound(n));
  ZSTD_outBuffer ob{out_.data(), out_.size(), 0};
  auto feed = [&](const void* p, size_t len, ZSTD_EndDirective end) {
    ZSTD_inBuffer ib{p, len, 0};
    for (;;) {
      size_t left = ZSTD_compressStream2(cctx, &ob, &ib, end);
      if (ZSTD_isError(left)) throw Error(std::string("zstd compression of a batch failed: ") + ZSTD_getErrorName(left), EIO);
      if (end == ZSTD_e_end ? left == 0 : ib.pos == ib.size) return;
    }
  };
  feed(table.data(), table.size() * sizeof(uint32_t), ZSTD_e_continue);
  for (auto& seg : segments) feed(seg.begin(), seg.size() * sizeof(capnp::word), ZSTD_e_continue);
  feed(nullptr, 0, ZSTD_e_end);
  auto cb = out.initRoot<wire::Message>().initCompressedBatch();
  cb.setCodec(wire::Codec::ZSTD);
  cb.setUncompressedSize(n);
  cb.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(out_.data()), ob.pos));
  const size_t wire_bytes = capnp::computeSerializedSizeInWords(out) * sizeof(capnp::word);
  if (wire_bytes >= n) {
    sent_bytes_ += n;
    return false;  // incompressible (already compressed or encrypted data)
  }
  sent_bytes_ += wire_bytes;
  return true;
}

void BatchEncoder::send(Connection& conn, capnp::MessageBuilder& batch) {
  capnp::MallocMessageBuilder compressed;
  if (encode(batch, compressed)) conn.send(compressed);
  else conn.send(batch);
}

// ---- decoder ------------------------------------------------------------------------------------

std::unique_ptr<Frame> decode_compressed_batch(wire::CompressedBatch::Reader in, const std::string& who, size_t max_bytes) {
  if (in.getCodec() != wire::Codec::ZSTD)
    refuse(who, "codec " + std::to_string(static_cast<unsigned>(in.getCodec())) + " is not one this node decodes");
  const uint64_t n = in.getUncompressedSize();
  // Checked before anything is allocated: the size is the peer's word.
  if (n < sizeof(capnp::word) || n % sizeof(capnp::word) != 0 || n > max_bytes)
    refuse(who, "announces " + std::to_string(n) + " bytes (must be a multiple of 8 up to " + std::to_string(max_bytes) + ")");
  auto data = in.getData();
  const unsigned long long framed = ZSTD_getFrameContentSize(data.begin(), data.size());
  if (framed == ZSTD_CONTENTSIZE_ERROR) refuse(who, "its data is not a zstd frame");
  if (framed == ZSTD_CONTENTSIZE_UNKNOWN) refuse(who, "its zstd frame does not announce its size");
  if (framed != n)
    refuse(who, "its zstd frame holds " + std::to_string(framed) + " bytes, the message announces " + std::to_string(n));
  // One context per receiving thread: a slave's stream is read by one thread at a time.
  struct DCtx {
    ZSTD_DCtx* p = ZSTD_createDCtx();
    ~DCtx() { ZSTD_freeDCtx(p); }
  };
  thread_local DCtx dctx;
  if (!dctx.p) throw Error("cannot create a zstd decompression context", ENOMEM);
  auto words = kj::heapArray<capnp::word>(n / sizeof(capnp::word));
  // The destination is exactly n bytes: a frame that holds more fails, one that holds less
  // returns less.
  const size_t got = ZSTD_decompressDCtx(dctx.p, words.begin(), n, data.begin(), data.size());
  if (ZSTD_isError(got)) refuse(who, std::string("cannot decompress it: ") + ZSTD_getErrorName(got));
  if (got != n) refuse(who, "it decompressed to " + std::to_string(got) + " bytes, not the " + std::to_string(n) + " announced");
  auto frame = Frame::parse(kj::mv(words), "master " + who + " (in a compressedBatch)");
  if (frame->root().which() != wire::Message::BATCH) refuse(who, "it does not hold a batch");
  return frame;
}

std::unique_ptr<Frame> expand_batch(std::unique_ptr<Frame> frame, const Compression& session, const std::string& who) {
  if (!frame || frame->root().which() != wire::Message::COMPRESSED_BATCH) return frame;
  auto cb = frame->root().getCompressedBatch();
  if (!session.on() || cb.getCodec() != session.codec)
    refuse(who, "the session's codec is " + compression_name(session) + " (the welcome said so)");
  return decode_compressed_batch(cb, who);
}

}  // namespace blockrepl
