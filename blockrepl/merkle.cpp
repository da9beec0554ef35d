#include "blockrepl/merkle.h"

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstring>
#include <endian.h>
#include <sys/uio.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <map>
#include <set>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>
#include <unordered_map>

#include "blockrepl/copy.h"
#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"
#include "blockrepl/namespace.h"

namespace blockrepl {

namespace {

constexpr size_t kDataChunk = 1u << 20;  // bytes of file data per blockData message
constexpr size_t kHashesPerAnswer = 1u << 20;  // 16 MiB of hashes at most per answer message

std::string text_of(capnp::Data::Reader d) { return std::string(reinterpret_cast<const char*>(d.begin()), d.size()); }
kj::ArrayPtr<const kj::byte> bytes_of(const std::string& s) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}

std::unique_ptr<Frame> expect(Connection& conn, int timeout_ms, const char* during) {
  auto f = conn.receive(timeout_ms);
  if (!f) throw Error(std::string("peer ") + conn.peer() + " closed the connection during " + during);
  if (f->root().which() == wire::Message::ERROR)
    throw Error(std::string("peer ") + conn.peer() + ": " + f->root().getError().getReason().cStr());
  return f;
}

// Whether two entries agree on everything but their content hash (a directory whose hash
// differs only because something below it does is not itself different).
bool same_except_content(const NsEntryInfo& a, const NsEntryInfo& b) {
  return a.fid == b.fid && a.mode == b.mode && a.uid == b.uid && a.gid == b.gid && a.rdev == b.rdev &&
         a.mtime.tv_sec == b.mtime.tv_sec && a.mtime.tv_nsec == b.mtime.tv_nsec && a.link_target == b.link_target &&
         a.xattrs == b.xattrs && (a.is_dir() || a.size == b.size);
}

// Opens a file of the master's snapshot for reading.
int open_snapshot_file(int root_fd, const std::string& path) {
  return openat(root_fd, path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Master side.

void serve_merkle_diff(Connection& conn, int root_fd, HashIndex& hashes, bool assign_ids, bool deep, int timeout_ms) {
  const NamespaceSnapshot snap = NamespaceSnapshot::take(root_fd, hashes, assign_ids, deep);
  const uint32_t bs = hashes.block_size();
  for (;;) {
    auto frame = expect(conn, timeout_ms, "the Merkle diff");
    auto msg = frame->root();
    switch (msg.which()) {
      case wire::Message::DIR_QUERY: {
        for (auto p : msg.getDirQuery().getPaths()) {
          check_field_size(p.size(), kMaxPathBytes, "directory path", conn.peer(), "dirQuery");
          const std::string path = text_of(p);
          if (!valid_relative_path(path)) throw Error("slave asked for a bad path", EPROTO);
          capnp::MallocMessageBuilder mb;
          auto l = mb.initRoot<wire::Message>().initDirListing();
          l.setPath(bytes_of(path));
          const DirInfo* d = snap.dir(path);
          l.setExists(d != nullptr);
          if (d) {
            l.setFid(d->fid);
            l.setMtimeSec(d->mtime.tv_sec);
            l.setMtimeNsec(d->mtime.tv_nsec);
            auto el = l.initEntries(static_cast<unsigned>(d->entries.size()));
            for (unsigned i = 0; i < d->entries.size(); i++) to_wire(d->entries[i], el[i]);
          }
          conn.send(mb);
        }
        capnp::MallocMessageBuilder mb;
        mb.initRoot<wire::Message>().setDirListingsDone();
        conn.send(mb);
        break;
      }
      case wire::Message::HASH_QUERY: {
        auto items = msg.getHashQuery().getItems();
        size_t total = 0;
        for (auto it : items) total += it.getIndices().size();
        if (total > kHashesPerAnswer) throw Error("slave asked for too many hashes at once", EPROTO);
        capnp::MallocMessageBuilder mb;
        auto out = mb.initRoot<wire::Message>().initHashAnswer().initItems(items.size());
        for (unsigned i = 0; i < items.size(); i++) {
          auto it = items[i];
          const FileId fid = it.getFid();
          auto indices = it.getIndices();
          std::vector<Hash128> hs(indices.size(), kAbsentNode);
          uint64_t size = 0;
          const auto* place = snap.find(fid);
          OwnedFd file(place && place->entry->is_reg() ? open_snapshot_file(root_fd, place->path) : -1);
          if (file) {
            hashes.with_tree(fid, file.get(), [&](const FileHashTree& t) {
              size = t.size();
              for (unsigned j = 0; j < indices.size(); j++) hs[j] = t.node(it.getLevel(), indices[j]);
            });
          }
          out[i].setFid(fid);
          out[i].setSize(size);
          out[i].setHashes(kj::arrayPtr(reinterpret_cast<const kj::byte*>(hs.data()), hs.size() * sizeof(Hash128)));
        }
        conn.send(mb);
        break;
      }
      case wire::Message::BLOCK_REQUEST: {
        std::string buf(kDataChunk, '\0');
        auto send_data = [&](FileId fid, uint64_t off, size_t n) {
          capnp::MallocMessageBuilder mb;
          auto d = mb.initRoot<wire::Message>().initBlockData();
          d.setFid(fid);
          d.setOffset(off);
          // Zeros (holes, punched or zeroed ranges) cross the wire as a length.
          const bool zero = n > 0 && buf[0] == 0 && memcmp(buf.data(), buf.data() + 1, n - 1) == 0;
          if (zero) d.setZeros(n);
          else d.setData(kj::arrayPtr(reinterpret_cast<const kj::byte*>(buf.data()), n));
          conn.send(mb);
        };
        for (auto it : msg.getBlockRequest().getItems()) {
          const FileId fid = it.getFid();
          const auto* place = snap.find(fid);
          // Owned: a slave that goes away mid-answer (send throws) must not leak it.
          OwnedFd file(place && place->entry->is_reg() ? open_snapshot_file(root_fd, place->path) : -1);
          if (!file) continue;  // gone since: the records that follow remove it
          const int fd = file.get();
          // A read error ends the session: a block left out would leave the slave silently
          // different (a file that shrank meanwhile reads short, which is no error).
          auto read_failed = [&](int err) {
            throw_errno("cannot read " + place->path + " for slave " + conn.peer(), err);
          };
          struct stat st;
          fstat(fd, &st);
          const uint64_t size = static_cast<uint64_t>(st.st_size);
          if (it.getWhole()) {
            for (off_t pos = 0; static_cast<uint64_t>(pos) < size;) {
              off_t data = lseek(fd, pos, SEEK_DATA);
              if (data < 0) break;
              off_t hole = lseek(fd, data, SEEK_HOLE);
              if (hole < 0 || static_cast<uint64_t>(hole) > size) hole = static_cast<off_t>(size);
              for (off_t off = data; off < hole;) {
                size_t want = static_cast<size_t>(std::min<off_t>(static_cast<off_t>(kDataChunk), hole - off));
                ssize_t n = pread(fd, buf.data(), want, off);
                if (n < 0) read_failed(errno);
                if (n == 0) break;
                send_data(fid, static_cast<uint64_t>(off), static_cast<size_t>(n));
                off += n;
              }
              pos = hole;
            }
          } else {
            // Adjacent blocks go out together, up to kDataChunk per message.
            auto blocks = it.getBlocks();
            size_t i = 0;
            while (i < blocks.size()) {
              uint64_t first = blocks[i];
              size_t j = i + 1;
              while (j < blocks.size() && blocks[j] == blocks[j - 1] + 1 && (j - i + 1) * bs <= kDataChunk) j++;
              const uint64_t off = first * bs;
              if (off < size) {
                size_t want = static_cast<size_t>(std::min<uint64_t>((j - i) * uint64_t{bs}, size - off));
                ssize_t n = pread(fd, buf.data(), want, static_cast<off_t>(off));
                if (n < 0) read_failed(errno);
                if (n > 0) send_data(fid, off, static_cast<size_t>(n));
              }
              i = j;
            }
          }
        }
        capnp::MallocMessageBuilder mb;
        mb.initRoot<wire::Message>().setBlockDataDone();
        conn.send(mb);
        break;
      }
      case wire::Message::DIFF_DONE:
        return;
      default:
        throw Error("slave sent an unexpected message during the Merkle diff", EPROTO);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Slave side.

DiffReport run_merkle_diff(Connection& conn, int root_fd, HashIndex& hashes, Stage* stage, bool deep, int timeout_ms,
                           const std::function<void(const DiffReport&)>& progress) {
  DiffReport rep;
  const NamespaceSnapshot mine = NamespaceSnapshot::take(root_fd, hashes, false, deep);
  const uint32_t bs = hashes.block_size();
  rep.dirs_covered = mine.dirs();
  rep.entries_covered = mine.files();

  // 1. Namespace, breadth first: one round trip per depth with differing directories.
  std::map<FileId, uint64_t> differing_files;  // fid -> master's size
  std::set<FileId> whole_files;
  std::vector<std::string> queue{""};
  while (!queue.empty()) {
    {
      capnp::MallocMessageBuilder mb;
      auto paths = mb.initRoot<wire::Message>().initDirQuery().initPaths(static_cast<unsigned>(queue.size()));
      for (unsigned i = 0; i < queue.size(); i++) paths.set(i, bytes_of(queue[i]));
      conn.send(mb);
    }
    rep.round_trips++;
    std::vector<std::string> next;
    for (;;) {
      auto frame = expect(conn, timeout_ms, "the Merkle diff");
      auto msg = frame->root();
      if (msg.which() == wire::Message::DIR_LISTINGS_DONE) break;
      if (msg.which() != wire::Message::DIR_LISTING) throw Error("master sent an unexpected message during the Merkle diff", EPROTO);
      auto l = msg.getDirListing();
      check_field_size(l.getPath().size(), kMaxPathBytes, "path", conn.peer(), "dirListing");
      const std::string path = text_of(l.getPath());
      if (!valid_relative_path(path)) throw Error("master sent a listing with a bad path", EPROTO);
      rep.dirs_listed++;
      const DirInfo* here = mine.dir(path);
      if (!l.getExists()) continue;  // gone on the master: its parent's listing says so
      if (path.empty() && here) {
        // Every other directory's mtime is compared in its parent's listing; the root has none.
        const timespec theirs{static_cast<time_t>(l.getMtimeSec()), static_cast<long>(l.getMtimeNsec())};
        if (theirs.tv_sec != here->mtime.tv_sec || theirs.tv_nsec != here->mtime.tv_nsec)
          rep.differences.push_back("metadata differs: / (the root directory)");
      }
      std::set<std::string> names;
      for (auto we : l.getEntries()) {
        NsEntryInfo e = from_wire(we, /*at_volume_root=*/path.empty());
        if (!names.insert(e.name).second) throw Error("master sent a listing with a name twice", EPROTO);
        const NsEntryInfo* m = here ? here->find(e.name) : nullptr;
        if (m && m->hash == e.hash) continue;
        const std::string p = join_path(path, e.name);
        if (!m) rep.differences.push_back("missing here: " + p);
        else if (m->fid != e.fid || (m->mode & S_IFMT) != (e.mode & S_IFMT)) rep.differences.push_back("different file: " + p);
        else if (!(m->content == e.content) && !e.is_dir()) rep.differences.push_back("content differs: " + p);
        else if (!e.is_dir() || !same_except_content(*m, e)) rep.differences.push_back("metadata differs: " + p);
        if (e.is_dir()) {
          next.push_back(p);
        } else if (e.is_reg()) {
          const auto* local = mine.find(e.fid);
          if (local && local->entry->is_reg()) {
            if (!(local->entry->content == e.content)) differing_files[e.fid] = e.size;
          } else {
            whole_files.insert(e.fid);
          }
        }
      }
      if (here) {
        for (const auto& m : here->entries)
          if (!names.count(m.name)) rep.differences.push_back("not on the master: " + join_path(path, m.name));
      }
      if (stage) stage->add(*frame);
    }
    queue = std::move(next);
    if (progress) progress(rep);
  }

  // 2. Block trees of files that exist on both sides, all files one level per round trip.
  struct Descent {
    FileHashTree ours;
    uint64_t their_size;
    unsigned level;
    std::vector<uint64_t> indices;
  };
  std::map<FileId, Descent> active;
  std::map<FileId, std::vector<uint64_t>> blocks;
  for (auto& [fid, their_size] : differing_files) {
    const auto* place = mine.find(fid);
    int fd = openat(root_fd, place->path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) throw_errno("cannot open " + place->path + " to compare it", errno);
    FileHashTree copy(bs);
    try {
      hashes.with_tree(fid, fd, [&](const FileHashTree& t) { copy = t; });
      // Compare as if our copy had the master's size already (the stage sets it): what it
      // would gain reads as zeros, which is what a hole on the master hashes as, so a huge
      // sparse file there against a short copy here descends only to the blocks that hold
      // data, not to every node past our end (which would answer "absent" and differ from the
      // hole's zeros all the way down). A cut inside a block may rehash it from the file as it
      // is: at worst that block is fetched.
      if (copy.size() != their_size) {
        copy.truncate(their_size);
        copy.refresh(fd);
      }
    } catch (...) {
      close(fd);
      throw;
    }
    close(fd);
    unsigned levels = std::max(copy.levels(), FileHashTree::levels_for(their_size, bs));
    rep.files_compared++;
    if (levels == 0) continue;  // both empty: only the size or metadata differ
    active.emplace(fid, Descent{std::move(copy), their_size, levels - 1, {0}});
  }
  while (!active.empty()) {
    {
      capnp::MallocMessageBuilder mb;
      auto items = mb.initRoot<wire::Message>().initHashQuery().initItems(static_cast<unsigned>(active.size()));
      unsigned i = 0;
      for (auto& [fid, d] : active) {
        items[i].setFid(fid);
        items[i].setLevel(d.level);
        auto idx = items[i].initIndices(static_cast<unsigned>(d.indices.size()));
        for (unsigned j = 0; j < d.indices.size(); j++) idx.set(j, d.indices[j]);
        i++;
      }
      conn.send(mb);
    }
    rep.round_trips++;
    auto frame = expect(conn, timeout_ms, "the Merkle diff");
    if (frame->root().which() != wire::Message::HASH_ANSWER) throw Error("master sent an unexpected message during the Merkle diff", EPROTO);
    auto answers = frame->root().getHashAnswer().getItems();
    if (answers.size() != active.size()) throw Error("master answered a different number of hash questions", EPROTO);
    unsigned i = 0;
    for (auto it = active.begin(); it != active.end(); i++) {
      auto a = answers[i];
      Descent& d = it->second;
      auto raw = a.getHashes();
      if (a.getFid() != it->first || raw.size() != d.indices.size() * sizeof(Hash128))
        throw Error("master answered hash questions out of order", EPROTO);
      std::vector<Hash128> theirs(d.indices.size());
      memcpy(theirs.data(), raw.begin(), raw.size());
      d.their_size = a.getSize();  // the file may have changed since the listing
      auto children = d.ours.differing_children(d.level, d.indices, theirs, d.their_size);
      if (d.level == 0 || children.empty()) {
        const uint64_t their_blocks = FileHashTree::level_size_for(d.their_size, bs, 0);
        std::vector<uint64_t> want;
        if (d.level == 0)
          for (uint64_t b : children)
            if (b < their_blocks) want.push_back(b);
        if (!want.empty()) {
          rep.blocks += want.size();
          rep.differences.push_back("file " + std::to_string(it->first) + ": " + std::to_string(want.size()) + " blocks differ");
          blocks[it->first] = std::move(want);
        }
        it = active.erase(it);
        continue;
      }
      d.level--;
      d.indices = std::move(children);
      ++it;
    }
  }
  rep.whole_files = whole_files.size();

  // 3. The data.
  if (stage && (!blocks.empty() || !whole_files.empty())) {
    {
      capnp::MallocMessageBuilder mb;
      auto items = mb.initRoot<wire::Message>().initBlockRequest().initItems(static_cast<unsigned>(blocks.size() + whole_files.size()));
      unsigned i = 0;
      for (auto& [fid, list] : blocks) {
        items[i].setFid(fid);
        auto bl = items[i].initBlocks(static_cast<unsigned>(list.size()));
        for (unsigned j = 0; j < list.size(); j++) bl.set(j, list[j]);
        i++;
      }
      for (FileId fid : whole_files) {
        items[i].setFid(fid);
        items[i].setWhole(true);
        i++;
      }
      conn.send(mb);
    }
    rep.round_trips++;
    for (;;) {
      auto frame = expect(conn, timeout_ms, "the Merkle diff");
      auto msg = frame->root();
      if (msg.which() == wire::Message::BLOCK_DATA_DONE) break;
      if (msg.which() != wire::Message::BLOCK_DATA) throw Error("master sent an unexpected message during the Merkle diff", EPROTO);
      auto d = msg.getBlockData();
      if (!blocks.count(d.getFid()) && !whole_files.count(d.getFid()))
        throw Error("master sent data of a file that was not asked for", EPROTO);
      if (d.getZeros() > kDataChunk || (d.getZeros() && d.getData().size()))
        throw Error("master sent a malformed block message", EPROTO);
      rep.data_bytes += d.getData().size() + d.getZeros();
      stage->add(*frame);
      if (progress && rep.data_bytes % (64u << 20) < d.getData().size()) progress(rep);
    }
  }
  capnp::MallocMessageBuilder mb;
  mb.initRoot<wire::Message>().setDiffDone();
  conn.send(mb);
  if (progress) progress(rep);
  return rep;
}

// ---------------------------------------------------------------------------------------------
// Stage.

namespace {
constexpr char kStageDir[] = "stage";
constexpr char kFramesName[] = "frames";
constexpr char kCommitName[] = "commit";
constexpr char kParkName[] = "park";

}  // namespace

Stage::Stage(int meta_fd, std::string where, bool durable) : meta_fd_(meta_fd), where_(std::move(where)), durable_(durable) {
  if (mkdirat(meta_fd_, kStageDir, 0700) != 0 && errno != EEXIST) throw_errno("cannot create the stage in " + where_, errno);
  dir_fd_ = openat(meta_fd_, kStageDir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd_ < 0) throw_errno("cannot open the stage in " + where_, errno);
}

Stage::~Stage() {
  if (frames_fd_ >= 0) close(frames_fd_);
  if (dir_fd_ >= 0) close(dir_fd_);
}

bool Stage::committed() const { return faccessat(dir_fd_, kCommitName, F_OK, 0) == 0; }

Lsn Stage::committed_lsn() const {
  int fd = openat(dir_fd_, kCommitName, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return 0;
  char buf[32] = {};
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0) throw Error("the stage commit marker in " + where_ + " is damaged");
  return strtoull(buf, nullptr, 10);
}

void Stage::remove_all() {
  if (frames_fd_ >= 0) close(frames_fd_);
  frames_fd_ = -1;
  unlinkat(dir_fd_, kCommitName, 0);
  unlinkat(dir_fd_, kFramesName, 0);
  remove_tree_at(dir_fd_, kParkName);
  bytes_ = 0;
}

void Stage::begin() {
  if (committed()) throw Error("a committed stage in " + where_ + " must be applied first");
  remove_all();
  frames_fd_ = openat(dir_fd_, kFramesName, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0600);
  if (frames_fd_ < 0) throw_errno("cannot create the stage in " + where_, errno);
}

void Stage::add(const Frame& frame) {
  if (frames_fd_ < 0) throw Error("stage of " + where_ + " was not begun");
  auto words = frame.words();
  const uint32_t len = htole32(static_cast<uint32_t>(words.size() * sizeof(capnp::word)));
  iovec iov[2] = {{const_cast<uint32_t*>(&len), sizeof len},
                  {const_cast<capnp::word*>(words.begin()), words.size() * sizeof(capnp::word)}};
  const size_t total = iov[0].iov_len + iov[1].iov_len;
  ssize_t n = writev(frames_fd_, iov, 2);
  if (n != static_cast<ssize_t>(total)) throw_errno("cannot write the stage in " + where_, n < 0 ? errno : ENOSPC);
  bytes_ += total;
}

void Stage::commit(Lsn lsn) {
  if (frames_fd_ < 0) throw Error("stage of " + where_ + " was not begun");
  if (durable_ && fdatasync(frames_fd_) != 0) throw_errno("cannot sync the stage in " + where_, errno);
  const std::string text = std::to_string(lsn) + "\n";
  if (int err = write_file_atomically(dir_fd_, kCommitName, text, durable_))
    throw_errno("cannot commit the stage in " + where_ + " (writing its commit marker)", err);
}

void Stage::discard() {
  // Not synced: if the removal is lost in a crash, the committed stage is applied once more at
  // the next start, which changes nothing (applying is idempotent).
  remove_all();
}

namespace {

// Reads the staged frames one at a time.
class FrameReader {
 public:
  FrameReader(int dir_fd, const std::string& where) : where_(where) {
    fd_ = openat(dir_fd, kFramesName, O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) throw_errno("cannot read the stage in " + where, errno);
  }
  ~FrameReader() { close(fd_); }
  std::unique_ptr<Frame> next() {
    uint32_t len_le;
    ssize_t n = pread(fd_, &len_le, sizeof len_le, static_cast<off_t>(pos_));
    if (n == 0) return nullptr;
    if (n != sizeof len_le) throw Error("the stage in " + where_ + " is truncated");
    uint32_t len = le32toh(len_le);
    if (len == 0 || len % sizeof(capnp::word) || len > kMaxFrameBytes) throw Error("the stage in " + where_ + " is damaged");
    auto words = kj::heapArray<capnp::word>(len / sizeof(capnp::word));
    if (pread(fd_, words.begin(), len, static_cast<off_t>(pos_ + sizeof len_le)) != static_cast<ssize_t>(len))
      throw Error("the stage in " + where_ + " is truncated");
    pos_ += sizeof len_le + len;
    return Frame::parse(kj::mv(words), "the stage in " + where_);
  }

 private:
  int fd_;
  uint64_t pos_ = 0;
  std::string where_;
};

// Every file id on the volume and in the park, as O_PATH descriptors that follow renames.
class FidIndex {
 public:
  explicit FidIndex(FileRegistry& files) : files_(files) {}
  void clear() { handles_.clear(); }
  std::vector<FileId> ids() const {
    std::vector<FileId> out;
    for (auto& [fid, h] : handles_) out.push_back(fid);
    return out;
  }
  void scan(int dirfd, bool top) {
    for (const DirEntry& de : list_dir(dirfd, top).entries) {
      const char* name = de.name.c_str();
      auto fid = read_file_id(dirfd, name);
      if (fid) add(*fid, dirfd, name);
      if (de.is_dir()) {
        OwnedFd sub(openat(dirfd, name, O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
        if (sub) scan(sub.get(), false);
      }
    }
  }
  void add(FileId fid, int dirfd, const char* name) {
    if (handles_.count(fid)) return;
    FileHandle h;
    if (FileHandle::of(dirfd, name, &h) == 0) handles_.emplace(fid, std::move(h));
  }
  // An O_PATH descriptor of the file, opened now (the index holds none: a tree of any size).
  Fd get(FileId fid) const {
    auto it = handles_.find(fid);
    if (it == handles_.end()) return Fd();
    return files_.open_handle(it->second, O_PATH);
  }

 private:
  FileRegistry& files_;
  std::unordered_map<FileId, FileHandle> handles_;
};

struct StagedListing {
  std::string path;
  FileId fid = kInvalidFileId;
  timespec mtime{0, 0};
  std::vector<NsEntryInfo> entries;
};

// Moves an entry that is in the way (or no longer wanted) out of the namespace into the park,
// where its file id stays reachable until the stage is applied.
void park(int dirfd, const std::string& name, int park_fd, uint64_t& counter, const std::string& where) {
  for (;;) {
    const std::string to = "p" + std::to_string(counter++);
    if (renameat2(dirfd, name.c_str(), park_fd, to.c_str(), RENAME_NOREPLACE) == 0) return;
    if (errno == EEXIST) continue;
    if (errno == ENOENT) return;
    throw_errno("cannot move " + name + " aside in " + where, errno);
  }
}

// Applies a change of the stage through the Store, the one write path (its checks, its errors).
void apply_through(Store& store, const Record& rec, const Targets& t, const std::string& what) {
  if (int err = store.apply(rec, t)) throw_errno("cannot " + what, err);
}

// Owner, mode and xattrs of an entry as listed, through the Store. The owner first: a chown
// clears the set-id bits, which the mode then sets as the master has them.
void set_metadata(Store& store, int dirfd, const NsEntryInfo& e, const std::string& where) {
  OwnedFd entry(openat(dirfd, e.name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  if (!entry) throw_errno("cannot open " + where, errno);
  Targets t;
  t.path_fd = entry.get();
  Record owner;
  owner.op = Op::setattr;
  owner.fid = e.fid;
  owner.attr_valid = kAttrUid | kAttrGid;
  owner.uid = e.uid;
  owner.gid = e.gid;
  apply_through(store, owner, t, "chown " + where);
  if (S_ISLNK(e.mode)) return;  // no mode, and user xattrs are not allowed on symlinks
  Record mode;
  mode.op = Op::setattr;
  mode.fid = e.fid;
  mode.attr_valid = kAttrMode;
  mode.mode = e.mode;
  apply_through(store, mode, t, "chmod " + where);
  // Through the directory: llistxattr on /proc/self/fd/N would list the magic link's own.
  // (Not a structured binding: clang before 16, which builds the fuzz targets, cannot capture one.)
  for (auto& listed : list_xattrs(fd_path(dirfd, e.name.c_str()))) {
    const std::string& n = listed.first;
    bool keep = std::any_of(e.xattrs.begin(), e.xattrs.end(), [&](auto& x) { return x.first == n; });
    if (keep) continue;
    Record rm;
    rm.op = Op::removexattr;
    rm.fid = e.fid;
    rm.name = n;
    apply_through(store, rm, t, "remove xattr " + n + " of " + where);
  }
  for (auto& [n, v] : e.xattrs) {
    if (n.rfind(kReservedXattrPrefix, 0) == 0) continue;  // ours: never from a peer
    Record set;
    set.op = Op::setxattr;
    set.fid = e.fid;
    set.name = n;
    set.data = v;
    apply_through(store, set, t, "set xattr " + n + " on " + where);
  }
}

// The mtime a listing gives an entry (or a listed directory), through the Store.
void set_mtime(Store& store, int fd, FileId fid, timespec mtime, const std::string& where) {
  Record rec;
  rec.op = Op::setattr;
  rec.fid = fid;
  rec.attr_valid = kAttrMtime;
  rec.mtime = mtime;
  Targets t;
  t.path_fd = fd;
  apply_through(store, rec, t, "set the mtime of " + where);
}

}  // namespace

Stage::Applied Stage::apply(Store& store, uint32_t block_size) {
  (void)block_size;
  Applied out;
  out.lsn = committed_lsn();
  const int root_fd = store.root_fd();
  if (mkdirat(dir_fd_, kParkName, 0700) != 0 && errno != EEXIST) throw_errno("cannot create the park in " + where_, errno);
  const int park_fd = openat(dir_fd_, kParkName, O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (park_fd < 0) throw_errno("cannot open the park in " + where_, errno);
  struct Closer {
    int fd;
    ~Closer() { close(fd); }
  } park_closer{park_fd};

  // Pass 1: the listings (small), in the order they came: parents before children.
  std::vector<StagedListing> listings;
  {
    FrameReader rd(dir_fd_, where_);
    while (auto f = rd.next()) {
      auto m = f->root();
      if (m.which() == wire::Message::WELCOME) {
        for (auto e : m.getWelcome().getLineage()) out.lineage.push_back({e.getId(), e.getFirstLsn()});
      } else if (m.which() == wire::Message::DIR_LISTING) {
        auto l = m.getDirListing();
        StagedListing sl;
        sl.path = text_of(l.getPath());
        sl.fid = l.getFid();
        if (!l.getExists()) continue;
        sl.mtime = {static_cast<time_t>(l.getMtimeSec()), static_cast<long>(l.getMtimeNsec())};
        if (sl.mtime.tv_nsec < 0 || sl.mtime.tv_nsec >= 1000000000L)
          throw Error("stage in " + where_ + " holds a listing with a bad mtime", EPROTO);
        for (auto e : l.getEntries()) sl.entries.push_back(from_wire(e, /*at_volume_root=*/sl.path.empty()));
        listings.push_back(std::move(sl));
      }
    }
  }
  FidIndex index(store.files());
  index.scan(root_fd, true);
  index.scan(park_fd, false);
  uint64_t counter = 0;
  // Place every listed entry, moving whatever is in the way into the park.
  for (const auto& l : listings) {
    int dfd = open_dir_path(root_fd, l.path);
    if (dfd < 0) {
      LOG_WARN("stage of %s: directory '%s' is missing; skipped", where_.c_str(), l.path.c_str());
      continue;
    }
    Closer dc{dfd};
    std::set<std::string> wanted;
    for (const auto& e : l.entries) {
      // The metadata folder and lost+found are not the volume's: a listing naming them would
      // move them into the park (and delete them) before any record reached the Store.
      if (l.path.empty() && is_hidden_root_entry(e.name.c_str(), DT_UNKNOWN))
        throw Error("stage in " + where_ + " lists '" + e.name + "' at the volume root, which no peer may name", EPERM);
      wanted.insert(e.name);
      const std::string p = join_path(l.path, e.name);
      const char* name = e.name.c_str();
      struct stat st;
      bool present = fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0;
      if (present) {
        auto fid = read_file_id(dfd, name);
        if (fid && *fid == e.fid && (st.st_mode & S_IFMT) == (e.mode & S_IFMT)) {
          set_metadata(store, dfd, e, p + " in " + where_);
          continue;
        }
        park(dfd, e.name, park_fd, counter, where_);
      }
      out.entries++;
      out.names.emplace_back(l.fid, e.name);
      Fd have_fd = index.get(e.fid);
      const int have = have_fd.get();
      struct stat hs;
      Record rec;
      rec.fid = e.fid;
      rec.parent = l.fid;
      rec.name = e.name;
      Targets t;
      t.parent_fd = dfd;
      if (have >= 0 && fstat(have, &hs) == 0 && (hs.st_mode & S_IFMT) == (e.mode & S_IFMT)) {
        if (S_ISDIR(e.mode)) {
          // A directory moved: rename it from wherever it is now.
          char cur[4096];
          ssize_t n = readlink(fd_path(have).c_str(), cur, sizeof cur - 1);
          if (n <= 0) throw_errno("cannot locate directory " + p + " in " + where_, errno);
          const std::string from(cur, static_cast<size_t>(n));
          OwnedFd from_parent(openat(have, "..", O_PATH | O_DIRECTORY | O_CLOEXEC));
          if (!from_parent) throw_errno("cannot open the directory holding " + from, errno);
          rec.op = Op::rename;
          rec.name = from.substr(from.rfind('/') + 1);
          rec.parent = read_file_id(from_parent.get(), "").value_or(kInvalidFileId);
          rec.parent2 = l.fid;
          rec.name2 = e.name;
          t.parent_fd = from_parent.get();
          t.parent2_fd = dfd;
          apply_through(store, rec, t, "move directory " + from + " to " + p + " in " + where_);
        } else {
          rec.op = Op::link;
          t.path_fd = have;
          apply_through(store, rec, t, "link " + p + " in " + where_);
        }
      } else {
        rec.op = S_ISDIR(e.mode) ? Op::mkdir : S_ISLNK(e.mode) ? Op::symlink : Op::create;
        rec.mode = e.mode;
        rec.uid = e.uid;
        rec.gid = e.gid;
        rec.rdev = e.rdev;
        rec.data = e.link_target;
        apply_through(store, rec, t, "create " + p + " in " + where_);
        index.add(e.fid, dfd, name);
      }
      set_metadata(store, dfd, e, p + " in " + where_);
    }
    // Names the master does not have go to the park (deleted at the end).
    for (const DirEntry& de : list_dir(dfd, l.path.empty()).entries) {
      if (wanted.count(de.name)) continue;
      park(dfd, de.name, park_fd, counter, where_);
      out.names.emplace_back(l.fid, de.name);
    }
  }

  // What the master no longer has goes now, before the data below needs room: a replica whose
  // disk filled re-attaches this way once the master's state fits (the stage is committed, so
  // a crash from here on finishes it rather than exposing a mix).
  // Nothing may hold a parked file open, or its space would stay taken.
  index.clear();
  FileRegistry& files = store.files();
  files.clear();
  FidIndex parked(store.files());
  parked.scan(park_fd, false);
  const std::vector<FileId> gone = parked.ids();
  parked.clear();
  remove_tree_at(dir_fd_, kParkName);
  if (HashIndex* h = store.hashes())
    for (FileId fid : gone) h->maybe_orphaned(fid);

  // Pass 2: data, through the store so the hash trees follow.
  files.scan();
  {
    FrameReader rd(dir_fd_, where_);
    while (auto f = rd.next()) {
      auto m = f->root();
      if (m.which() != wire::Message::BLOCK_DATA) continue;
      auto d = m.getBlockData();
      Record rec;
      rec.fid = d.getFid();
      rec.offset = d.getOffset();
      // Checked when it arrived; a stage damaged on disk since must not ask for more.
      if (d.getZeros() > kDataChunk) throw Error("the stage in " + where_ + " is damaged: a run of zeros larger than a chunk", EPROTO);
      if (d.getZeros()) {
        // A hole where the master reads zeros (within the file: the size is set below).
        rec.op = Op::fallocate;
        rec.flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        rec.length = d.getZeros();
      } else {
        rec.op = Op::write;
        rec.data = std::string_view(reinterpret_cast<const char*>(d.getData().begin()), d.getData().size());
      }
      if (int err = store.apply(rec)) {
        if (err == ENOENT) continue;  // not in the namespace (removed on the master meanwhile)
        if (err == EOPNOTSUPP && d.getZeros()) {
          // No holes on this file system: write the zeros.
          std::string zeros(d.getZeros(), '\0');
          rec.op = Op::write;
          rec.data = zeros;
          err = store.apply(rec);
        }
        if (err) throw_errno("cannot write file " + std::to_string(rec.fid) + " in " + where_, err);
      }
      out.blocks += (d.getData().size() + d.getZeros() + block_size - 1) / block_size;
    }
  }
  // Sizes and times as listed, after the data.
  for (const auto& l : listings) {
    for (const auto& e : l.entries) {
      if (S_ISDIR(e.mode)) continue;
      if (S_ISREG(e.mode)) {
        Record t;
        t.op = Op::truncate;
        t.fid = e.fid;
        t.offset = e.size;
        if (int err = store.apply(t); err && err != ENOENT)
          throw_errno("cannot size " + join_path(l.path, e.name) + " in " + where_, err);
      }
      OwnedFd dfd(open_dir_path(root_fd, l.path));
      if (!dfd) continue;
      OwnedFd entry(openat(dfd.get(), e.name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
      if (!entry) continue;  // removed by a record below
      set_mtime(store, entry.get(), e.fid, e.mtime, join_path(l.path, e.name) + " in " + where_);
    }
  }

  // Directories' times as listed, deepest first (listings come parents first), now that their
  // entries are in place: the records below stamp their own changes after these.
  for (auto it = listings.rbegin(); it != listings.rend(); ++it) {
    OwnedFd dfd(open_dir_path(root_fd, it->path));
    if (!dfd) continue;
    set_mtime(store, dfd.get(), it->fid, it->mtime, "directory '" + it->path + "' in " + where_);
  }

  // Pass 3: the records that followed the diff, up to the commit point, tolerantly (some may
  // already be reflected in what the diff sent).
  {
    FrameReader rd(dir_fd_, where_);
    while (auto f = rd.next()) {
      auto m = f->root();
      if (m.which() != wire::Message::BATCH) continue;
      for (auto wr : m.getBatch().getRecords()) {
        Record rec = from_wire(wr, true, where_);
        if (rec.lsn > out.lsn) break;
        if (rec.is_barrier()) continue;
        if (int err = store.apply_replayed(rec))
          throw Error("cannot apply " + rec.describe() + " to " + where_ + ": " + Store::failure_text(err), err);
        out.records++;
        if (rec.parent != kInvalidFileId) out.names.emplace_back(rec.parent, rec.name);
        if (rec.parent2 != kInvalidFileId) out.names.emplace_back(rec.parent2, rec.name2);
      }
    }
  }
  files.clear();
  files.scan();
  return out;
}

}  // namespace blockrepl
