// Sparse files: a hash tree costs memory for the data a file holds, not for its apparent size,
// and its hashes are those of the dense definition (holes hash as zero blocks).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/file_id.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/hash_tree.h"
#include "blockrepl/metadata.h"
#include "blockrepl/store.h"
#include "hashed_volume.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

constexpr uint32_t kBs = 4096;
constexpr uint64_t kTiB = uint64_t{1} << 40;
constexpr uint64_t kMiB = uint64_t{1} << 20;

// Resident set size of this process, from /proc/self/status (VmRSS, in KiB).
uint64_t rss_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  return 0;
}

std::string block_of(std::mt19937_64& rng) {
  std::string s(kBs, '\0');
  for (auto& c : s) c = static_cast<char>(rng() | 1);  // never all zeros
  return s;
}

// Offsets of a few blocks scattered over a file of `size` bytes, the last block included.
std::vector<uint64_t> scattered_offsets(uint64_t size) {
  const uint64_t blocks = size / kBs;
  return {0, blocks / 7 * kBs, blocks / 3 * kBs + 5 * kBs, blocks / 2 * kBs, (blocks - 1) * kBs};
}

// The tree as it was defined before sparse storage: every leaf read, every level a flat array,
// a parent the XXH3-128 of its children's hashes. Equal roots show the hash values unchanged.
Hash128 dense_reference_root(int fd, uint64_t size) {
  std::vector<Hash128> level;
  std::vector<char> buf(kBs);
  for (uint64_t off = 0; off < size; off += kBs) {
    std::fill(buf.begin(), buf.end(), 0);
    EXPECT_GE(pread(fd, buf.data(), kBs, static_cast<off_t>(off)), 0);
    level.push_back(hash_bytes(buf.data(), kBs));
  }
  while (level.size() > 1) {
    std::vector<Hash128> up;
    for (size_t i = 0; i < level.size(); i += kHashFanOut)
      up.push_back(hash_bytes(&level[i], std::min<size_t>(kHashFanOut, level.size() - i) * sizeof(Hash128)));
    level = std::move(up);
  }
  uint64_t root[4] = {0, 0, size, kBs};
  if (!level.empty()) root[0] = level[0].lo, root[1] = level[0].hi;
  return hash_bytes(root, sizeof root);
}

struct Volume : HashedVolume {
  Volume() : HashedVolume(kBs) {}
  int truncate(FileId fid, uint64_t size) {
    Record r;
    r.op = Op::truncate;
    r.fid = fid;
    r.offset = size;
    return apply(r);
  }
  void write(FileId fid, uint64_t off, const std::string& data) {
    Record r;
    r.op = Op::write;
    r.fid = fid;
    r.offset = off;
    r.data = data;
    EXPECT_EQ(apply(r), 0);
  }
};

// The largest "16 TiB" the backing file system takes: ext4 with 4 KiB blocks stops at 16 TiB
// minus one block.
uint64_t truncate_huge(Volume& v, FileId fid) {
  for (uint64_t size : {16 * kTiB, 16 * kTiB - kBs, 15 * kTiB})
    if (v.truncate(fid, size) == 0) return size;
  return 0;
}

// (a) A 16 TiB sparse file through the master's path (Store records, HashIndex, and a rebuild
// from the file with SEEK_DATA) adds well under 16 MiB of RSS; a flat tree would take 64 GiB.
TEST(Sparse, HugeSparseFileCostsItsDataNotItsSize) {
  Volume v;
  const FileId fid = v.create("huge");
  std::mt19937_64 rng(1);
  const uint64_t before = rss_bytes();
  const uint64_t size = truncate_huge(v, fid);
  ASSERT_NE(size, 0u) << "the backing file system takes no 15 TiB sparse file";
  for (uint64_t off : scattered_offsets(size)) v.write(fid, off, block_of(rng));
  const Hash128 incremental = v.index_root(fid, "huge");
  const uint64_t after_writes = rss_bytes();
  v.hashes->forget(fid);  // rebuilt from the file: holes skipped, not read
  EXPECT_EQ(v.index_root(fid, "huge"), incremental);
  const uint64_t after_build = rss_bytes();
  printf("[ sparse   ] %" PRIu64 " byte (%.4f TiB) file: RSS +%.2f MiB after truncate+writes, +%.2f MiB after a rebuild\n",
         size, static_cast<double>(size) / static_cast<double>(kTiB),
         static_cast<double>(after_writes - before) / kMiB, static_cast<double>(after_build - before) / kMiB);
  EXPECT_LT(after_writes - before, 16 * kMiB);
  EXPECT_LT(after_build - before, 16 * kMiB);
}

// (a) The same pattern scaled down: the sparse tree's root is the dense definition's root.
TEST(Sparse, SparseRootsEqualTheDenseReference) {
  Volume v;
  for (uint64_t size : {uint64_t{64} * kMiB + 3 * kBs, uint64_t{256} * kMiB + 100}) {
    const std::string name = "f" + std::to_string(size);
    const FileId fid = v.create(name);
    ASSERT_EQ(v.truncate(fid, size), 0);
    std::mt19937_64 rng(size);
    for (uint64_t off : scattered_offsets(size)) v.write(fid, off, block_of(rng));
    int fd = open((v.dir.path + "/" + name).c_str(), O_RDONLY | O_CLOEXEC);
    EXPECT_EQ(v.index_root(fid, name), dense_reference_root(fd, size)) << size;
    FileHashTree built(kBs);
    built.build(fd, size);
    EXPECT_EQ(built.root(), dense_reference_root(fd, size)) << size;
    close(fd);
  }
}

// (b) Two 16 TiB trees that differ in 3 blocks: the diff visits O(levels) nodes per difference
// and finds exactly those blocks, with no file behind either tree (holes need no reading).
TEST(Sparse, DiffOfTwoHugeSparseTreesDescendsOnlyToTheirDifferences) {
  const uint64_t size = 16 * kTiB;
  std::mt19937_64 rng(2);
  FileHashTree a(kBs), b(kBs);
  a.truncate(size);
  b.truncate(size);
  for (uint64_t off : scattered_offsets(size)) {
    const std::string data = block_of(rng);
    a.wrote(off, data);
    b.wrote(off, data);
  }
  const std::vector<uint64_t> changed = {12345, (size / kBs) / 2 + 1, size / kBs - 1};
  for (uint64_t blk : changed) b.wrote(blk * kBs, block_of(rng));
  a.refresh(-1);
  b.refresh(-1);
  DiffStats st;
  EXPECT_EQ(diff(a, b, &st), changed);
  const unsigned levels = a.levels();
  EXPECT_EQ(levels, FileHashTree::levels_for(size, kBs));
  EXPECT_EQ(st.round_trips, levels - 1);
  EXPECT_LE(st.hashes_compared, 1 + changed.size() * kHashFanOut * (levels - 1));
  // The slave's way: ask the master's nodes level by level, compare with differing_children.
  unsigned level = levels - 1;
  std::vector<uint64_t> idx{0};
  uint64_t queries = 0;
  for (;; level--) {
    std::vector<Hash128> theirs;
    for (uint64_t i : idx) theirs.push_back(a.node(level, i));
    queries += idx.size();
    idx = b.differing_children(level, idx, theirs, a.size());
    if (level == 0) break;
  }
  EXPECT_EQ(idx, changed);
  EXPECT_LE(queries, 1 + changed.size() * kHashFanOut * (levels - 1));
  EXPECT_LT(a.stored_bytes() + b.stored_bytes(), 1 * kMiB);
}

// (c) Zeros written over data or into a hole hash as the hole did, and cost nothing once hashed.
TEST(Sparse, WrittenZerosCompareEqualToAHoleAndAreNotStored) {
  const uint64_t size = 16 * kTiB;
  std::mt19937_64 rng(3);
  FileHashTree hole(kBs), zeros(kBs);
  hole.truncate(size);
  zeros.truncate(size);
  const std::string zero_block(kBs, '\0');
  for (uint64_t off : scattered_offsets(size)) {
    zeros.wrote(off, block_of(rng));  // data first, then zeros over it
    zeros.refresh(-1);
    zeros.wrote(off, zero_block);
    zeros.wrote(off / 2 / kBs * kBs + 64 * kBs, zero_block);  // and zeros into a hole
  }
  zeros.refresh(-1);
  hole.refresh(-1);
  EXPECT_EQ(zeros.root(), hole.root());
  EXPECT_TRUE(diff(zeros, hole).empty());
  EXPECT_EQ(zeros.stored_bytes(), hole.stored_bytes());
  EXPECT_EQ(hole.stored_bytes(), 0u) << "an all-zero tree stores nothing";
  for (unsigned k = 0; k < hole.levels(); k++) EXPECT_EQ(zeros.node(k, 7), hole.node(k, 7)) << "level " << k;
}

// A sparse tree survives save and load with its few chunks (format 2), and a shrink and regrow
// leaves no stale hash behind the new end.
TEST(Sparse, SaveLoadAndShrinkRegrowKeepHashes) {
  TempDir dir;
  int dfd = open(dir.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const uint64_t size = 4 * kTiB;
  std::mt19937_64 rng(4);
  FileHashTree t(kBs);
  t.truncate(size);
  for (uint64_t off : scattered_offsets(size)) t.wrote(off, block_of(rng));
  t.refresh(-1);
  t.save(dfd, 0x42, false);
  struct stat sb;
  ASSERT_EQ(fstatat(dfd, FileHashTree::saved_name(0x42).c_str(), &sb, 0), 0);
  EXPECT_LT(sb.st_size, 64 * 1024) << "a 4 TiB sparse file's leaves";
  FileHashTree u(kBs);
  ASSERT_TRUE(u.load(dfd, 0x42));
  EXPECT_EQ(u.root(), t.root());

  t.truncate(kBs);  // cut everything past the first block
  t.truncate(size);
  std::mt19937_64 again(4);
  FileHashTree expect(kBs);
  expect.truncate(size);
  expect.wrote(0, block_of(again));
  expect.refresh(-1);
  t.refresh(-1);
  EXPECT_EQ(t.root(), expect.root());
  close(dfd);
}

}  // namespace
}  // namespace blockrepl
