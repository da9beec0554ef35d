// fuzz_dirty_log: the dirty-region log (<meta>/dirty-log.0 and .1, hash_tree.cpp DirtyLog) and
// the recovery that reads it (HashIndex's constructor, hash_index.cpp).
//
// Input: byte 0 flags, bytes 1-2 where the rest is cut into dirty-log.0 and dirty-log.1. Flag
// bit 0: the harness sets every 24-byte record's check (XXH3-64, seeded) so records get past it;
// bit 1: a valid header replaces the first 32 bytes; bit 2: also run a HashIndex recovery.
// Checked:
//  - DirtyLog::load() of a damaged log answers nullopt, and so does the next load (the verdict
//    is kept); a good one gives the same entries when loaded again; notes, a sync and a
//    checkpoint after it behave (what was synced is logged, a checkpoint forgets it).
//  - Recovery: a volume whose trees were saved at a checkpoint, a file changed behind the
//    index's back, then the fuzzed log: HashIndex recovers; when the log names the changed
//    extent (or the whole file, or is damaged) the recovered tree is the data's.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/hash_tree.h"
#include "fuzz_util.h"

using namespace blockrepl;
using namespace blockrepl::fuzz;

namespace {

constexpr uint64_t kLogSeed = 0x626c6f636b72706cULL;  // as hash_tree.cpp

std::string fix_up(std::string f, uint8_t flags) {
  if ((flags & 2) && f.size() >= 32) {
    char h[32] = {'B', 'R', 'D', 'I', 'R', 'T', 'Y', '1'};
    const uint32_t version = 1, shift = DirtyLog::kExtentShift;
    memcpy(h + 8, &version, 4);
    memcpy(h + 12, &shift, 4);
    const uint64_t check = XXH3_64bits_withSeed(h, 24, kLogSeed);
    memcpy(h + 24, &check, 8);
    memcpy(f.data(), h, 32);
  }
  if (flags & 1)
    for (size_t off = 32; off + 24 <= f.size(); off += 24) {
      const uint64_t check = XXH3_64bits_withSeed(f.data() + off, 16, kLogSeed);
      memcpy(f.data() + off + 16, &check, 8);
    }
  return f;
}

void write_logs(int meta_fd, const std::string& f0, const std::string& f1) {
  write_file(meta_fd, "dirty-log.0", f0);
  write_file(meta_fd, "dirty-log.1", f1);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  quiet_logs();
  if (size < 3) return 0;
  const uint8_t flags = data[0];
  const size_t rest = size - 3;
  const size_t cut = std::min<size_t>(rest, static_cast<size_t>(data[1] | data[2] << 8));
  const std::string f0 = fix_up(std::string(reinterpret_cast<const char*>(data + 3), cut), flags);
  const std::string f1 = fix_up(std::string(reinterpret_cast<const char*>(data + 3 + cut), rest - cut), flags);

  std::optional<std::vector<DirtyLog::Entry>> first;
  {
    ScratchDir meta("log");
    const int mfd = open(meta.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    write_logs(mfd, f0, f1);
    {
      DirtyLog log(mfd, meta.path, /*durable=*/false);
      first = log.load();
    }
    {
      DirtyLog log(mfd, meta.path, false);
      auto second = log.load();
      FUZZ_CHECK(second.has_value() == first.has_value());
      if (first) FUZZ_CHECK(*second == *first);
      // Writes after a load: noted extents are logged durably at the sync, a checkpoint
      // forgets them.
      if (log.note(7, 5u << 22, 100)) log.sync();
      FUZZ_CHECK(log.logged(7, 5));
      log.note_truncate(8, 1000u << 22, 0);
      log.sync();
      FUZZ_CHECK(log.logged(8, DirtyLog::kWholeFile));
    }
    {
      DirtyLog log(mfd, meta.path, false);
      auto third = log.load();
      FUZZ_CHECK(third.has_value() == first.has_value());
      if (third) {
        FUZZ_CHECK(std::binary_search(third->begin(), third->end(), DirtyLog::Entry{7, 5}));
        FUZZ_CHECK(std::binary_search(third->begin(), third->end(), DirtyLog::Entry{8, DirtyLog::kWholeFile}));
      }
      log.clear();
      auto cleared = log.load();
      FUZZ_CHECK(cleared && cleared->empty());
    }
    close(mfd);
  }

  if (flags & 4) {
    Volume v;
    fill_fixed_volume(v, 0);
    FUZZ_CHECK(v.hashes->checkpoint());
    v.store->set_hashes(nullptr);
    v.hashes.reset();
    // dir/a changes in its first extent, behind the index's back (a write whose log entry is
    // what the input says).
    const int afd = openat(v.root_fd, "dir/a", O_WRONLY | O_CLOEXEC);
    if (pwrite(afd, "ZZZZ", 4, 10) != 4) abort();
    close(afd);
    write_logs(v.meta_fd, f0, f1);
    try {
      v.open_hashes();
    } catch (const Error&) {
      return 0;  // an I/O error of the recovery, not a decoding one
    }
    const bool names_a = !first || std::any_of(first->begin(), first->end(), [](const DirtyLog::Entry& e) {
      return e == DirtyLog::kEverything || (e.fid == kFixedA && (e.extent == 0 || e.extent == DirtyLog::kWholeFile));
    });
    if (names_a) {
      const int fd = openat(v.root_fd, "dir/a", O_RDONLY | O_CLOEXEC);
      struct stat st;
      fstat(fd, &st);
      FileHashTree fresh(v.block_size);
      fresh.build(fd, static_cast<uint64_t>(st.st_size));
      FUZZ_CHECK(v.hashes->root(kFixedA, fd) == fresh.root());
      close(fd);
    }
  }
  return 0;
}
