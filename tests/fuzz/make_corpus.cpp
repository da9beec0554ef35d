// Writes the seed corpus of every fuzz target (tests/fuzz/corpus/<target>/) from the real
// encoders and writers: frames of each message type, a full copy and both directions of a Merkle
// diff recorded between two fixed volumes (fuzz_util.h), NsEntry messages and tree-building
// programs, saved hash trees (formats 2 and 1), dirty-region logs, a committed stage, identity
// and replica state files. Usage: fuzz_make_corpus <corpus dir> (tools/fuzz.sh --make-corpus).
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <capnp/serialize.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "blockrepl/batch_codec.h"
#include "blockrepl/copy.h"
#include "blockrepl/error.h"
#include "blockrepl/hash_tree.h"
#include "blockrepl/merkle.h"
#include "blockrepl/metadata.h"
#include "blockrepl/namespace.h"
#include "blockrepl/replica_state.h"
#include "blockrepl/wire.h"
#include "fuzz_util.h"

using namespace blockrepl;
using namespace blockrepl::fuzz;

namespace {

std::string g_out;

void put(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::string dir = g_out + "/" + target;
  std::filesystem::create_directories(dir);
  FILE* f = fopen((dir + "/" + name).c_str(), "wb");
  if (!f || fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) {
    perror(name.c_str());
    exit(1);
  }
  fclose(f);
  printf("%s/%s: %zu bytes\n", target.c_str(), name.c_str(), bytes.size());
}

std::string flat(capnp::MessageBuilder& mb) {
  auto words = capnp::messageToFlatArray(mb);
  return std::string(reinterpret_cast<const char*>(words.asBytes().begin()), words.asBytes().size());
}

std::string u16(unsigned v) { return std::string{static_cast<char>(v & 0xff), static_cast<char>(v >> 8)}; }

// Collects everything written into a socket until the writer closes it.
struct Sink {
  int fds[2];
  std::string got;
  std::thread reader;
  Sink() {
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds);
    reader = std::thread([this] {
      char buf[65536];
      for (ssize_t n; (n = read(fds[1], buf, sizeof buf)) > 0;) got.append(buf, static_cast<size_t>(n));
    });
  }
  std::string finish() {
    reader.join();
    close(fds[1]);
    return got;
  }
};

// A Merkle diff between a master and a slave volume through a relay that records both directions.
struct Recorded {
  std::string to_slave, to_master;
};
Recorded record_merkle(Volume& master, Volume& slave, Stage* stage) {
  int m[2], s[2];
  socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, m);
  socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, s);
  Recorded rec;
  std::thread relay([&] {
    bool m_open = true, s_open = true;
    char buf[65536];
    while (m_open || s_open) {
      pollfd p[2] = {{m_open ? m[1] : -1, POLLIN, 0}, {s_open ? s[1] : -1, POLLIN, 0}};
      poll(p, 2, -1);
      if (p[0].revents) {
        ssize_t n = read(m[1], buf, sizeof buf);
        if (n <= 0) {
          m_open = false;
          shutdown(s[1], SHUT_WR);
        } else {
          rec.to_slave.append(buf, static_cast<size_t>(n));
          if (write(s[1], buf, static_cast<size_t>(n)) != n) abort();
        }
      }
      if (p[1].revents) {
        ssize_t n = read(s[1], buf, sizeof buf);
        if (n <= 0) {
          s_open = false;
          shutdown(m[1], SHUT_WR);
        } else {
          rec.to_master.append(buf, static_cast<size_t>(n));
          if (write(m[1], buf, static_cast<size_t>(n)) != n) abort();
        }
      }
    }
  });
  std::thread serve([&] {
    Connection c(m[0], "slave");
    try {
      serve_merkle_diff(c, master.root_fd, *master.hashes, false, false, 5000);
    } catch (const std::exception& e) {
      fprintf(stderr, "master: %s\n", e.what());
    }
  });
  {
    Connection c(s[0], "master");
    DiffReport r = run_merkle_diff(c, slave.root_fd, *slave.hashes, stage, false, 5000);
    printf("recorded Merkle diff: %zu differences, %u round trips\n", r.differences.size(), r.round_trips);
  }
  serve.join();
  relay.join();
  close(m[1]);
  close(s[1]);
  return rec;
}

Record record(Op op, Lsn lsn, FileId fid) {
  Record r;
  r.op = op;
  r.lsn = lsn;
  r.fid = fid;
  return r;
}

std::vector<Record> sample_records() {
  std::vector<Record> v;
  Record c = record(Op::create, 11, 0x2001);
  c.parent = kFixedDir;
  c.name = "new";
  c.mode = S_IFREG | 0644;
  c.attr_valid = kAttrStampDirs;
  c.dir_mtime = {1700000001, 5};
  v.push_back(c);
  Record w = record(Op::write, 12, 0x2001);
  w.data = "some data";
  w.offset = 4090;
  v.push_back(w);
  Record mk = record(Op::mkdir, 13, 0x2002);
  mk.parent = kRootFileId;
  mk.name = "sub";
  mk.mode = S_IFDIR | 0755;
  v.push_back(mk);
  Record rn = record(Op::rename, 14, kFixedB);
  rn.parent = kRootFileId;
  rn.name = "b";
  rn.parent2 = 0x2002;
  rn.name2 = "b2";
  v.push_back(rn);
  Record x = record(Op::setxattr, 15, kFixedA);
  x.name = "user.k";
  x.data = "value";
  v.push_back(x);
  Record sl = record(Op::symlink, 16, 0x2003);
  sl.parent = kFixedDir;
  sl.name = "ln";
  sl.data = "../b";
  v.push_back(sl);
  Record t = record(Op::truncate, 17, kFixedA);
  t.offset = 100;
  v.push_back(t);
  Record sa = record(Op::setattr, 18, kFixedA);
  sa.attr_valid = kAttrMode | kAttrMtime;
  sa.mode = 0600;
  sa.mtime = {1700000002, 7};
  v.push_back(sa);
  Record u = record(Op::unlink, 19, 0x2003);
  u.parent = kFixedDir;
  u.name = "ln";
  v.push_back(u);
  Record punch = record(Op::fallocate, 19, kFixedA);
  punch.flags = 3;  // FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
  punch.offset = 4096;
  punch.length = 4096;
  v.push_back(punch);
  Record prealloc = record(Op::fallocate, 19, kFixedB);
  prealloc.length = 8192;
  v.push_back(prealloc);
  v.push_back(record(Op::fsync, 20, kInvalidFileId));
  return v;
}

void set_lineage(capnp::List<wire::LineageEntry>::Builder l) {
  l[0].setId("l1");
  l[0].setFirstLsn(1);
  l[1].setId("l2");
  l[1].setFirstLsn(100);
}

std::string hello_frame() {
  capnp::MallocMessageBuilder mb;
  auto h = mb.initRoot<wire::Message>().initHello();
  h.setProtocolVersion(kProtocolVersion);
  h.setClusterId("c0ffee");
  h.setNodeId("slave1");
  h.setBlockSize(4096);
  h.setHashAlgorithm(kHashAlgorithm);
  set_lineage(h.initLineage(2));
  h.setDurableLsn(150);
  h.setAckLevel(wire::AckLevel::SYNC);
  h.setListenAddress("127.0.0.1:7001");
  offer_compression(h, {wire::Codec::ZSTD, 3});
  return frame_bytes(mb);
}

std::string welcome_frame() {
  capnp::MallocMessageBuilder mb;
  auto w = mb.initRoot<wire::Message>().initWelcome();
  w.setProtocolVersion(kProtocolVersion);
  w.setClusterId("c0ffee");
  w.setNodeId("master");
  w.setBlockSize(4096);
  set_lineage(w.initLineage(2));
  w.setMethod(wire::AttachMethod::MERKLE);
  w.setStartLsn(10);
  w.setLastLsn(20);
  w.setNotice("a notice");
  set_welcome_compression(w, {wire::Codec::ZSTD, 3});
  return frame_bytes(mb);
}

std::string batch_frame() {
  capnp::MallocMessageBuilder mb;
  auto recs = sample_records();
  auto l = mb.initRoot<wire::Message>().initBatch().initRecords(static_cast<unsigned>(recs.size()));
  for (unsigned i = 0; i < recs.size(); i++) to_wire(recs[i], l[i]);
  return frame_bytes(mb);
}

// The sample batch as a master with --compress sends it (batch_codec.h).
std::string compressed_batch_frame() {
  capnp::MallocMessageBuilder mb;
  auto recs = sample_records();
  auto l = mb.initRoot<wire::Message>().initBatch().initRecords(static_cast<unsigned>(recs.size()));
  for (unsigned i = 0; i < recs.size(); i++) to_wire(recs[i], l[i]);
  BatchEncoder enc;
  enc.start({wire::Codec::ZSTD, 1});
  capnp::MallocMessageBuilder out;
  if (!enc.encode(mb, out)) {
    fprintf(stderr, "make_corpus: the sample batch did not compress\n");
    exit(1);
  }
  return frame_bytes(out);
}

void frame_corpus(Volume& master, Volume& slave) {
  const std::string T = "fuzz_frame";
  put(T, "hello", std::string(1, '\x04') + hello_frame());
  put(T, "welcome", std::string(1, '\x04') + welcome_frame());
  put(T, "batch", std::string(1, '\0') + batch_frame());
  put(T, "compressed_batch", std::string(1, '\0') + compressed_batch_frame());
  std::string misc(1, '\0');
  {
    capnp::MallocMessageBuilder mb;
    auto h = mb.initRoot<wire::Message>().initHeartbeat();
    h.setLsn(20);
    set_lineage(h.initLineage(2));
    misc += frame_bytes(mb);
  }
  {
    capnp::MallocMessageBuilder mb;
    auto a = mb.initRoot<wire::Message>().initAck();
    a.setReceivedLsn(20);
    a.setDurableLsn(19);
    misc += frame_bytes(mb);
  }
  {
    capnp::MallocMessageBuilder mb;
    auto e = mb.initRoot<wire::Message>().initError();
    e.setReason("cluster id mismatch");
    e.setFatal(true);
    misc += frame_bytes(mb);
  }
  {
    capnp::MallocMessageBuilder mb;
    auto d = mb.initRoot<wire::Message>().initCopyDone();
    d.setLsn(5);
    d.setFiles(3);
    d.setRootMtimeSec(1700000000);
    misc += frame_bytes(mb);
  }
  {
    capnp::MallocMessageBuilder mb;
    mb.initRoot<wire::Message>().initMerkleDone().setLsn(30);
    misc += frame_bytes(mb);
  }
  put(T, "heartbeat_ack_error_done", misc);
  // Authentication (protocol 4): authHello, authChallenge, authProof, then the hello.
  std::string auth(1, '\x04');
  const std::string nonce(32, 'n');
  const auto nb = kj::arrayPtr(reinterpret_cast<const kj::byte*>(nonce.data()), nonce.size());
  {
    capnp::MallocMessageBuilder mb;
    auto a = mb.initRoot<wire::Message>().initAuthHello();
    a.setProtocolVersion(kProtocolVersion);
    a.setNonce(nb);
    auth += frame_bytes(mb);
  }
  {
    capnp::MallocMessageBuilder mb;
    mb.initRoot<wire::Message>().initAuthChallenge().setNonce(nb);
    auth += frame_bytes(mb);
  }
  {
    capnp::MallocMessageBuilder mb;
    auto p = mb.initRoot<wire::Message>().initAuthProof();
    p.setClusterId("c0ffee");
    p.setMac(nb);
    auth += frame_bytes(mb);
  }
  put(T, "auth_then_hello", auth + hello_frame());

  // A full copy of the master volume, as send_full_copy sends it, then copyDone.
  {
    Sink sink;
    {
      Connection c(sink.fds[0], "slave");
      send_full_copy(c, master.root_fd, false);
      capnp::MallocMessageBuilder mb;
      auto d = mb.initRoot<wire::Message>().initCopyDone();
      d.setLsn(5);
      d.setRootMtimeSec(1700000000);
      d.setRootMtimeNsec(9);
      c.send(mb);
    }
    put(T, "copy", std::string(1, '\x01') + sink.finish());
  }
  // Both directions of a Merkle diff: role 2 replays the master's answers to the slave, role 3
  // the slave's questions to the master.
  Recorded r = record_merkle(master, slave, nullptr);
  put(T, "merkle_to_slave", std::string(1, '\x02') + r.to_slave);
  put(T, "merkle_to_master", std::string(1, '\x03') + r.to_master);
  // The same messages through the stateless decoders of role 0.
  put(T, "merkle_messages", std::string(1, '\0') + r.to_master + r.to_slave);
}

void namespace_corpus(Volume& master) {
  const std::string T = "fuzz_namespace";
  const NamespaceSnapshot snap = NamespaceSnapshot::take(master.root_fd, *master.hashes, false);
  int i = 0;
  for (const char* dir : {"", "dir"}) {
    for (const NsEntryInfo& e : snap.dir(dir)->entries) {
      capnp::MallocMessageBuilder mb;
      to_wire(e, mb.initRoot<wire::NsEntry>());
      put(T, "entry_" + std::to_string(i++), std::string(1, '\0') + flat(mb));
    }
  }
  // Tree-building programs (fuzz_namespace.cpp): opcode, directory, then the op's arguments.
  // mkdir "dir"; a file in it; a symlink; a user xattr; a fifo; a hard link; times.
  std::string prog;
  prog += std::string("\x00\x00", 2) + "\xfd";                 // mkdir "dir" (name 0xfd: special[5])
  prog += std::string("\x01\x01", 2) + "\x04" "name" + "\x05\x01";  // file "name" in dir 1, 305 bytes at 5000
  prog += std::string("\x02\x00", 2) + "\x02ln" + "\x01" + std::string(17, 't');
  prog += std::string("\x04\x00\x01", 3) + "\x03" "abc" "\x02" + "vvvvvv";
  prog += std::string("\x03\x01", 2) + "\x04" "fifo" + std::string(1, '\0');
  prog += std::string("\x06\x00\x01", 3) + "\x05hardl";
  prog += std::string("\x07\x00\x00", 3) + "\x10\x20\x30\x40\x07";
  put(T, "tree", std::string(1, '\x01') + prog);
  // The same with ids assigned by the walk, and with ids of odd lengths set by the program.
  put(T, "tree_assign", std::string(1, '\x03') + prog);
  std::string ids = prog + std::string("\x05\x00\x00", 3) + "\x08" + std::string("\x01\0\0\0\0\0\0\0", 8);
  ids += std::string("\x05\x00\x01", 3) + "\x03" + "abc";
  ids += std::string("\x00\x01", 2) + "\xf8";  // a folder named like the metadata folder, below the root
  put(T, "tree_ids", std::string(1, '\x03') + ids);
}

std::string trailer_of(const std::string& file) {
  const XXH128_hash_t sum = XXH3_128bits_withSeed(file.data() + 32, file.size() - 32, XXH3_64bits(file.data(), 32));
  return std::string(reinterpret_cast<const char*>(&sum.low64), 8) + std::string(reinterpret_cast<const char*>(&sum.high64), 8);
}

void hash_tree_corpus() {
  const std::string T = "fuzz_hash_tree_file";
  ScratchDir d("trees");
  const int dfd = open(d.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  struct Shape {
    const char* name;
    uint32_t bs;
    uint64_t size;
    std::vector<uint64_t> data_at;
  };
  const Shape shapes[] = {{"small", 4096, 10000, {0}},
                          {"sparse", 4096, 64 * 4096 * 3 + 5, {0, 64 * 4096 * 2 + 100}},
                          {"bs512", 512, 3000, {0, 1024}},
                          {"empty", 4096, 0, {}}};
  for (const Shape& s : shapes) {
    write_file(dfd, "data", "");
    const int fd = openat(dfd, "data", O_RDWR | O_CLOEXEC);
    if (ftruncate(fd, static_cast<off_t>(s.size)) != 0) abort();
    for (uint64_t at : s.data_at)
      if (pwrite(fd, "xyz", 3, static_cast<off_t>(at)) != 3) abort();
    FileHashTree t(s.bs);
    t.build(fd, s.size);
    close(fd);
    t.save(dfd, 1, false);
    const std::string file = read_file(dfd, FileHashTree::saved_name(1).c_str());
    // flags, extents (none), data size (in 16-byte units), the file.
    const std::string head = std::string(1, '\0') + std::string(1, '\0') + u16(static_cast<unsigned>(s.size / 16));
    put(T, std::string("v2_") + s.name, head + file);
    // Flag bit 0: the harness appends the trailer; one logged extent.
    put(T, std::string("v2_fixup_") + s.name,
        std::string(1, '\x01') + std::string(1, '\x01') + u16(0) + u16(static_cast<unsigned>(s.size / 16)) +
            file.substr(0, file.size() - 16));
  }
  // Format 1 (dense: every leaf), written by hand as the old code did.
  {
    const uint32_t bs = 4096;
    const uint64_t size = 3 * 4096 + 7;
    std::string h(32, '\0');
    memcpy(h.data(), "BRLEAVES", 8);
    const uint32_t version = 1;
    const uint64_t leaves = 4;
    memcpy(h.data() + 8, &version, 4);
    memcpy(h.data() + 12, &bs, 4);
    memcpy(h.data() + 16, &size, 8);
    memcpy(h.data() + 24, &leaves, 8);
    std::string body;
    const std::string block(bs, 'q');
    for (uint64_t i = 0; i < leaves; i++) {
      const Hash128 lh = hash_block(block.data(), i == 3 ? 7 : bs, bs);
      body.append(reinterpret_cast<const char*>(&lh), sizeof lh);
    }
    const std::string file = h + body;
    put(T, "v1_dense", std::string(1, '\0') + std::string(1, '\0') + u16(static_cast<unsigned>(size / 16)) + file +
                           trailer_of(file));
    put(T, "v1_dense_fixup", std::string(1, '\x01') + std::string(1, '\0') + u16(0) + file);
  }
  close(dfd);
}

void dirty_log_corpus() {
  const std::string T = "fuzz_dirty_log";
  ScratchDir d("logs");
  const int mfd = open(d.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  {
    DirtyLog log(mfd, d.path, false);
    log.load();
    log.note(kFixedA, 0, 100);
    log.note(kFixedB, 5 << 22, 1 << 22);
    log.sync();
    log.begin_checkpoint();
    log.note_truncate(kFixedC, 1000ull << 22, 0);
    log.note(kFixedA, 1 << 22, 10);
    log.sync();
  }
  const std::string f0 = read_file(mfd, "dirty-log.0"), f1 = read_file(mfd, "dirty-log.1");
  for (uint8_t flags : {0, 3, 4, 7}) {
    const std::string cut = u16(static_cast<unsigned>(f0.size()));
    put(T, "log_flags" + std::to_string(flags), std::string(1, static_cast<char>(flags)) + cut + f0 + f1);
  }
  // A torn last batch (garbage after the records), and a header only.
  put(T, "torn", std::string(1, '\x04') + u16(static_cast<unsigned>(f0.size() + 24)) + f0 + std::string(24, '\x55') + f1);
  put(T, "headers_only", std::string(1, '\x04') + u16(32) + f0.substr(0, 32) + f1.substr(0, 32));
  close(mfd);
}

void stage_corpus(Volume& master, Volume& slave) {
  const std::string T = "fuzz_stage_log";
  Stage stage(slave.meta_fd, slave.dir.path, false);
  stage.begin();
  {
    capnp::MallocMessageBuilder mb;
    auto w = mb.initRoot<wire::Message>().initWelcome();
    w.setProtocolVersion(kProtocolVersion);
    set_lineage(w.initLineage(2));
    auto words = capnp::messageToFlatArray(mb);
    stage.add(*Frame::parse(kj::mv(words), "corpus"));
  }
  record_merkle(master, slave, &stage);
  {
    capnp::MallocMessageBuilder mb;
    auto recs = sample_records();
    auto l = mb.initRoot<wire::Message>().initBatch().initRecords(static_cast<unsigned>(recs.size()));
    for (unsigned i = 0; i < recs.size(); i++) to_wire(recs[i], l[i]);
    auto words = capnp::messageToFlatArray(mb);
    stage.add(*Frame::parse(kj::mv(words), "corpus"));
  }
  stage.commit(20);
  const int sfd = openat(slave.meta_fd, "stage", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const std::string frames = read_file(sfd, "frames"), commit = read_file(sfd, "commit");
  close(sfd);
  stage.discard();
  const std::string marker(1, static_cast<char>(commit.size()));
  put(T, "merkle_stage", std::string(1, '\0') + marker + commit + frames);
  put(T, "merkle_stage_redo", std::string(1, '\x02') + marker + commit + frames);
  put(T, "uncommitted", std::string(1, '\0') + std::string(1, '\0') + frames);
}

void state_corpus() {
  const std::string T = "fuzz_state_files";
  ScratchDir d("state");
  const int dfd = open(d.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const int meta = open_metadata_dir(dfd, d.path);
  Identity id;
  id.node_id = "0123456789abcdef";
  id.cluster_id = "c0ffee";
  id.block_size = 4096;
  id.lsn_reserved = 1 << 24;
  id.role = "slave";
  id.lineage = {{"l1", 1}, {"l2", 100}};
  store_identity(meta, id, d.path);
  put(T, "identity", std::string(1, '\0') + read_file(meta, "identity"));
  Identity fresh;
  fresh.node_id = "fedcba9876543210";
  store_identity(meta, fresh, d.path);
  put(T, "identity_fresh", std::string(1, '\0') + read_file(meta, "identity"));
  {
    ReplicaState st(meta, d.path);
    st.set_attach_complete(true, 42);
    st.set_applied(50);
  }
  put(T, "replica", std::string(1, '\x01') + read_file(meta, "replica"));
  close(meta);
  close(dfd);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  quiet_logs();
  g_out = argv[1];
  try {
    Volume master, slave;
    fill_fixed_volume(master, 1);
    fill_fixed_volume(slave, 0);
    frame_corpus(master, slave);
    namespace_corpus(master);
    hash_tree_corpus();
    dirty_log_corpus();
    stage_corpus(master, slave);
    state_corpus();
  } catch (const std::exception& e) {
    fprintf(stderr, "fuzz_make_corpus: %s\n", e.what());
    return 1;
  }
  return 0;
}
