#include "blockrepl/namespace.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <linux/limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"

namespace blockrepl {

namespace {

void put_u64(std::string& b, uint64_t v) { b.append(reinterpret_cast<const char*>(&v), sizeof v); }
void put_str(std::string& b, const std::string& s) {
  put_u64(b, s.size());
  b += s;
}

}  // namespace

Hash128 entry_hash(const NsEntryInfo& e) {
  std::string b;
  b.reserve(128 + e.name.size() + e.link_target.size());
  put_str(b, e.name);
  put_u64(b, e.fid);
  put_u64(b, e.mode);
  put_u64(b, e.uid);
  put_u64(b, e.gid);
  if (!e.is_dir()) put_u64(b, e.size);
  put_u64(b, static_cast<uint64_t>(e.mtime.tv_sec));
  put_u64(b, static_cast<uint64_t>(e.mtime.tv_nsec));
  put_u64(b, e.rdev);
  put_str(b, e.link_target);
  put_u64(b, e.xattrs.size());
  for (auto& [n, v] : e.xattrs) {
    put_str(b, n);
    put_str(b, v);
  }
  b.append(reinterpret_cast<const char*>(&e.content), sizeof e.content);
  return hash_bytes(b.data(), b.size());
}

const NsEntryInfo* DirInfo::find(const std::string& name) const {
  auto it = std::lower_bound(entries.begin(), entries.end(), name,
                             [](const NsEntryInfo& e, const std::string& n) { return e.name < n; });
  return it != entries.end() && it->name == name ? &*it : nullptr;
}

std::string join_path(const std::string& dir, const std::string& name) { return dir.empty() ? name : dir + "/" + name; }

NamespaceSnapshot NamespaceSnapshot::take(int root_fd, HashIndex& hashes, bool assign_ids, bool deep) {
  NamespaceSnapshot s;
  s.walk(root_fd, "", kRootFileId, hashes, assign_ids, deep);
  return s;
}

Hash128 NamespaceSnapshot::walk(int dirfd, const std::string& rel, FileId fid, HashIndex& hashes, bool assign_ids, bool deep) {
  DirInfo info;
  info.fid = fid;
  if (struct stat self; fstat(dirfd, &self) == 0) info.mtime = self.st_mtim;
  // An unreadable directory is listed as what could be read: its hash then differs from the
  // peer's and the diff names it.
  std::vector<std::string> names;
  for (DirEntry& de : list_dir(dirfd, rel.empty()).entries) names.push_back(std::move(de.name));
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    struct stat st;
    if (fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) continue;  // gone meanwhile
    auto id = read_file_id(dirfd, name.c_str());
    if (!id) {
      if (!assign_ids) {
        LOG_DEBUG("namespace: %s has no file id; left out", join_path(rel, name).c_str());
        continue;
      }
      int err = 0;
      FileId nf = assign_file_id(dirfd, name.c_str(), &err);
      if (nf == kInvalidFileId) continue;
      id = nf;
    }
    NsEntryInfo e;
    e.name = name;
    e.fid = *id;
    e.mode = st.st_mode;
    e.uid = st.st_uid;
    e.gid = st.st_gid;
    e.size = S_ISREG(st.st_mode) || S_ISLNK(st.st_mode) ? static_cast<uint64_t>(st.st_size) : 0;
    e.rdev = S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode) ? st.st_rdev : 0;
    e.mtime = st.st_mtim;
    e.xattrs = list_xattrs(fd_path(dirfd, name.c_str()));
    const std::string path = join_path(rel, name);
    if (S_ISLNK(st.st_mode)) {
      char buf[4096];
      ssize_t n = readlinkat(dirfd, name.c_str(), buf, sizeof buf);
      if (n > 0) e.link_target.assign(buf, static_cast<size_t>(n));
    } else if (S_ISREG(st.st_mode)) {
      int ffd = openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
      if (ffd < 0) continue;
      try {
        hashes.with_tree(*id, ffd, [&](const FileHashTree& t) {
          e.content = t.root();
          e.size = t.size();  // what the hashes describe, even if the file grew since the stat
        }, deep);
      } catch (...) {
        close(ffd);
        throw;
      }
      close(ffd);
    } else if (S_ISDIR(st.st_mode)) {
      int sub = openat(dirfd, name.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
      if (sub < 0) continue;
      e.content = walk(sub, path, *id, hashes, assign_ids, deep);
      close(sub);
    }
    e.hash = entry_hash(e);
    info.entries.push_back(std::move(e));
    const NsEntryInfo* stored = &info.entries.back();
    (void)stored;
  }
  std::string b;
  for (const auto& e : info.entries) {
    put_str(b, e.name);
    b.append(reinterpret_cast<const char*>(&e.hash), sizeof e.hash);
  }
  info.listing_hash = hash_bytes(b.data(), b.size());
  const Hash128 h = info.listing_hash;
  auto [it, inserted] = dirs_.emplace(rel, std::move(info));
  (void)inserted;
  // Index the entries now that they sit at their final address.
  for (const auto& e : it->second.entries) by_fid_.try_emplace(e.fid, Place{join_path(rel, e.name), &e});
  return h;
}

const DirInfo* NamespaceSnapshot::dir(const std::string& path) const {
  auto it = dirs_.find(path);
  return it == dirs_.end() ? nullptr : &it->second;
}

const NamespaceSnapshot::Place* NamespaceSnapshot::find(FileId fid) const {
  auto it = by_fid_.find(fid);
  return it == by_fid_.end() ? nullptr : &it->second;
}

Hash128 NamespaceSnapshot::root_hash() const {
  const DirInfo* r = dir("");
  return r ? r->listing_hash : Hash128{};
}

kj::ArrayPtr<const kj::byte> hash_bytes_of(const Hash128& h) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(&h), sizeof h);
}

Hash128 hash_from(capnp::Data::Reader d) {
  Hash128 h;
  if (d.size() != sizeof h) throw Error("malformed hash from peer (" + std::to_string(d.size()) + " bytes)", EPROTO);
  memcpy(&h, d.begin(), sizeof h);
  return h;
}

void to_wire(const NsEntryInfo& e, wire::NsEntry::Builder out) {
  out.setName(kj::arrayPtr(reinterpret_cast<const kj::byte*>(e.name.data()), e.name.size()));
  out.setFid(e.fid);
  out.setMode(e.mode);
  out.setUid(e.uid);
  out.setGid(e.gid);
  out.setSize(e.size);
  out.setRdev(e.rdev);
  out.setMtimeSec(e.mtime.tv_sec);
  out.setMtimeNsec(e.mtime.tv_nsec);
  out.setLinkTarget(kj::arrayPtr(reinterpret_cast<const kj::byte*>(e.link_target.data()), e.link_target.size()));
  auto xl = out.initXattrs(static_cast<unsigned>(e.xattrs.size()));
  for (unsigned i = 0; i < e.xattrs.size(); i++) {
    xl[i].setName(e.xattrs[i].first);
    xl[i].setValue(kj::arrayPtr(reinterpret_cast<const kj::byte*>(e.xattrs[i].second.data()), e.xattrs[i].second.size()));
  }
  out.setHash(hash_bytes_of(e.hash));
  out.setContent(hash_bytes_of(e.content));
}

NsEntryInfo from_wire(wire::NsEntry::Reader in, bool at_volume_root) {
  NsEntryInfo e;
  auto name = in.getName();
  e.name.assign(reinterpret_cast<const char*>(name.begin()), name.size());
  // The metadata folder's name only at the root: refusing it everywhere failed every Merkle
  // diff of a volume with a `sub/.blockrepl` (found by tests/fuzz/fuzz_namespace).
  if (!valid_path_component(e.name) || (at_volume_root && e.name == kMetadataDirName))
    throw Error("peer sent a directory entry with a bad name", EPROTO);
  e.fid = in.getFid();
  if (e.fid == kInvalidFileId) throw Error("peer sent entry '" + e.name + "' without a file id", EPROTO);
  e.mode = in.getMode();
  const mode_t type = e.mode & S_IFMT;
  if (type != S_IFREG && type != S_IFDIR && type != S_IFLNK && type != S_IFIFO && type != S_IFSOCK && type != S_IFCHR &&
      type != S_IFBLK)
    throw Error("peer sent entry '" + e.name + "' of an unknown type", EPROTO);
  e.uid = in.getUid();
  e.gid = in.getGid();
  e.size = in.getSize();
  e.rdev = in.getRdev();
  e.mtime = {static_cast<time_t>(in.getMtimeSec()), static_cast<long>(in.getMtimeNsec())};
  if (e.mtime.tv_nsec < 0 || e.mtime.tv_nsec >= 1000000000L) throw Error("peer sent a bad mtime for '" + e.name + "'", EPROTO);
  auto lt = in.getLinkTarget();
  e.link_target.assign(reinterpret_cast<const char*>(lt.begin()), lt.size());
  if (S_ISLNK(e.mode) && (e.link_target.empty() || e.link_target.size() >= 4096 || e.link_target.find('\0') != std::string::npos))
    throw Error("peer sent symlink '" + e.name + "' with a bad target", EPROTO);
  const std::string what = "entry '" + e.name + "'";
  // No more names than listxattr(2) can give a master (XATTR_LIST_MAX bytes, each with its NUL):
  // list elements may share their bytes, so a 200-byte message could make millions of copies
  // (found by tests/fuzz/fuzz_namespace: 30 s and 1 GiB for one entry).
  size_t listed = 0;
  for (auto x : in.getXattrs()) {
    auto v = x.getValue();
    listed += x.getName().size() + 1;
    check_field_size(listed, XATTR_LIST_MAX, "xattr list", "peer", what.c_str());
    check_field_size(x.getName().size(), kMaxNameBytes, "xattr name", "peer", what.c_str());
    check_field_size(v.size(), kMaxXattrValueBytes, "xattr value", "peer", what.c_str());
    e.xattrs.emplace_back(x.getName().cStr(), std::string(reinterpret_cast<const char*>(v.begin()), v.size()));
  }
  e.hash = hash_from(in.getHash());
  e.content = hash_from(in.getContent());
  return e;
}

bool valid_relative_path(const std::string& rel) {
  if (rel.empty()) return true;
  if (rel.size() > 4096) return false;
  size_t start = 0;
  bool first = true;
  while (start <= rel.size()) {
    size_t slash = rel.find('/', start);
    if (slash == std::string::npos) slash = rel.size();
    const std::string_view c = std::string_view(rel).substr(start, slash - start);
    if (!valid_path_component(c)) return false;
    if (first && c == kMetadataDirName) return false;
    first = false;
    start = slash + 1;
  }
  return true;
}

int open_dir_path(int root_fd, const std::string& rel) {
  if (!valid_relative_path(rel)) {
    errno = EINVAL;
    return -1;
  }
  // Checked above, and resolved by the kernel beneath root_fd without following any symlink:
  // a directory swapped for a symlink between the check and the open leads nowhere else.
  return open_beneath(root_fd, rel.empty() ? "." : rel.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
}

}  // namespace blockrepl
