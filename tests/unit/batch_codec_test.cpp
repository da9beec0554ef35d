// The batch codec (blockrepl/batch_codec.h): --compress values, the negotiation in hello and
// welcome, the encoder's choice (compress, or send plain when it does not pay), and the decoder's
// refusals of what a broken or hostile master sends.
#include <gtest/gtest.h>

#include <capnp/serialize.h>
#include <zstd.h>

#include <cerrno>
#include <deque>
#include <random>
#include <string>

#include "blockrepl/batch_codec.h"
#include "blockrepl/error.h"

namespace blockrepl {
namespace {

const std::string kMaster = "10.0.0.1:7411";

// A batch of `count` writes of `bytes` each; `text`: compressible (lines of a log), else random.
// to_wire references large payloads instead of copying them (as the master's sender does), so
// the data lives as long as the test process.
std::deque<std::string> g_payloads;
void fill_batch(capnp::MessageBuilder& mb, unsigned count, size_t bytes, bool text, uint32_t seed = 1) {
  auto list = mb.initRoot<wire::Message>().initBatch().initRecords(count);
  std::mt19937 rng(seed);
  for (unsigned i = 0; i < count; i++) {
    Record r;
    r.lsn = 100 + i;
    r.op = Op::write;
    r.fid = 42;
    r.offset = uint64_t{i} * bytes;
    std::string data;
    while (data.size() < bytes) {
      if (text) data += "2024-05-01 12:00:" + std::to_string(rng() % 60) + " INFO request served in " + std::to_string(rng() % 900) + " ms\n";
      else data.push_back(static_cast<char>(rng()));
    }
    data.resize(bytes);
    r.data = g_payloads.emplace_back(std::move(data));
    to_wire(r, list[i]);
  }
}

std::unique_ptr<Frame> frame_of(capnp::MessageBuilder& mb) { return Frame::parse(capnp::messageToFlatArray(mb), "test"); }

std::string flat_bytes(capnp::MessageBuilder& mb) {
  auto words = capnp::messageToFlatArray(mb);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

// The errno and message of what `fn` throws (Error expected).
template <class Fn>
std::pair<int, std::string> refusal(Fn fn) {
  try {
    fn();
  } catch (const Error& e) {
    return {e.errno_value(), e.what()};
  }
  return {0, "nothing thrown"};
}

// A compressedBatch message with the given fields (data as given, not necessarily zstd).
std::unique_ptr<Frame> compressed_frame(uint64_t announced, const std::string& data, wire::Codec codec = wire::Codec::ZSTD) {
  capnp::MallocMessageBuilder mb;
  auto cb = mb.initRoot<wire::Message>().initCompressedBatch();
  cb.setCodec(codec);
  cb.setUncompressedSize(announced);
  cb.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(data.data()), data.size()));
  return frame_of(mb);
}

std::string zstd_of(const std::string& in, bool with_size = true) {
  std::string out(ZSTD_compressBound(in.size()), '\0');
  ZSTD_CCtx* c = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, with_size ? 1 : 0);
  size_t n;
  if (with_size) {
    n = ZSTD_compress2(c, out.data(), out.size(), in.data(), in.size());
  } else {
    // Streamed without a pledged size: the frame does not announce it.
    ZSTD_outBuffer ob{out.data(), out.size(), 0};
    ZSTD_inBuffer ib{in.data(), in.size(), 0};
    n = ZSTD_compressStream2(c, &ob, &ib, ZSTD_e_end);
    EXPECT_EQ(n, 0u);
    n = ob.pos;
  }
  ZSTD_freeCCtx(c);
  EXPECT_FALSE(ZSTD_isError(n));
  out.resize(n);
  return out;
}

TEST(BatchCodec, ParsesCompressOption) {
  std::string why;
  EXPECT_EQ(parse_compression("zstd", &why), (Compression{wire::Codec::ZSTD, kDefaultZstdLevel}));
  EXPECT_EQ(parse_compression("zstd:1", &why), (Compression{wire::Codec::ZSTD, 1}));
  EXPECT_EQ(parse_compression("zstd:19", &why), (Compression{wire::Codec::ZSTD, 19}));
  EXPECT_EQ(parse_compression("off", &why), Compression{});
  for (const char* bad : {"zstd:0", "zstd:20", "zstd:", "zstd:3x", "zstd:-1", "lz4", "ZSTD", "", "zstd:+3", "zstd:99999999999"}) {
    why.clear();
    EXPECT_FALSE(parse_compression(bad, &why)) << bad;
    EXPECT_NE(why.find(std::string("(got '") + bad + "')"), std::string::npos) << why;
  }
  EXPECT_EQ(compression_name({wire::Codec::ZSTD, 7}), "zstd:7");
  EXPECT_EQ(compression_name({}), "off");
}

TEST(BatchCodec, Negotiation) {
  auto hello_with = [](const Compression& asked, bool lists_zstd, int raw_level = -1) {
    auto mb = std::make_unique<capnp::MallocMessageBuilder>();
    auto h = mb->initRoot<wire::Hello>();
    if (lists_zstd) offer_compression(h, asked);
    if (raw_level >= 0) h.setCompressLevel(raw_level);
    return mb;
  };
  const Compression zstd9{wire::Codec::ZSTD, 9};
  // The master's own --compress wins; the slave's wish applies when the master has none.
  EXPECT_EQ(choose_compression(zstd9, hello_with({}, true)->getRoot<wire::Hello>()), zstd9);
  EXPECT_EQ(choose_compression({}, hello_with({wire::Codec::ZSTD, 5}, true)->getRoot<wire::Hello>()),
            (Compression{wire::Codec::ZSTD, 5}));
  EXPECT_EQ(choose_compression(zstd9, hello_with({wire::Codec::ZSTD, 5}, true)->getRoot<wire::Hello>()), zstd9);
  EXPECT_EQ(choose_compression({}, hello_with({}, true)->getRoot<wire::Hello>()), Compression{});
  // A level out of range from the slave gets the default; a slave that lists no codec gets none.
  EXPECT_EQ(choose_compression({}, hello_with({wire::Codec::ZSTD, 5}, true, 99)->getRoot<wire::Hello>()),
            (Compression{wire::Codec::ZSTD, kDefaultZstdLevel}));
  EXPECT_EQ(choose_compression(zstd9, hello_with({}, false)->getRoot<wire::Hello>()), Compression{});

  capnp::MallocMessageBuilder mb;
  auto w = mb.initRoot<wire::Welcome>();
  set_welcome_compression(w, zstd9);
  EXPECT_EQ(welcome_compression(w.asReader(), "master x"), zstd9);
  set_welcome_compression(w, {});
  EXPECT_EQ(welcome_compression(w.asReader(), "master x"), Compression{});
  w.setCodec(static_cast<wire::Codec>(7));
  auto [err, what] = refusal([&] { welcome_compression(w.asReader(), "master x"); });
  EXPECT_EQ(err, EPROTO);
  EXPECT_NE(what.find("master x chose codec 7"), std::string::npos) << what;
  w.setCodec(wire::Codec::ZSTD);
  w.setCodecLevel(0);
  EXPECT_EQ(refusal([&] { welcome_compression(w.asReader(), "master x"); }).first, EPROTO);
}

TEST(BatchCodec, RoundTripGivesTheSameMessage) {
  capnp::MallocMessageBuilder batch;
  fill_batch(batch, 16, 64 << 10, true);
  BatchEncoder enc;
  enc.start({wire::Codec::ZSTD, 3});
  capnp::MallocMessageBuilder out;
  ASSERT_TRUE(enc.encode(batch, out));
  const std::string original = flat_bytes(batch);
  EXPECT_EQ(enc.batch_bytes(), original.size());
  EXPECT_EQ(enc.sent_bytes(), flat_bytes(out).size());
  EXPECT_LT(enc.sent_bytes() * 4, enc.batch_bytes()) << "log lines compress well";

  auto decoded = expand_batch(frame_of(out), enc.compression(), kMaster);
  ASSERT_EQ(decoded->root().which(), wire::Message::BATCH);
  auto w = decoded->words().asBytes();
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(w.begin()), w.size()), original);
  auto recs = decoded->root().getBatch().getRecords();
  ASSERT_EQ(recs.size(), 16u);
  EXPECT_EQ(from_wire(recs[15], false, kMaster).lsn, 115u);

  // A batch in several segments (built piece by piece) comes back the same as well.
  capnp::MallocMessageBuilder multi(16);
  fill_batch(multi, 40, 3000, true, 7);
  ASSERT_GT(multi.getSegmentsForOutput().size(), 1u);
  capnp::MallocMessageBuilder out2;
  ASSERT_TRUE(enc.encode(multi, out2));
  auto f2 = expand_batch(frame_of(out2), enc.compression(), kMaster);
  auto w2 = f2->words().asBytes();
  const std::string got2(reinterpret_cast<const char*>(w2.begin()), w2.size()), want2 = flat_bytes(multi);
  ASSERT_EQ(got2.size(), want2.size());
  size_t k = 0;
  while (k < got2.size() && got2[k] == want2[k]) k++;
  EXPECT_EQ(k, got2.size()) << "first difference at byte " << k << " of " << got2.size() << "; segments "
                            << multi.getSegmentsForOutput().size();
}

TEST(BatchCodec, SendsPlainWhenItDoesNotPay) {
  BatchEncoder enc;
  capnp::MallocMessageBuilder out;
  {
    capnp::MallocMessageBuilder text;
    fill_batch(text, 4, 4096, true);
    EXPECT_FALSE(enc.encode(text, out)) << "compression is off until start()";
  }
  enc.start({wire::Codec::ZSTD, 3});
  {
    // A barrier alone: under kMinCompressedBatchBytes.
    capnp::MallocMessageBuilder small;
    auto list = small.initRoot<wire::Message>().initBatch().initRecords(1);
    Record r;
    r.lsn = 5;
    r.op = Op::fsync;
    to_wire(r, list[0]);
    ASSERT_LT(flat_bytes(small).size(), kMinCompressedBatchBytes);
    EXPECT_FALSE(enc.encode(small, out));
  }
  {
    capnp::MallocMessageBuilder random;
    fill_batch(random, 4, 64 << 10, false);
    const uint64_t before = enc.sent_bytes();
    EXPECT_FALSE(enc.encode(random, out)) << "random data does not shrink";
    EXPECT_EQ(enc.sent_bytes() - before, flat_bytes(random).size());
  }
  EXPECT_EQ(enc.batch_bytes(), enc.sent_bytes());
  // A plain batch passes through a compressed session unchanged.
  capnp::MallocMessageBuilder plain;
  fill_batch(plain, 1, 100, true);
  auto f = expand_batch(frame_of(plain), enc.compression(), kMaster);
  EXPECT_EQ(f->root().which(), wire::Message::BATCH);
  EXPECT_EQ(expand_batch(nullptr, enc.compression(), kMaster), nullptr);
}

TEST(BatchCodec, RefusesCorruptInput) {
  capnp::MallocMessageBuilder batch;
  fill_batch(batch, 8, 8192, true);
  const std::string flat = flat_bytes(batch);
  const std::string good = zstd_of(flat);
  const Compression session{wire::Codec::ZSTD, 3};
  ASSERT_EQ(expand_batch(compressed_frame(flat.size(), good), session, kMaster)->root().which(), wire::Message::BATCH);

  auto refused = [&](std::unique_ptr<Frame> f, const std::string& words, const Compression& s = {wire::Codec::ZSTD, 3}) {
    auto [err, what] = refusal([&] { expand_batch(std::move(f), s, kMaster); });
    EXPECT_EQ(err, EPROTO) << what;
    // "compressedBatch from master M: ..." or, for bytes that are not a message, "malformed
    // message from master M (in a compressedBatch): ...".
    EXPECT_NE(what.find("master " + kMaster), std::string::npos) << what;
    EXPECT_NE(what.find("compressedBatch"), std::string::npos) << what;
    EXPECT_NE(what.find(words), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << "one line";
  };
  // Bytes flipped in the compressed blocks (past the frame header).
  std::string flipped = good;
  for (size_t i = 20; i < flipped.size(); i += 7) flipped[i] ^= 0x5a;
  refused(compressed_frame(flat.size(), flipped), "");
  refused(compressed_frame(flat.size(), good.substr(0, good.size() / 2)), "cannot decompress");
  refused(compressed_frame(flat.size(), "not zstd at all, just text"), "not a zstd frame");
  refused(compressed_frame(flat.size(), zstd_of(flat, false)), "does not announce its size");
  // The announced size disagrees with the zstd frame's, or is not a whole number of words.
  refused(compressed_frame(flat.size() + 8, good), "the message announces");
  refused(compressed_frame(flat.size() - 3, good), "multiple of 8");
  refused(compressed_frame(0, good), "announces 0 bytes");
  // A frame that holds more or fewer bytes than it announces (two frames glued together).
  refused(compressed_frame(flat.size(), good + good), "cannot decompress");
  // Decompressed bytes that are not a Cap'n Proto message, or not a batch.
  const std::string junk(4096, 'x');
  refused(compressed_frame(junk.size(), zstd_of(junk)), "malformed message");
  capnp::MallocMessageBuilder hb;
  auto lineage = hb.initRoot<wire::Message>().initHeartbeat().initLineage(40);
  for (unsigned i = 0; i < 40; i++) lineage[i].setId("lineage-" + std::to_string(i));
  refused(compressed_frame(flat_bytes(hb).size(), zstd_of(flat_bytes(hb))), "does not hold a batch");
  // An unknown codec; a compressedBatch in a session whose welcome named none.
  refused(compressed_frame(flat.size(), good, static_cast<wire::Codec>(9)), "codec");
  refused(compressed_frame(flat.size(), good), "session's codec is off", Compression{});
}

TEST(BatchCodec, RefusesAnOversizedAnnouncementBeforeAllocating) {
  // 16 TiB would fail to allocate (std::bad_alloc, not Error): an EPROTO naming the size shows
  // that the check comes first.
  const std::string tiny = zstd_of(std::string(64, '\0'));
  for (uint64_t announced : {uint64_t{kMaxFrameBytes} + 8, uint64_t{1} << 44, ~uint64_t{0} & ~uint64_t{7}}) {
    auto f = compressed_frame(announced, tiny);
    auto [err, what] = refusal([&] { decode_compressed_batch(f->root().getCompressedBatch(), kMaster); });
    EXPECT_EQ(err, EPROTO);
    EXPECT_NE(what.find("announces " + std::to_string(announced) + " bytes"), std::string::npos) << what;
  }
  // A limit below the frame limit applies the same way.
  capnp::MallocMessageBuilder batch;
  fill_batch(batch, 2, 4096, true);
  const std::string flat = flat_bytes(batch);
  auto f = compressed_frame(flat.size(), zstd_of(flat));
  EXPECT_EQ(refusal([&] { decode_compressed_batch(f->root().getCompressedBatch(), kMaster, flat.size() - 8); }).first, EPROTO);
  EXPECT_EQ(decode_compressed_batch(f->root().getCompressedBatch(), kMaster, flat.size())->root().which(), wire::Message::BATCH);
}

}  // namespace
}  // namespace blockrepl
