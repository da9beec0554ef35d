// fuzz_stage_log: the stage's redo log (<meta>/stage/frames and stage/commit, merkle.cpp Stage),
// as a slave finds it at start after a crash during a Merkle re-attach, applied with Stage::apply
// to a volume (the fixed volume of the corpus: known file ids, so staged listings, data and
// records can name its files).
//
// Input: byte 0 flags, byte 1 the commit marker's length (% 32, 0: no marker when bit 0 of the
// flags is clear), that many bytes of marker text, then the frames file (each frame a 4-byte
// little-endian length and a Cap'n Proto message, as Stage::add writes them).
// With flag bit 1 a completed apply runs again (the redo after a crash part way through).
// Checked: apply changes nothing outside the volume and nothing in its metadata folder but the
// stage (no path from a staged listing or record leaves the volume); every sanitizer report and
// every exception other than Error or a kj::Exception (a malformed staged message) is a crash.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <set>
#include <string>

#include "blockrepl/error.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/merkle.h"
#include "fuzz_util.h"

using namespace blockrepl;
using namespace blockrepl::fuzz;

namespace {

std::set<std::string> names_in(int dirfd) {
  std::set<std::string> out;
  for (const DirEntry& e : list_dir(dirfd, false).entries) out.insert(e.name);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  quiet_logs();
  if (size < 2) return 0;
  const uint8_t flags = data[0];
  const size_t marker_len = std::min<size_t>(data[1] % 32, size - 2);
  const std::string marker(reinterpret_cast<const char*>(data + 2), marker_len);
  const std::string frames(reinterpret_cast<const char*>(data + 2 + marker_len), size - 2 - marker_len);

  Volume v;
  fill_fixed_volume(v, 0);
  const int scratch_fd = open(scratch_dir().c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  const std::set<std::string> scratch_before = names_in(scratch_fd);
  mkdirat(v.meta_fd, "stage", 0700);
  {
    const int sfd = openat(v.meta_fd, "stage", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    write_file(sfd, "frames", frames);
    if (marker_len > 0 || (flags & 1)) write_file(sfd, "commit", marker);
    close(sfd);
  }
  const std::set<std::string> meta_before = names_in(v.meta_fd);

  try {
    Stage stage(v.meta_fd, v.dir.path, /*durable=*/false);
    if (stage.committed()) {
      (void)stage.committed_lsn();
      Stage::Applied a = stage.apply(*v.store, v.block_size);
      (void)a;
      if (flags & 2) {
        // The redo after a crash part way through: applying again is safe.
        Stage::Applied again = stage.apply(*v.store, v.block_size);
        (void)again;
      }
      stage.discard();
    }
  } catch (const Error&) {
  } catch (const std::exception&) {
    // kj::Exception of a malformed staged message: refused as a damaged stage.
  }
  // Nothing outside the volume, nothing in the metadata folder but the stage itself.
  FUZZ_CHECK(names_in(scratch_fd) == scratch_before);
  close(scratch_fd);
  for (const std::string& n : names_in(v.meta_fd)) FUZZ_CHECK(meta_before.count(n));
  const int sfd = openat(v.meta_fd, "stage", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (sfd >= 0) {
    for (const std::string& n : names_in(sfd)) FUZZ_CHECK(n == "frames" || n == "commit" || n == "park" || n == "commit.tmp");
    close(sfd);
  }
  return 0;
}
