#include "blockrepl/hash_index.h"

#include <cerrno>
#include <cinttypes>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <map>
#include <sys/stat.h>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/log.h"

namespace blockrepl {

namespace {

std::string fid_hex(FileId fid) {
  char buf[24];
  snprintf(buf, sizeof buf, "%016" PRIx64, fid);
  return buf;
}

// A readable descriptor of the file behind an O_PATH (or any) descriptor.
int reopen_readable(int fd) { return open(fd_path(fd).c_str(), O_RDONLY | O_CLOEXEC); }

}  // namespace

HashIndex::HashIndex(FileRegistry& files, int root_fd, int meta_fd, std::string data_path, uint32_t block_size,
                     bool durable)
    : files_(files),
      root_fd_(root_fd), meta_fd_(meta_fd), data_path_(std::move(data_path)), block_size_(block_size), durable_(durable) {
  hashes_fd_ = open_hashes_dir(meta_fd_, data_path_);
  log_ = std::make_unique<DirtyLog>(meta_fd_, data_path_ + "/.blockrepl", durable_);
  recover();
}

HashIndex::~HashIndex() {
  stop_checkpoints();
  std::lock_guard lk(map_mu_);
  entries_.clear();
  if (hashes_fd_ >= 0) close(hashes_fd_);
}

std::string HashIndex::label(FileId fid) const { return "file " + fid_hex(fid) + " of " + data_path_; }

int HashIndex::sync_data() {
  if (!durable_) return 0;
  int fd = open(fd_path(root_fd_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  int err = syncfs(fd) == 0 ? 0 : errno;
  close(fd);
  return err;
}

void HashIndex::recover() {
  auto logged = log_->load();
  if (logged && logged->empty()) return;  // clean stop: the saved trees are exact
  // The data as it is now is what the trees must describe: make it durable first, so a saved
  // hash never describes data a power loss could still take back.
  if (int err = sync_data()) throw_errno("cannot sync " + data_path_ + " to recover its hash trees", err);
  files_.scan();
  std::map<FileId, std::vector<uint64_t>> extents;
  if (logged) {
    for (const auto& e : *logged) {
      if (e == DirtyLog::kEverything) {
        logged.reset();
        break;
      }
      extents[e.fid].push_back(e.extent);
    }
  }
  if (!logged) {
    // The log itself is damaged: every saved tree is suspect. Rehash what exists (rare: a torn
    // log beyond its last batch).
    LOG_WARN("hash trees of %s: the dirty-region log is damaged; rehashing every file", data_path_.c_str());
    extents.clear();
  }
  uint64_t blocks = 0, nfiles = 0;
  auto repair = [&](FileId fid, std::span<const uint64_t> ext) {
    Fd lease = files_.path(fid);
    int pfd = lease.get();
    if (pfd < 0) {
      FileHashTree::remove_saved(hashes_fd_, fid);  // the file is gone
      return;
    }
    int fd = reopen_readable(pfd);
    if (fd < 0) return;  // not a regular file
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      close(fd);
      return;
    }
    FileHashTree tree(block_size_, label(fid));
    blocks += recover_file_tree(tree, hashes_fd_, fid, fd, ext);
    close(fd);
    tree.save(hashes_fd_, fid, durable_);
    nfiles++;
  };
  if (logged) {
    for (auto& [fid, ext] : extents) repair(fid, ext);
  } else {
    // Drop every saved tree; files are rebuilt lazily from their data when next needed.
    remove_saved_trees();
  }
  log_->clear();
  blocks_hashed_ += blocks;
  recovered_files_ += nfiles;
  LOG_INFO("hash trees of %s recovered after an unclean stop: %" PRIu64 " files, %" PRIu64 " blocks rehashed",
           data_path_.c_str(), nfiles, blocks);
}

std::shared_ptr<HashIndex::Entry> HashIndex::entry(FileId fid) {
  std::lock_guard lk(map_mu_);
  auto& e = entries_[fid];
  if (!e) e = std::make_shared<Entry>(block_size_, label(fid));
  return e;
}

void HashIndex::ensure_valid(Entry& e, FileId fid, int fd) {
  if (e.valid) return;
  if (e.tree.load(hashes_fd_, fid)) {
    // A saved tree is exact for a file unchanged since (changes since are in the log, and were
    // repaired at start); a size that disagrees means the file changed behind our back.
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_size) == e.tree.size()) {
      e.valid = true;
      return;
    }
  }
  if (fd < 0) return;  // built later, when a descriptor is at hand
  struct stat st;
  if (fstat(fd, &st) != 0) throw_errno("cannot stat " + e.tree.label(), errno);
  int rfd = reopen_readable(fd);
  if (rfd < 0) throw_errno("cannot open " + e.tree.label() + " to hash it", errno);
  try {
    blocks_hashed_ += e.tree.build(rfd, static_cast<uint64_t>(st.st_size));
  } catch (...) {
    close(rfd);
    throw;
  }
  close(rfd);
  files_rebuilt_++;
  e.valid = true;
  e.unsaved = true;
}

int HashIndex::before_change(const Record& rec, int fd) {
  if (rec.fid == kInvalidFileId) return 0;
  bool must_sync = false;
  switch (rec.op) {
    case Op::write:
      must_sync = log_->note(rec.fid, rec.offset, rec.data.size());
      if (must_sync) {
        // A writer that moved on from the previous extent writes sequentially: the same sync
        // also logs the extents ahead of it, so it pays one log sync per 1 + kPrelogExtents
        // extents. Random writers (databases) log only what they touch.
        const uint64_t extent = rec.offset >> DirtyLog::kExtentShift;
        bool sequential = false;
        for (uint64_t back = 1; back <= kSequentialLookback && back <= extent && !sequential; back++)
          sequential = log_->logged(rec.fid, extent - back);
        if (sequential) {
          const uint64_t next = (rec.offset + rec.data.size() + DirtyLog::kExtentSize - 1) & ~(DirtyLog::kExtentSize - 1);
          log_->note(rec.fid, next, kPrelogExtents * DirtyLog::kExtentSize);
        }
      }
      break;
    case Op::truncate:
    case Op::fallocate: {
      struct stat st;
      if (fstat(fd, &st) != 0) return errno;
      const uint64_t old_size = static_cast<uint64_t>(st.st_size);
      if (rec.op == Op::truncate) {
        must_sync = log_->note_truncate(rec.fid, old_size, rec.offset);
      } else if (rec.flags & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE)) {
        // Everything from the offset to the end (the longer of the old and new ends) moves.
        const uint64_t end = (rec.flags & FALLOC_FL_INSERT_RANGE) ? old_size + rec.length : old_size;
        if (end > rec.offset) must_sync = log_->note_truncate(rec.fid, end, rec.offset);
      } else {
        must_sync = log_->note(rec.fid, rec.offset, rec.length);
        if (!(rec.flags & FALLOC_FL_KEEP_SIZE) && rec.offset + rec.length > old_size)
          must_sync |= log_->note_truncate(rec.fid, old_size, rec.offset + rec.length);
      }
      break;
    }
    default:
      return 0;
  }
  if (must_sync) {
    try {
      log_->sync();
    } catch (const Error& e) {
      LOG_ERROR("%s", e.what());
      return e.errno_value() ? e.errno_value() : EIO;
    }
  }
  return 0;
}

void HashIndex::after_change(const Record& rec, int fd, bool completed) {
  if (rec.fid == kInvalidFileId) return;
  auto ep = entry(rec.fid);
  Entry& e = *ep;
  std::lock_guard lk(e.mu);
  e.unsaved = true;
  if (!e.valid) {
    // Load the saved tree as it was before this change (no fd: never build here, on the write
    // path); without one, the whole file is hashed when the tree is next needed.
    e.valid = e.tree.load(hashes_fd_, rec.fid);
    if (!e.valid) return;
  }
  switch (rec.op) {
    case Op::write:
      if (completed) e.tree.wrote(rec.offset, rec.data);
      else e.tree.mark_dirty(rec.offset, rec.data.size());
      break;
    case Op::truncate:
      e.tree.truncate(rec.offset);
      break;
    case Op::fallocate: {
      struct stat st;
      if (fstat(fd, &st) != 0) {
        e.valid = false;
        break;
      }
      const uint64_t size = static_cast<uint64_t>(st.st_size);
      if (size != e.tree.size()) e.tree.truncate(size);
      if ((rec.flags & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE)) &&
          rec.offset < size) {
        // Collapse and insert shift everything after the offset.
        const bool shifts = rec.flags & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE);
        e.tree.mark_dirty(rec.offset, shifts ? size - rec.offset : std::min(rec.length, size - rec.offset));
      }
      break;
    }
    default:
      break;
  }
}

void HashIndex::refresh(Entry& e, int fd) {
  int rfd = reopen_readable(fd);
  if (rfd < 0) throw_errno("cannot open " + e.tree.label() + " to hash it", errno);
  try {
    blocks_hashed_ += e.tree.refresh(rfd);
  } catch (...) {
    close(rfd);
    throw;
  }
  close(rfd);
}

void HashIndex::remove_saved_trees() {
  int dfd = openat(hashes_fd_, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  DIR* d = dfd >= 0 ? fdopendir(dfd) : nullptr;
  if (!d) return;
  std::vector<std::string> names;
  while (dirent* de = readdir(d))
    if (de->d_name[0] != '.') names.emplace_back(de->d_name);
  for (auto& n : names) unlinkat(dirfd(d), n.c_str(), 0);
  closedir(d);
}

void HashIndex::created(FileId fid) {
  auto ep = entry(fid);
  std::lock_guard lk(ep->mu);
  ep->tree = FileHashTree(block_size_, label(fid));
  ep->valid = true;
  ep->unsaved = true;
}

void HashIndex::with_tree(FileId fid, int fd, const std::function<void(const FileHashTree&)>& fn, bool rebuild) {
  auto ep = entry(fid);
  Entry& e = *ep;
  std::lock_guard lk(e.mu);
  if (rebuild) e.valid = false, FileHashTree::remove_saved(hashes_fd_, fid);
  ensure_valid(e, fid, fd);
  if (e.tree.dirty()) {
    refresh(e, fd);
    e.unsaved = true;
  }
  fn(e.tree);
}

Hash128 HashIndex::root(FileId fid, int fd) {
  Hash128 r;
  with_tree(fid, fd, [&](const FileHashTree& t) { r = t.root(); });
  return r;
}

void HashIndex::forget(FileId fid) {
  std::shared_ptr<Entry> ep;
  {
    std::lock_guard lk(map_mu_);
    auto it = entries_.find(fid);
    if (it != entries_.end()) {
      ep = it->second;
      entries_.erase(it);
    }
  }
  FileHashTree::remove_saved(hashes_fd_, fid);
}

void HashIndex::maybe_orphaned(FileId fid) {
  std::shared_ptr<Entry> ep;
  {
    std::lock_guard lk(map_mu_);
    auto it = entries_.find(fid);
    if (it == entries_.end()) return;
    ep = it->second;
  }
  Fd lease = files_.path(fid);
  struct stat st;
  if (lease && fstat(lease.get(), &st) == 0 && st.st_nlink > 0) return;
  forget(fid);
}

void HashIndex::reset_all() {
  std::unique_lock ck(change_mu_);
  std::lock_guard cp(checkpoint_mu_);
  {
    std::lock_guard lk(map_mu_);
    entries_.clear();
  }
  remove_saved_trees();
  log_->clear();
}

bool HashIndex::checkpoint() {
  std::lock_guard cp(checkpoint_mu_);
  std::vector<std::pair<FileId, std::shared_ptr<Entry>>> changed;
  {
    // Writers are held off only while the log switches files and we list what changed.
    std::unique_lock ck(change_mu_);
    log_->begin_checkpoint();
    std::lock_guard lk(map_mu_);
    for (auto& [fid, e] : entries_) {
      std::lock_guard el(e->mu);
      if (e->unsaved) changed.emplace_back(fid, e);
    }
  }
  if (changed.empty()) {
    log_->end_checkpoint();
    return true;
  }
  if (int err = sync_data()) {
    LOG_WARN("hash trees of %s: cannot sync the data (%s); checkpoint postponed", data_path_.c_str(), strerror(err));
    return false;
  }
  bool ok = true;
  std::vector<FileId> gone;
  for (auto& [fid, ep] : changed) {
    Entry& e = *ep;
    std::lock_guard el(e.mu);
    if (files_.handle(fid).empty()) continue;  // not learnt yet (a copy in progress): next time
    Fd lease = files_.path(fid);
    struct stat st;
    if (!lease || fstat(lease.get(), &st) != 0 || st.st_nlink == 0 || !S_ISREG(st.st_mode)) {
      gone.push_back(fid);  // unlinked for good: its tree has no use
      continue;
    }
    try {
      ensure_valid(e, fid, lease.get());
      if (e.tree.dirty()) refresh(e, lease.get());
      // An empty file's tree is rebuilt for free: saving one per empty file would cost a file
      // (and a sync) for each of them. The others are synced all at once below.
      if (e.tree.size() == 0) FileHashTree::remove_saved(hashes_fd_, fid);
      else e.tree.save(hashes_fd_, fid, /*durable=*/false);
      e.unsaved = false;
    } catch (const Error& err) {
      LOG_WARN("hash trees: %s", err.what());
      ok = false;
    }
  }
  for (FileId fid : gone) forget(fid);
  // The saved trees are durable before the log forgets what they cover.
  if (ok && durable_) {
    if (int err = sync_data()) {
      LOG_WARN("hash trees of %s: cannot sync the saved trees (%s); checkpoint postponed", data_path_.c_str(), strerror(err));
      ok = false;
    }
  }
  if (ok) log_->end_checkpoint();
  evict_clean();
  return ok;
}

// Trees that are saved and clean are reloaded when needed: keeping them all would make memory
// grow with the number of files ever changed. Under the exclusive change lock no writer is
// between before_change and after_change; an entry someone else holds is left alone.
void HashIndex::evict_clean() {
  std::unique_lock ck(change_mu_);
  std::lock_guard lk(map_mu_);
  for (auto it = entries_.begin(); it != entries_.end();) {
    Entry& e = *it->second;
    std::unique_lock el(e.mu, std::try_to_lock);
    if (el.owns_lock() && it->second.use_count() == 1 && !e.unsaved && !e.tree.dirty()) {
      el.unlock();
      it = entries_.erase(it);
    } else {
      ++it;
    }
  }
}

void HashIndex::refresh_dirty() {
  std::vector<std::pair<FileId, std::shared_ptr<Entry>>> dirty;
  {
    std::lock_guard lk(map_mu_);
    for (auto& [fid, e] : entries_) dirty.emplace_back(fid, e);
  }
  for (auto& [fid, ep] : dirty) {
    Entry& e = *ep;
    std::lock_guard el(e.mu);
    if (!e.valid || !e.tree.dirty()) continue;
    Fd lease = files_.path(fid);
    if (!lease) continue;  // gone: the next checkpoint drops it
    try {
      refresh(e, lease.get());
    } catch (const Error& err) {
      LOG_DEBUG("hash trees: %s", err.what());  // gone: the next checkpoint drops it
    }
  }
}

void HashIndex::start_checkpoints() {
  checkpoint_thread_ = std::thread([this] {
    std::unique_lock lk(stop_mu_);
    auto last_checkpoint = std::chrono::steady_clock::now();
    while (!stopping_) {
      if (stop_cv_.wait_for(lk, kRefreshInterval, [this] { return stopping_; })) break;
      lk.unlock();
      // Hash what changed soon after it changed (from the page cache, off the write path), so
      // that a re-attach finds the trees current instead of hashing a burst of writes then.
      refresh_dirty();
      if (std::chrono::steady_clock::now() - last_checkpoint >= kCheckpointInterval) {
        if (log_->entries() > 0) checkpoint();
        last_checkpoint = std::chrono::steady_clock::now();
      }
      lk.lock();
    }
  });
}

void HashIndex::stop_checkpoints() {
  {
    std::lock_guard lk(stop_mu_);
    stopping_ = true;
  }
  stop_cv_.notify_all();
  if (checkpoint_thread_.joinable()) checkpoint_thread_.join();
}

void HashIndex::close_clean() {
  stop_checkpoints();
  if (checkpoint()) log_->clear();
}

HashIndexStats HashIndex::stats() const {
  HashIndexStats s;
  s.blocks_hashed = blocks_hashed_;
  s.files_rebuilt = files_rebuilt_;
  s.recovered_files = recovered_files_;
  s.log_syncs = log_->syncs();
  return s;
}

}  // namespace blockrepl
