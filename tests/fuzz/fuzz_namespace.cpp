// fuzz_namespace: namespace entries, as a peer sends them and as the disk holds them.
//
// Byte 0 even: the rest is a Cap'n Proto flat array whose root is an NsEntry (as in a
//   dirListing; of the root directory when byte 0 has bit 1 set): from_wire (namespace.cpp)
//   validates it; an accepted entry encodes (to_wire) and decodes to the same entry with the
//   same entry_hash.
// Byte 0 odd: the rest is a little program that builds a directory tree on a fresh volume with
//   plain system calls (what foreign tools or a crash may leave: any names, symlinks, fifos, hard
//   links, user xattrs, file-id xattrs of any length and value, an entry named like the metadata
//   folder below the root), then NamespaceSnapshot::take walks it (assigning ids when byte 0 has
//   bit 1 set, rehashing when bit 2 is) as a master does for a Merkle diff. Checked: every entry
//   the master would list encodes to_wire and is accepted by the slave's from_wire (what a master
//   sends, a slave takes), and every listed directory opens with open_dir_path.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <capnp/serialize.h>

#include <string>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/namespace.h"
#include "fuzz_util.h"

using namespace blockrepl;
using namespace blockrepl::fuzz;

namespace {

void check_same(const NsEntryInfo& a, const NsEntryInfo& b) {
  FUZZ_CHECK(a.name == b.name && a.fid == b.fid && a.mode == b.mode && a.uid == b.uid && a.gid == b.gid &&
             a.size == b.size && a.rdev == b.rdev && a.mtime.tv_sec == b.mtime.tv_sec &&
             a.mtime.tv_nsec == b.mtime.tv_nsec && a.link_target == b.link_target && a.xattrs == b.xattrs &&
             a.hash == b.hash && a.content == b.content);
  FUZZ_CHECK(entry_hash(a) == entry_hash(b));
}

NsEntryInfo round_trip(const NsEntryInfo& e, bool at_root) {
  capnp::MallocMessageBuilder mb;
  auto w = mb.initRoot<wire::NsEntry>();
  to_wire(e, w);
  return from_wire(w.asReader(), at_root);
}

void decode_entry(bool at_root, const uint8_t* data, size_t size) {
  auto words = kj::heapArray<capnp::word>(size / sizeof(capnp::word));
  memcpy(words.begin(), data, words.size() * sizeof(capnp::word));
  capnp::ReaderOptions opts;
  opts.traversalLimitInWords = kTraversalLimitWords;
  opts.nestingLimit = 16;
  try {
    capnp::FlatArrayMessageReader reader(words.asPtr(), opts);
    NsEntryInfo e = from_wire(reader.getRoot<wire::NsEntry>(), at_root);
    (void)entry_hash(e);
    check_same(e, round_trip(e, at_root));
  } catch (const std::exception&) {
  }
}

// Reads the tree-building program.
struct Input {
  const uint8_t* p;
  size_t n;
  bool empty() const { return n == 0; }
  uint8_t byte() {
    if (!n) return 0;
    n--;
    return *p++;
  }
  std::string bytes(size_t len) {
    len = std::min(len, n);
    std::string s(reinterpret_cast<const char*>(p), len);
    p += len;
    n -= len;
    return s;
  }
  // A name: one of a few that matter, or up to 255 raw bytes (no '/', no NUL: the kernel's rule).
  std::string name() {
    static const char* const special[] = {kMetadataDirName, kLostFoundName, "a", "b", "..x", "dir", ".hidden", "f"};
    uint8_t len = byte();
    if (len >= 0xf8) return special[len - 0xf8];
    std::string s = bytes(len);
    for (char& c : s)
      if (c == '/' || c == '\0') c = '_';
    if (s.empty() || s == "." || s == "..") s = "e";
    return s;
  }
};

void build_and_walk(uint8_t flags, const uint8_t* data, size_t size) {
  Volume v;
  std::vector<int> dirs{open(v.dir.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  std::vector<std::pair<int, std::string>> entries;  // (directory index, name) created so far
  Input in{data, size};
  for (int op = 0; op < 48 && !in.empty(); op++) {
    const uint8_t code = in.byte();
    const int di = static_cast<int>(in.byte() % dirs.size());
    const int d = dirs[di];
    switch (code % 8) {
      case 0: {  // mkdir
        std::string n = in.name();
        if (mkdirat(d, n.c_str(), 0755) == 0) {
          int fd = openat(d, n.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
          if (fd >= 0) dirs.push_back(fd);
          entries.emplace_back(di, n);
        }
        break;
      }
      case 1: {  // a regular file with some data (maybe past a hole)
        std::string n = in.name();
        const size_t len = in.byte() * 61u;
        const off_t at = (in.byte() & 3) * 5000;
        int fd = openat(d, n.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd >= 0) {
          std::string content(len, static_cast<char>(code));
          if (pwrite(fd, content.data(), content.size(), at) < 0) {}
          close(fd);
          entries.emplace_back(di, n);
        }
        break;
      }
      case 2: {  // symlink
        std::string n = in.name();
        std::string target = in.bytes(in.byte() * 17u);
        for (char& c : target)
          if (c == '\0') c = '.';
        if (target.empty()) target = "t";
        if (symlinkat(target.c_str(), d, n.c_str()) == 0) entries.emplace_back(di, n);
        break;
      }
      case 3: {  // fifo
        std::string n = in.name();
        if (mkfifoat(d, n.c_str(), 0600 | (in.byte() & 07000)) == 0) entries.emplace_back(di, n);
        break;
      }
      case 4: {  // a user xattr on an entry
        if (entries.empty()) break;
        auto& [ed, en] = entries[in.byte() % entries.size()];
        std::string xn = "user." + in.bytes(in.byte() % 40);
        for (char& c : xn)
          if (c == '\0') c = 'x';
        std::string xv = in.bytes(in.byte() * 3u);
        lsetxattr(fd_path(dirs[ed], en.c_str()).c_str(), xn.c_str(), xv.data(), xv.size(), 0);
        break;
      }
      case 5: {  // a file id xattr of any length and value (or a valid one)
        if (entries.empty()) break;
        auto& [ed, en] = entries[in.byte() % entries.size()];
        std::string raw = in.bytes(in.byte() % 12);
        const std::string p = fd_path(dirs[ed], en.c_str());
        lsetxattr(p.c_str(), kFileIdXattr, raw.data(), raw.size(), 0);
        break;
      }
      case 6: {  // a hard link of an entry
        if (entries.empty()) break;
        auto [ed, en] = entries[in.byte() % entries.size()];
        std::string n = in.name();
        if (linkat(dirs[ed], en.c_str(), d, n.c_str(), 0) == 0) entries.emplace_back(di, n);
        break;
      }
      case 7: {  // times and mode of an entry
        if (entries.empty()) break;
        auto& [ed, en] = entries[in.byte() % entries.size()];
        const timespec t[2] = {{in.byte() * 1000000L, in.byte() * 3000000L}, {in.byte() * 1000000L, in.byte() * 3900000L}};
        utimensat(dirs[ed], en.c_str(), t, AT_SYMLINK_NOFOLLOW);
        fchmodat(dirs[ed], en.c_str(), 0600 | ((in.byte() & 7) << 6), 0);
        break;
      }
    }
  }
  for (int fd : dirs) close(fd);
  try {
    const NamespaceSnapshot snap = NamespaceSnapshot::take(v.root_fd, *v.hashes, flags & 2, flags & 4);
    (void)snap.root_hash();
    std::vector<std::string> todo{""};
    while (!todo.empty()) {
      const std::string path = todo.back();
      todo.pop_back();
      const DirInfo* dir = snap.dir(path);
      FUZZ_CHECK(dir != nullptr);
      FUZZ_CHECK(valid_relative_path(path));
      const int dfd = open_dir_path(v.root_fd, path);
      FUZZ_CHECK(dfd >= 0);
      close(dfd);
      for (const NsEntryInfo& e : dir->entries) {
        NsEntryInfo back;
        try {
          back = round_trip(e, path.empty());
        } catch (const Error& err) {
          fail(std::string("the slave refuses an entry a master lists: ") + join_path(path, e.name) + ": " + err.what());
        }
        check_same(e, back);
        FUZZ_CHECK(e.hash == entry_hash(e));
        FUZZ_CHECK(snap.find(e.fid) != nullptr);
        if (e.is_dir()) todo.push_back(join_path(path, e.name));
      }
    }
  } catch (const Error&) {
    // An I/O error of the walk (a file that cannot be hashed) is the walk's answer, not a bug.
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  quiet_logs();
  if (size < 1) return 0;
  if (data[0] % 2 == 0) decode_entry(data[0] & 2, data + 1, size - 1);
  else build_and_walk(data[0], data + 1, size - 1);
  return 0;
}
