// fuzz_hash_tree_file: saved hash-tree leaves (<meta>/hashes/<fid>.leaves, formats 1 and 2),
// through FileHashTree::load and recover_file_tree (hash_tree.cpp), as a node reads them at start.
//
// Input: byte 0 flags, byte 1 the number of logged extents (% 5) followed by 2 bytes each
// (0xffff: the whole file), 2 bytes for the size of the data file (x 16 bytes), then the saved
// file. With flag bit 0 the harness appends the XXH3-128 trailer the format requires (seeded
// with the header's hash), so mutations get past the checksum and reach the body's parser. The
// tree's block size is the header's when valid (else 4096; always 4096 with bit 1).
// Checked: a tree that loads answers every query; saved again and reloaded it has the same root;
// recovery against a real data file ends with the tree the data gives (build from scratch).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <bit>
#include <cstring>
#include <string>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/hash_tree.h"
#include "fuzz_util.h"

using namespace blockrepl;
using namespace blockrepl::fuzz;

namespace {
constexpr FileId kFid = 0xf00d;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  quiet_logs();
  if (size < 4) return 0;
  const uint8_t flags = data[0];
  size_t pos = 1;
  std::vector<uint64_t> extents;
  const unsigned nextents = data[pos++] % 5;
  for (unsigned i = 0; i < nextents && pos + 2 <= size; i++, pos += 2) {
    const uint16_t x = static_cast<uint16_t>(data[pos] | data[pos + 1] << 8);
    extents.push_back(x == 0xffff ? DirtyLog::kWholeFile : x % 64);
  }
  if (pos + 2 > size) return 0;
  const uint64_t data_size = static_cast<uint64_t>(data[pos] | data[pos + 1] << 8) * 16;
  pos += 2;
  std::string file(reinterpret_cast<const char*>(data + pos), size - pos);
  uint32_t block_size = 4096;
  if (file.size() >= 32) {
    uint32_t bs;
    memcpy(&bs, file.data() + 12, sizeof bs);
    if (!(flags & 2) && bs >= 512 && bs <= (16u << 20) && std::has_single_bit(bs)) block_size = bs;
    if (flags & 1) {
      const XXH128_hash_t sum = XXH3_128bits_withSeed(file.data() + 32, file.size() - 32, XXH3_64bits(file.data(), 32));
      file.append(reinterpret_cast<const char*>(&sum.low64), 8);
      file.append(reinterpret_cast<const char*>(&sum.high64), 8);
    }
  }

  ScratchDir dir("tree");
  const int dfd = open(dir.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  write_file(dfd, FileHashTree::saved_name(kFid).c_str(), file);

  FileHashTree tree(block_size, "fuzz");
  if (tree.load(dfd, kFid)) {
    FUZZ_CHECK(!tree.dirty());
    const Hash128 root = tree.root();
    const unsigned levels = tree.levels();
    FUZZ_CHECK(levels == FileHashTree::levels_for(tree.size(), block_size));
    for (unsigned l = 0; l <= levels; l++) {
      const uint64_t n = tree.level_size(l);
      FUZZ_CHECK(n == FileHashTree::level_size_for(tree.size(), block_size, l));
      for (uint64_t i : {uint64_t{0}, n / 2, n ? n - 1 : 0, n}) (void)tree.node(l, i);
      (void)tree.nodes(l, n > 70 ? n - 70 : 0, 140);
    }
    (void)tree.stored_bytes();
    // Saved again and reloaded: the same tree.
    tree.save(dfd, kFid + 1, /*durable=*/false);
    FileHashTree again(block_size, "fuzz");
    FUZZ_CHECK(again.load(dfd, kFid + 1));
    FUZZ_CHECK(again.root() == root && again.size() == tree.size());
    FUZZ_CHECK(diff(tree, again).empty());
  }

  // Recovery after an unclean stop against a real data file: whatever the saved leaves said,
  // the result describes the file as it is when the log names the changed extents; with no
  // extents the saved leaves are trusted only when their size matches the file.
  write_file(dfd, "data", std::string(data_size, 'd'));
  const int fd = openat(dfd, "data", O_RDONLY | O_CLOEXEC);
  FileHashTree recovered(block_size, "fuzz");
  try {
    recover_file_tree(recovered, dfd, kFid, fd, extents);
    FUZZ_CHECK(!recovered.dirty());
    FUZZ_CHECK(recovered.size() == data_size);
    (void)recovered.root();
  } catch (const Error&) {
  }
  close(fd);
  close(dfd);
  return 0;
}
