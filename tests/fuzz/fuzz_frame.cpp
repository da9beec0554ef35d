// fuzz_frame: every message a peer sends, through the real receive and decode paths.
//
// Input: byte 0 chooses the receiver, the rest is the byte stream the peer sends (frames: 4-byte
// little-endian length, Cap'n Proto flat array), written into one end of a socket pair; the code
// under test reads the other end through Connection/FrameAssembler (length prefix, growing
// buffer, limits) and Frame::parse, as on a TCP connection.
//   role 0 (byte 0 % 4): one decoder per message type, as the receivers call them: the hello
//     (check_hello_sizes, then the attach decision), the welcome (Follower::check_welcome_sizes),
//     batches (from_wire of every record, and to_wire/from_wire of what it accepted gives the
//     same record), heartbeats and acks, errors, copyDone, the Merkle messages (paths, NsEntry
//     from_wire, hashes), compressedBatch (decode_compressed_batch, then its batch as above;
//     and every batch of 256 bytes or more is compressed and decoded back to the same bytes).
//     The first frame is limited to kMaxHelloFrameBytes when byte 0 has
//     bit 2 set.
//   role 0 with bit 3 set: the upstream's handshake as its accept thread runs it
//     (HandshakeResponder with a secret, on a non-blocking socket): authHello, authProof (a
//     guessed proof is refused), the hello (check_hello_sizes).
//   role 1: a full copy into an empty volume: CopyReceiver::apply of each copyEntry, finish()
//     at copyDone. Checked: nothing reaches the metadata folder.
//   role 2: the slave side of a Merkle diff (run_merkle_diff with a stage) against a fixed
//     volume; the input is what the master answers.
//   role 3: the master side (serve_merkle_diff) over a fixed volume; the input is what the
//     slave asks.
// Expected refusals are blockrepl::Error or a kj::Exception (a std::exception, as the real
// receivers catch); anything else, and every sanitizer report, is a crash.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <set>
#include <string>

#include "blockrepl/attach.h"
#include "blockrepl/batch_codec.h"
#include "blockrepl/copy.h"
#include "blockrepl/error.h"
#include "blockrepl/follower.h"
#include "blockrepl/handshake.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/merkle.h"
#include "blockrepl/namespace.h"
#include "blockrepl/upstream.h"
#include "blockrepl/wire.h"
#include "fuzz_util.h"

using namespace blockrepl;
using namespace blockrepl::fuzz;

namespace {

const std::string kPeer = "fuzz-peer";

std::vector<LineageEntry> lineage_of(capnp::List<wire::LineageEntry>::Reader in) {
  std::vector<LineageEntry> out;
  for (auto e : in) out.push_back({e.getId(), e.getFirstLsn()});
  return out;
}

// A record accepted by from_wire encodes and decodes to itself.
void check_record_round_trip(const Record& rec) {
  capnp::MallocMessageBuilder mb;
  auto w = mb.initRoot<wire::Record>();
  to_wire(rec, w);
  Record again = from_wire(w.asReader(), false, kPeer);
  FUZZ_CHECK(again.lsn == rec.lsn && again.op == rec.op && again.fid == rec.fid && again.parent == rec.parent &&
             again.parent2 == rec.parent2 && again.name == rec.name && again.name2 == rec.name2 &&
             again.offset == rec.offset && again.length == rec.length && again.mode == rec.mode &&
             again.flags == rec.flags && again.uid == rec.uid && again.gid == rec.gid &&
             again.attr_valid == rec.attr_valid && again.rdev == rec.rdev && again.data == rec.data &&
             again.whiteout_fid == rec.whiteout_fid);
}

void decode_hello(wire::Hello::Reader h) {
  check_hello_sizes(h, kPeer);
  // What Upstream takes from it, then the attach decision (a pure function).
  AttachHello a = hello_of(h);
  (void)choose_compression({wire::Codec::ZSTD, 3}, h);
  (void)choose_compression({}, h);
  (void)h.getListenAddress();
  (void)h.getAckLevel();
  AttachServer s;
  s.node_id = "fuzzmaster";
  s.cluster_id = "c0ffee";
  s.block_size = 4096;
  s.lineage = {{"l1", 1}, {"l2", 100}};
  s.last_lsn = 200;
  s.has_hashes = true;
  s.journal_covers_their_lsn = a.durable_lsn >= 150;
  AttachDecision d = decide_attach(s, a);
  (void)attach_method_name(d.method);
  s.cluster_id.clear();
  decide_attach(s, a);
}

// What the receivers check across a message's parts before using them (list elements may
// share their bytes, so without these a small frame repeats one record or entry millions of
// times): batch LSNs ascend (Follower::apply_batch), a listing names each entry once
// (run_merkle_diff).
Lsn g_last_lsn = 0;

// A batch the receiver accepted, compressed as a master with --compress would send it, decodes
// to the same bytes (the encoder feeds zstd the segments one by one).
void check_batch_compression(wire::Message::Reader msg) {
  static BatchEncoder enc;
  static bool started = false;
  if (!started) enc.start({wire::Codec::ZSTD, 1});
  started = true;
  capnp::MallocMessageBuilder mb;
  mb.setRoot(msg);
  capnp::MallocMessageBuilder out;
  if (!enc.encode(mb, out)) return;
  auto words = capnp::messageToFlatArray(out);
  auto frame = Frame::parse(kj::mv(words), kPeer);
  auto batch = decode_compressed_batch(frame->root().getCompressedBatch(), kPeer);
  auto want = capnp::messageToFlatArray(mb);
  FUZZ_CHECK(batch->words().size() == want.size() &&
             memcmp(batch->words().begin(), want.begin(), want.size() * sizeof(capnp::word)) == 0);
}

void decode_one(wire::Message::Reader msg) {
  switch (msg.which()) {
    case wire::Message::HELLO: decode_hello(msg.getHello()); break;
    case wire::Message::WELCOME: {
      auto w = msg.getWelcome();
      Follower::check_welcome_sizes(w, kPeer);
      (void)w.getProtocolVersion();
      std::string cluster = w.getClusterId();
      std::string notice = w.getNotice();
      auto lineage = lineage_of(w.getLineage());
      (void)w.getMethod();
      (void)w.getStartLsn();
      (void)w.getLastLsn();
      (void)w.getAckLevel();
      (void)welcome_compression(w, kPeer);
      break;
    }
    case wire::Message::BATCH:
      for (auto wr : msg.getBatch().getRecords()) {
        Record rec = from_wire(wr, /*view_data=*/true, kPeer);
        if (rec.lsn <= g_last_lsn) throw Error("lsn out of order", EPROTO);
        g_last_lsn = rec.lsn;
        (void)rec.describe();
        check_record_round_trip(rec);
      }
      check_batch_compression(msg);
      break;
    case wire::Message::COMPRESSED_BATCH: {
      // As Follower::stream takes it (expand_batch): the batch it holds, decoded like a plain one.
      auto batch = decode_compressed_batch(msg.getCompressedBatch(), kPeer);
      FUZZ_CHECK(batch->root().which() == wire::Message::BATCH);
      decode_one(batch->root());
      break;
    }
    case wire::Message::ACK: (void)msg.getAck().getReceivedLsn(); (void)msg.getAck().getDurableLsn(); break;
    case wire::Message::HEARTBEAT: {
      auto l = msg.getHeartbeat().getLineage();
      if (l.size() > 0) check_lineage_sizes(l, kPeer, "heartbeat");
      lineage_of(l);
      break;
    }
    case wire::Message::ERROR: {
      auto err = msg.getError();
      check_field_size(err.getReason().size(), kMaxReasonBytes, "reason", kPeer, "error");
      std::string reason = err.getReason().cStr();
      (void)err.getFatal();
      break;
    }
    case wire::Message::COPY_DONE: {
      auto d = msg.getCopyDone();
      (void)d.getLsn();
      (void)d.getRootMtimeNsec();
      break;
    }
    case wire::Message::DIR_QUERY:
      for (auto p : msg.getDirQuery().getPaths()) {
        check_field_size(p.size(), kMaxPathBytes, "directory path", kPeer, "dirQuery");
        valid_relative_path(std::string(reinterpret_cast<const char*>(p.begin()), p.size()));
      }
      break;
    case wire::Message::DIR_LISTING: {
      auto l = msg.getDirListing();
      check_field_size(l.getPath().size(), kMaxPathBytes, "path", kPeer, "dirListing");
      if (!valid_relative_path(std::string(reinterpret_cast<const char*>(l.getPath().begin()), l.getPath().size()))) break;
      const bool root = l.getPath().size() == 0;
      std::set<std::string> names;
      for (auto we : l.getEntries()) {
        NsEntryInfo e = from_wire(we, root);
        if (!names.insert(e.name).second) throw Error("a name twice", EPROTO);
        (void)entry_hash(e);
      }
      break;
    }
    case wire::Message::HASH_QUERY:
      for (auto it : msg.getHashQuery().getItems()) {
        (void)it.getLevel();
        for (uint64_t i : it.getIndices()) (void)i;
      }
      break;
    case wire::Message::HASH_ANSWER:
      for (auto it : msg.getHashAnswer().getItems()) (void)it.getHashes().size();
      break;
    case wire::Message::BLOCK_REQUEST:
      for (auto it : msg.getBlockRequest().getItems())
        for (uint64_t b : it.getBlocks()) (void)b;
      break;
    case wire::Message::BLOCK_DATA: (void)msg.getBlockData().getData().size(); break;
    case wire::Message::MERKLE_DONE: (void)msg.getMerkleDone().getLsn(); break;
    // Authentication (protocol 4): nothing decodes these yet; raw decoding of every field.
    case wire::Message::AUTH_HELLO: {
      auto a = msg.getAuthHello();
      (void)a.getProtocolVersion();
      (void)a.getNonce().size();
      break;
    }
    case wire::Message::AUTH_CHALLENGE: (void)msg.getAuthChallenge().getNonce().size(); break;
    case wire::Message::AUTH_PROOF: {
      auto p = msg.getAuthProof();
      check_field_size(p.getClusterId().size(), kMaxIdBytes, "cluster id", kPeer, "authProof");
      std::string cluster = p.getClusterId();
      (void)p.getMac().size();
      break;
    }
    default: break;  // copyEntry (role 1), the Void messages, and unknown union members
  }
}

void run_decoders(Connection& conn, bool hello_limit) {
  g_last_lsn = 0;
  if (hello_limit) conn.set_max_frame_bytes(kMaxHelloFrameBytes);
  try {
    for (int frames = 0; frames < 1000; frames++) {
      auto frame = conn.receive(1000);  // throws for a malformed or oversized frame: the end
      if (!frame) return;
      conn.set_max_frame_bytes(kMaxFrameBytes);  // after the first frame, as after a handshake
      try {
        decode_one(frame->root());
      } catch (const std::exception&) {
        // A refused message ends the connection in the real receivers; the next frames here
        // are decoded anyway, to reach more messages per input.
      }
    }
  } catch (const std::exception&) {
  }
}

// Role 1: what Follower::receive_copy does with the frames of a full copy.
void run_copy(Connection& conn) {
  Volume v;
  {
    CopyReceiver rx(*v.store);
    try {
      for (;;) {
        auto frame = conn.receive(1000);
        if (!frame) break;
        auto msg = frame->root();
        if (msg.which() == wire::Message::COPY_ENTRY) {
          rx.apply(msg.getCopyEntry());
        } else if (msg.which() == wire::Message::COPY_DONE) {
          auto d = msg.getCopyDone();
          rx.finish({static_cast<time_t>(d.getRootMtimeSec()), static_cast<long>(d.getRootMtimeNsec())});
          break;
        } else {
          break;
        }
      }
    } catch (const std::exception&) {
    }
  }
  // No path from the peer reaches into the metadata folder: it holds only what the hash index
  // made there.
  for (const DirEntry& e : list_dir(v.meta_fd, false).entries)
    FUZZ_CHECK(e.name == "hashes" || e.name == "dirty-log.0" || e.name == "dirty-log.1");
}

Volume& fixed_volume(int variant) {
  static std::unique_ptr<Volume> vols[2];
  if (!vols[variant]) {
    vols[variant] = std::make_unique<Volume>();
    fill_fixed_volume(*vols[variant], variant);
  }
  return *vols[variant];
}

// Role 2: the slave's side of a Merkle re-attach; what it stages is dropped after.
void run_merkle_slave(Connection& conn) {
  Volume& v = fixed_volume(0);
  Stage stage(v.meta_fd, v.dir.path, /*durable=*/false);
  try {
    stage.begin();
    run_merkle_diff(conn, v.root_fd, *v.hashes, &stage, /*deep=*/false, 1000);
  } catch (const std::exception&) {
  }
  stage.discard();
}

// Role 3: the master's side.
void run_merkle_master(Connection& conn) {
  Volume& v = fixed_volume(1);
  try {
    serve_merkle_diff(conn, v.root_fd, *v.hashes, /*assign_ids=*/false, /*deep=*/false, 1000);
  } catch (const std::exception&) {
  }
}

// Role 0, bit 3: what Upstream's accept thread does with a new connection of a node that has a
// secret. All the input has arrived, so one advance() takes it as far as it goes.
void run_handshake(int fd) {
  static const auto secret = std::make_shared<const Secret>("fuzz-cluster-secret-0123456789");
  PeerSecurity sec;
  sec.secret = secret;
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  try {
    HandshakeResponder h(OwnedFd(fd), kPeer, sec, "fuzz-cluster");
    if (auto hello = h.advance()) check_hello_sizes(hello->root().getHello(), kPeer);
  } catch (const std::exception&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  quiet_logs();
  if (size < 1) return 0;
  const unsigned role = data[0] & 3;
  const bool hello_limit = data[0] & 4;
  int ours, theirs;
  if (!feed_socket(data + 1, size - 1, &ours, &theirs)) return 0;
  if (role == 0 && (data[0] & 8)) {
    run_handshake(ours);  // owns `ours`
    close(theirs);
    return 0;
  }
  {
    Connection conn(ours, kPeer);  // owns `ours`
    switch (role) {
      case 0: run_decoders(conn, hello_limit); break;
      case 1: run_copy(conn); break;
      case 2: run_merkle_slave(conn); break;
      case 3: run_merkle_master(conn); break;
    }
  }
  close(theirs);
  return 0;
}
