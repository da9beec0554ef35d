#include "blockrepl/copy.h"

#include <cerrno>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <linux/limits.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/file_id.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"
#include "blockrepl/store.h"

namespace blockrepl {

namespace {

constexpr size_t kChunkBytes = 1u << 20;

kj::ArrayPtr<const kj::byte> bytes_of(const std::string& s) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}

class TreeSender {
 public:
  TreeSender(Connection& conn, bool assign_ids) : conn_(conn), assign_ids_(assign_ids) {}

  void walk(int dirfd, const std::string& rel) {
    // list_dir closes the stream before we descend: a copy aborted by an exception leaks none.
    // A directory removed while we walk lists as empty: the records will tell.
    for (const DirEntry& de : list_dir(dirfd, rel.empty()).entries) send_entry(dirfd, rel, de.name);
  }

  CopyStats stats;

 private:
  void send_entry(int dirfd, const std::string& rel, const std::string& name) {
    const std::string path = rel.empty() ? name : rel + "/" + name;
    struct stat st;
    if (fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return;  // gone meanwhile
    auto fid = read_file_id(dirfd, name.c_str());
    if (!fid) {
      if (!assign_ids_) return;
      int err = 0;
      FileId nf = assign_file_id(dirfd, name.c_str(), &err);
      if (nf == kInvalidFileId) return;
      fid = nf;
    }
    capnp::MallocMessageBuilder mb;
    auto e = mb.initRoot<wire::Message>().initCopyEntry();
    e.setPath(bytes_of(path));
    e.setFid(*fid);
    e.setMode(st.st_mode);
    e.setUid(st.st_uid);
    e.setGid(st.st_gid);
    e.setSize(static_cast<uint64_t>(st.st_size));
    e.setRdev(st.st_rdev);
    e.setAtimeSec(st.st_atim.tv_sec);
    e.setAtimeNsec(st.st_atim.tv_nsec);
    e.setMtimeSec(st.st_mtim.tv_sec);
    e.setMtimeNsec(st.st_mtim.tv_nsec);
    const std::string proc = fd_path(dirfd, name.c_str());
    auto xattrs = list_xattrs(proc);
    auto xl = e.initXattrs(static_cast<unsigned>(xattrs.size()));
    for (size_t i = 0; i < xattrs.size(); i++) {
      xl[static_cast<unsigned>(i)].setName(xattrs[i].first);
      xl[static_cast<unsigned>(i)].setValue(bytes_of(xattrs[i].second));
    }
    stats.files++;
    if (S_ISLNK(st.st_mode)) {
      char buf[4096];
      ssize_t n = readlinkat(dirfd, name.c_str(), buf, sizeof buf);
      if (n < 0) return;
      e.setLinkTarget(kj::arrayPtr(reinterpret_cast<const kj::byte*>(buf), static_cast<size_t>(n)));
      conn_.send(mb);
      return;
    }
    if (S_ISREG(st.st_mode) && st.st_nlink > 1) {
      auto key = std::make_pair(st.st_dev, st.st_ino);
      auto it = links_.find(key);
      if (it != links_.end()) {
        e.setHardLinkOf(bytes_of(it->second));
        conn_.send(mb);
        return;
      }
      links_.emplace(key, path);
    }
    if (S_ISDIR(st.st_mode)) {
      conn_.send(mb);
      OwnedFd sub(openat(dirfd, name.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
      if (sub) walk(sub.get(), path);
      return;
    }
    if (!S_ISREG(st.st_mode) || st.st_size == 0) {
      conn_.send(mb);
      return;
    }
    OwnedFd fd(openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
    if (!fd) {
      conn_.send(mb);  // at least the entry; its data follows in records
      return;
    }
    send_data(fd.get(), mb, e, static_cast<uint64_t>(st.st_size));
  }

  // Sends the file's data regions (holes stay holes), the first chunk in the entry itself.
  void send_data(int fd, capnp::MallocMessageBuilder& first, wire::CopyEntry::Builder e, uint64_t size) {
    std::vector<std::pair<off_t, size_t>> chunks;
    for (off_t pos = 0; static_cast<uint64_t>(pos) < size;) {
      off_t data = lseek(fd, pos, SEEK_DATA);
      if (data < 0) break;  // ENXIO: only a hole is left
      off_t hole = lseek(fd, data, SEEK_HOLE);
      if (hole < 0 || static_cast<uint64_t>(hole) > size) hole = static_cast<off_t>(size);
      for (off_t off = data; off < hole; off += static_cast<off_t>(kChunkBytes))
        chunks.emplace_back(off, static_cast<size_t>(std::min<off_t>(static_cast<off_t>(kChunkBytes), hole - off)));
      pos = hole;
    }
    if (chunks.empty()) {
      conn_.send(first);
      return;
    }
    std::string buf(kChunkBytes, '\0');
    const auto path = e.getPath();
    for (size_t i = 0; i < chunks.size(); i++) {
      ssize_t n = pread(fd, buf.data(), chunks[i].second, chunks[i].first);
      // A read error ends the copy (and the slave hears why); a file that shrank meanwhile
      // reads short, and the records that follow fix it.
      if (n < 0) throw_errno("cannot read " + std::string(reinterpret_cast<const char*>(path.begin()), path.size()) + " for the full copy", errno);
      auto data = kj::arrayPtr(reinterpret_cast<const kj::byte*>(buf.data()), static_cast<size_t>(n));
      const bool more = i + 1 < chunks.size();
      stats.bytes += static_cast<uint64_t>(n);
      if (i == 0) {
        e.setChunkOffset(static_cast<uint64_t>(chunks[i].first));
        e.setChunk(data);
        e.setMore(more);
        conn_.send(first);
        continue;
      }
      capnp::MallocMessageBuilder mb;
      auto c = mb.initRoot<wire::Message>().initCopyEntry();
      c.setPath(path);
      c.setFid(e.getFid());
      c.setMode(e.getMode());
      c.setSize(size);
      c.setChunkOffset(static_cast<uint64_t>(chunks[i].first));
      c.setChunk(data);
      c.setMore(more);
      conn_.send(mb);
    }
  }

  Connection& conn_;
  bool assign_ids_;
  std::map<std::pair<dev_t, ino_t>, std::string> links_;
};

std::string text_of(capnp::Data::Reader d) { return std::string(reinterpret_cast<const char*>(d.begin()), d.size()); }

}  // namespace

CopyStats send_full_copy(Connection& conn, int root_fd, bool assign_ids) {
  TreeSender sender(conn, assign_ids);
  sender.walk(root_fd, "");
  if (struct stat st; fstat(root_fd, &st) == 0) sender.stats.root_mtime = st.st_mtim;
  return sender.stats;
}

CopyReceiver::CopyReceiver(Store& store) : store_(store), root_fd_(store.root_fd()) {}

void CopyReceiver::write_chunk(const std::string& path, FileId fid, uint64_t off, const kj::byte* data, size_t n) {
  if (n == 0) return;
  // Through the Store, as every write: the hash trees and early writeback follow it.
  Record rec;
  rec.op = Op::write;
  rec.fid = fid;
  rec.offset = off;
  rec.data = std::string_view(reinterpret_cast<const char*>(data), n);
  Targets t;
  t.fd = file_fd_;
  if (int err = store_.apply(rec, t)) throw Error("cannot write " + path + ": " + Store::failure_text(err), err);
  stats_.bytes += n;
}

CopyReceiver::~CopyReceiver() {
  if (file_fd_ >= 0) close(file_fd_);
}

// Opens the directory that holds `path`, component by component without following symlinks,
// so that no path from a peer can lead outside the backing directory.
int CopyReceiver::open_parent(const std::string& path, std::string* leaf) {
  if (path.empty() || path.front() == '/' || path.size() > 4096) throw Error("bad path '" + path + "'", EPROTO);
  std::vector<std::string> parts;
  size_t start = 0;
  while (start <= path.size()) {
    size_t slash = path.find('/', start);
    if (slash == std::string::npos) slash = path.size();
    std::string c = path.substr(start, slash - start);
    if (!valid_path_component(c)) throw Error("bad path '" + path + "'", EPROTO);
    parts.push_back(c);
    start = slash + 1;
  }
  if (parts.front() == kMetadataDirName) throw Error("it tried to write into the metadata folder", EPROTO);
  // Nor below the file system's lost+found, which no record may make, name or enter.
  if (parts.size() > 1 && parts.front() == kLostFoundName) throw Error("it tried to write into lost+found", EPROTO);
  int fd = openat(root_fd_, ".", O_PATH | O_DIRECTORY | O_CLOEXEC);
  for (size_t i = 0; i + 1 < parts.size(); i++) {
    int next = openat(fd, parts[i].c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    int e = errno;
    close(fd);
    if (next < 0) throw_errno("cannot open directory of " + path, e);
    fd = next;
  }
  *leaf = parts.back();
  return fd;
}

// Times through the Store, as every change to the backing directory.
void CopyReceiver::set_times(FileId fid, int fd, const timespec times[2], const std::string& path) {
  Record rec;
  rec.op = Op::setattr;
  rec.fid = fid;
  rec.attr_valid = kAttrAtime | kAttrMtime;
  rec.atime = times[0];
  rec.mtime = times[1];
  Targets t;
  t.path_fd = fd;
  if (int err = store_.apply(rec, t)) throw Error("cannot set the times of " + path + ": " + Store::failure_text(err), err);
}

void CopyReceiver::finish_file() {
  if (file_fd_ < 0) return;
  Record rec;
  rec.op = Op::truncate;
  rec.fid = file_fid_;
  rec.offset = file_size_;
  Targets t;
  t.fd = file_fd_;
  int err = store_.apply(rec, t);
  if (!err) {
    try {
      set_times(file_fid_, file_fd_, file_times_, file_path_);
    } catch (...) {
      close(file_fd_);
      file_fd_ = -1;
      throw;
    }
  }
  close(file_fd_);
  file_fd_ = -1;
  if (err) throw Error("cannot size " + file_path_ + ": " + Store::failure_text(err), err);
  file_path_.clear();
}

namespace {

// A copy entry's fields within their limits, before any of them is used.
void check_copy_entry_sizes(wire::CopyEntry::Reader e) {
  const char* what = "copy entry";
  check_field_size(e.getPath().size(), kMaxPathBytes, "path", "the upstream", what);
  check_field_size(e.getLinkTarget().size(), kMaxPathBytes, "link target", "the upstream", what);
  check_field_size(e.getHardLinkOf().size(), kMaxPathBytes, "hard link path", "the upstream", what);
  check_field_size(e.getChunk().size(), kMaxRecordDataBytes, "chunk", "the upstream", what);
  size_t listed = 0;  // as namespace.cpp's from_wire: at most what listxattr(2) can list
  for (auto x : e.getXattrs()) {
    listed += x.getName().size() + 1;
    check_field_size(listed, XATTR_LIST_MAX, "xattr list", "the upstream", what);
    check_field_size(x.getName().size(), kMaxNameBytes, "xattr name", "the upstream", what);
    check_field_size(x.getValue().size(), kMaxXattrValueBytes, "xattr value", "the upstream", what);
  }
}

}  // namespace

void CopyReceiver::apply(wire::CopyEntry::Reader e) {
  check_copy_entry_sizes(e);
  const std::string path = text_of(e.getPath());
  auto chunk = e.getChunk();
  // A further chunk of the file being received.
  if (file_fd_ >= 0 && path == file_path_) {
    write_chunk(path, file_fid_, e.getChunkOffset(), chunk.begin(), chunk.size());
    if (!e.getMore()) finish_file();
    return;
  }
  finish_file();
  std::string leaf;
  OwnedFd dir(open_parent(path, &leaf));
  const mode_t mode = e.getMode();
  const timespec times[2] = {{static_cast<time_t>(e.getAtimeSec()), static_cast<long>(e.getAtimeNsec())},
                             {static_cast<time_t>(e.getMtimeSec()), static_cast<long>(e.getMtimeNsec())}};
  stats_.files++;
  // Every entry is a record applied by the Store: the one place where names, types, modes and
  // xattrs from a peer are checked and where metadata reaches the disk.
  Record rec;
  rec.parent = read_file_id(dir.get(), "").value_or(kInvalidFileId);
  rec.name = leaf;
  rec.fid = e.getFid();
  rec.uid = e.getUid();
  rec.gid = e.getGid();
  rec.mode = mode;
  Targets t;
  t.parent_fd = dir.get();
  std::string target;
  if (e.getHardLinkOf().size() > 0) {
    std::string other_leaf;
    OwnedFd other_dir(open_parent(text_of(e.getHardLinkOf()), &other_leaf));
    OwnedFd other(openat(other_dir.get(), other_leaf.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
    if (!other) throw_errno("cannot find " + text_of(e.getHardLinkOf()) + " to link " + path, errno);
    rec.op = Op::link;
    t.path_fd = other.get();
    if (int err = store_.apply(rec, t)) throw Error("cannot link " + path + ": " + Store::failure_text(err), err);
    return;
  }
  // The type, mode, device number and target are the record policy's to judge (in the Store).
  if (S_ISDIR(mode)) {
    rec.op = Op::mkdir;
  } else if (S_ISLNK(mode)) {
    target = text_of(e.getLinkTarget());
    rec.op = Op::symlink;
    rec.data = target;
  } else {
    rec.op = Op::create;
    rec.rdev = e.getRdev();
  }
  if (int err = store_.apply(rec, t)) throw Error("cannot create " + path + ": " + Store::failure_text(err), err);
  OwnedFd entry(openat(dir.get(), leaf.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  if (!entry) throw_errno("cannot open " + path + " after creating it", errno);
  for (auto x : e.getXattrs()) {
    Record xr;
    xr.op = Op::setxattr;
    xr.fid = rec.fid;
    xr.name = x.getName();
    if (xr.name.rfind(kReservedXattrPrefix, 0) == 0) continue;  // ours: never from a peer
    auto v = x.getValue();
    xr.data = std::string_view(reinterpret_cast<const char*>(v.begin()), v.size());
    Targets xt;
    xt.path_fd = entry.get();
    if (int err = store_.apply(xr, xt)) throw Error("cannot set xattr " + xr.name + " on " + path + ": " + Store::failure_text(err), err);
  }
  if (S_ISDIR(mode)) {
    // Set once the directory is complete: its entries change its times while copying.
    dir_times_.push_back({path, {times[0], times[1]}});
  } else if (S_ISREG(mode)) {
    file_fd_ = openat(dir.get(), leaf.c_str(), O_WRONLY | O_NOFOLLOW | O_CLOEXEC);
    if (file_fd_ < 0) throw_errno("cannot open " + path + " to write it", errno);
    file_path_ = path;
    file_size_ = e.getSize();
    file_times_[0] = times[0];
    file_times_[1] = times[1];
    file_fid_ = rec.fid;
    write_chunk(path, file_fid_, e.getChunkOffset(), chunk.begin(), chunk.size());
    if (!e.getMore()) finish_file();
  } else {
    set_times(rec.fid, entry.get(), times, path);
  }
}

void CopyReceiver::finish(timespec root_mtime) {
  finish_file();
  // Deepest first, so setting a child's times does not disturb its parent's afterwards.
  for (auto it = dir_times_.rbegin(); it != dir_times_.rend(); ++it) {
    std::string leaf;
    OwnedFd parent(open_parent(it->path, &leaf));
    OwnedFd dir(openat(parent.get(), leaf.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!dir) throw_errno("cannot open directory " + it->path + " to set its times", errno);
    set_times(read_file_id(dir.get(), "").value_or(kInvalidFileId), dir.get(), it->times, it->path);
  }
  if (root_mtime.tv_nsec < 0 || root_mtime.tv_nsec >= 1000000000L) throw Error("bad root mtime", EPROTO);
  const timespec root_times[2] = {{0, UTIME_OMIT}, root_mtime};
  set_times(kRootFileId, root_fd_, root_times, "the volume root");
}

void remove_tree_at(int dirfd, const char* name) {
  int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd >= 0) {
    DIR* d = fdopendir(fd);
    if (d) {
      std::vector<std::pair<std::string, bool>> entries;
      while (dirent* de = readdir(d)) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        entries.emplace_back(de->d_name, de->d_type == DT_DIR);
      }
      for (auto& [n, is_dir] : entries) {
        if (is_dir) remove_tree_at(fd, n.c_str());
        else unlinkat(fd, n.c_str(), 0);
      }
      closedir(d);
    } else {
      close(fd);
    }
  }
  unlinkat(dirfd, name, AT_REMOVEDIR);
}

void wipe_data_dir(int root_fd) {
  const DirListing listing = list_dir(root_fd, /*at_volume_root=*/true);
  if (listing.error) throw_errno("cannot read the data directory to wipe it", listing.error);
  for (const DirEntry& e : listing.entries) {
    if (e.is_dir()) remove_tree_at(root_fd, e.name.c_str());
    else unlinkat(root_fd, e.name.c_str(), 0);
  }
}

std::vector<std::string> data_dir_entries(int root_fd, size_t max) {
  DirListing listing = list_dir(root_fd, /*at_volume_root=*/true, max);
  if (listing.error) throw_errno("cannot read the data directory", listing.error);
  std::vector<std::string> names;
  for (DirEntry& e : listing.entries) names.push_back(std::move(e.name));
  return names;
}

bool data_dir_is_empty(int root_fd) {
  try {
    return data_dir_entries(root_fd, 1).empty();
  } catch (const Error&) {
    return false;  // unreadable: not known to be empty
  }
}

}  // namespace blockrepl
