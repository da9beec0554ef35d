// Block hash trees (build, incremental refresh, diff, save/load) and the dirty-region log.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/hash_tree.h"

namespace blockrepl {

void PrintTo(const Hash128& h, std::ostream* os) { *os << h.hex(); }

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

struct TempDir {
  std::string path;
  int fd = -1;
  TempDir() {
    char tmpl[] = "/var/tmp/blockrepl-hash-tree-test-XXXXXX";
    char* p = mkdtemp(tmpl);
    if (!p) throw std::runtime_error(std::string("mkdtemp: ") + strerror(errno));
    path = p;
    fd = open(p, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  }
  ~TempDir() {
    close(fd);
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return path + "/" + name; }
};

struct File {
  int fd = -1;
  explicit File(const std::string& path) { fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600); }
  ~File() {
    if (fd >= 0) close(fd);
  }
  uint64_t size() const {
    struct stat sb;
    fstat(fd, &sb);
    return static_cast<uint64_t>(sb.st_size);
  }
};

std::string random_bytes(std::mt19937_64& rng, size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v = rng();
    memcpy(&s[i], &v, std::min<size_t>(8, n - i));
  }
  return s;
}

void pwrite_all(int fd, const std::string& data, uint64_t off) {
  ASSERT_EQ(pwrite(fd, data.data(), data.size(), static_cast<off_t>(off)), static_cast<ssize_t>(data.size()));
}

// Every node of every level equal (stronger than equal roots: shows the shape agrees too).
void expect_same_tree(const FileHashTree& a, const FileHashTree& b) {
  ASSERT_EQ(a.size(), b.size());
  ASSERT_EQ(a.levels(), b.levels());
  for (unsigned k = 0; k < a.levels(); k++) {
    ASSERT_EQ(a.level_size(k), b.level_size(k)) << "level " << k;
    ASSERT_TRUE(a.nodes(k, 0, a.level_size(k)) == b.nodes(k, 0, b.level_size(k))) << "level " << k;
  }
  EXPECT_EQ(a.root(), b.root());
}

FileHashTree built(int fd, uint32_t bs = 4096) {
  FileHashTree t(bs, "test file");
  struct stat sb;
  fstat(fd, &sb);
  t.build(fd, static_cast<uint64_t>(sb.st_size));
  return t;
}

// ----------------------------------------------------------------------------------------------
// Hashing and shape

TEST(HashTree, PartialAndZeroBlocksHashAsZeroPadded) {
  std::string zeros(4096, '\0');
  EXPECT_EQ(zero_block_hash(4096), hash_bytes(zeros.data(), zeros.size()));
  EXPECT_EQ(hash_block(zeros.data(), 100, 4096), zero_block_hash(4096));
  EXPECT_EQ(hash_block("", 0, 4096), zero_block_hash(4096));
  std::string abc = "abc" + std::string(4093, '\0');
  EXPECT_EQ(hash_block("abc", 3, 4096), hash_bytes(abc.data(), abc.size()));
  EXPECT_NE(hash_block("abc", 3, 4096), zero_block_hash(4096));
  EXPECT_NE(zero_block_hash(4096), zero_block_hash(8192));
}

TEST(HashTree, RejectsBadBlockSize) {
  EXPECT_THROW(FileHashTree(3000), Error);
  EXPECT_THROW(FileHashTree(256), Error);
  EXPECT_NO_THROW(FileHashTree(512));
}

TEST(HashTree, LevelsAreCeilLogFanOut) {
  const uint64_t bs = 4096, F = kHashFanOut;
  struct Case { uint64_t blocks; unsigned levels; };
  for (Case c : {Case{0, 1}, {1, 1}, {2, 2}, {F, 2}, {F + 1, 3}, {F * F, 3}, {F * F + 1, 4}, {262144, 4}}) {
    unsigned want = c.blocks <= 1 ? 0 : static_cast<unsigned>(std::ceil(std::log(double(c.blocks)) / std::log(double(F)) - 1e-9));
    EXPECT_EQ(FileHashTree::levels_for(c.blocks * bs, bs), c.levels) << c.blocks;
    EXPECT_EQ(c.levels - 1, want) << "round trips for " << c.blocks << " blocks";
  }
  EXPECT_EQ(FileHashTree::level_size_for(262144 * bs, bs, 0), 262144u);
  EXPECT_EQ(FileHashTree::level_size_for(262144 * bs, bs, 1), 4096u);
  EXPECT_EQ(FileHashTree::level_size_for(262144 * bs, bs, 3), 1u);
  EXPECT_EQ(FileHashTree::level_size_for(262144 * bs, bs, 4), 0u);
  EXPECT_EQ(FileHashTree::level_size_for(4097, bs, 0), 2u);  // a partial last block counts
}

TEST(HashTree, QueriesRefuseUnrefreshedChanges) {
  FileHashTree t(4096);
  t.mark_dirty(0, 10);
  EXPECT_TRUE(t.dirty());
  EXPECT_THROW(t.root(), Error);
  EXPECT_THROW(t.node(0, 0), Error);
  EXPECT_THROW(t.refresh(-1), Error);  // blocks to read but no file
}

// ----------------------------------------------------------------------------------------------
// Incremental upkeep equals a full build

// with_data: about half of the writes hand their data to the tree (wrote), as the Store does,
// the others only say where they wrote (mark_dirty), so both kinds meet on the same blocks.
void incremental_matches_build(uint32_t bs, uint64_t initial, int ops, unsigned seed, bool with_data = false) {
  TempDir dir;
  File f(dir.file("data"));
  std::mt19937_64 rng(seed);
  pwrite_all(f.fd, random_bytes(rng, initial), 0);
  FileHashTree t = built(f.fd, bs);
  const uint64_t max_size = std::max<uint64_t>(initial * 2, 1 << 20);
  for (int i = 0; i < ops; i++) {
    uint64_t size = f.size();
    switch (rng() % 10) {
      case 0: {  // truncate, shrink or grow, often mid-block, sometimes to 0, 1 block or F blocks
        uint64_t ns = rng() % max_size;
        switch (rng() % 6) {
          case 0: ns = 0; break;
          case 1: ns = rng() % (2 * bs); break;
          case 2: ns = kHashFanOut * bs - rng() % 2; break;
        }
        ASSERT_EQ(ftruncate(f.fd, static_cast<off_t>(ns)), 0);
        t.truncate(ns);
        break;
      }
      case 1: {  // zeros over data: must hash like a hole
        uint64_t off = rng() % (size + 1), len = 1 + rng() % (3 * bs);
        pwrite_all(f.fd, std::string(len, '\0'), off);
        t.mark_dirty(off, len);
        break;
      }
      case 2:  // catch up mid-way, as a barrier would
        t.refresh(f.fd);
        break;
      default: {  // a write anywhere, sometimes past EOF (leaving a hole) or a large one
        uint64_t off = rng() % (size + size / 4 + 1);
        uint64_t len = (rng() % 8 == 0) ? 1 + rng() % (40 * bs) : 1 + rng() % (2 * bs);
        if (off + len > max_size) off = max_size - len;
        if (with_data && rng() % 4 == 0) off -= off % bs;  // whole blocks, often
        const std::string data = random_bytes(rng, len);
        pwrite_all(f.fd, data, off);
        if (with_data && rng() % 2 == 0) t.wrote(off, data);
        else t.mark_dirty(off, len);
      }
    }
  }
  t.refresh(f.fd);
  EXPECT_FALSE(t.dirty());
  expect_same_tree(t, built(f.fd, bs));
}

TEST(HashTree, IncrementalRefreshMatchesBuild4K) { incremental_matches_build(4096, 8 << 20, 400, 1); }
// 512-byte blocks give 4 levels on a small file, so every internal level is exercised.
TEST(HashTree, IncrementalRefreshMatchesBuild512) { incremental_matches_build(512, 6 << 20, 400, 2); }
TEST(HashTree, IncrementalFromEmptyFile) { incremental_matches_build(512, 0, 200, 3); }
TEST(HashTree, WritesHashedFromTheirDataMatchBuild4K) { incremental_matches_build(4096, 8 << 20, 400, 11, true); }
TEST(HashTree, WritesHashedFromTheirDataMatchBuild512) { incremental_matches_build(512, 6 << 20, 400, 12, true); }
TEST(HashTree, WritesHashedFromTheirDataFromEmptyFile) { incremental_matches_build(512, 0, 300, 13, true); }

TEST(HashTree, WholeBlocksWrittenNeedNoReadBack) {
  TempDir dir;
  File f(dir.file("data"));
  std::mt19937_64 rng(14);
  pwrite_all(f.fd, random_bytes(rng, 4 << 20), 0);
  FileHashTree t = built(f.fd);
  auto write = [&](uint64_t off, size_t len) {
    const std::string data = random_bytes(rng, len);
    pwrite_all(f.fd, data, off);
    t.wrote(off, data);
  };
  write(1 << 20, 1 << 20);                 // 256 whole blocks
  EXPECT_EQ(t.dirty_blocks(), 0u);
  write(3 * 4096 + 100, 2 * 4096);         // blocks 3 and 5 in part, block 4 whole
  EXPECT_EQ(t.dirty_blocks(), 2u);
  write(3 * 4096, 4096);                   // block 3 now written whole: known again
  EXPECT_EQ(t.dirty_blocks(), 1u);
  write(10 * 4096 + 1, 10);                // inside one block
  EXPECT_EQ(t.dirty_blocks(), 2u);
  write(8 << 20, 3 * 4096);                // past EOF: a hole, then whole blocks
  EXPECT_EQ(t.dirty_blocks(), 2u);
  EXPECT_EQ(t.refresh(f.fd), 2u);
  expect_same_tree(t, built(f.fd));
}

TEST(HashTree, RefreshReadsOnlyDirtyBlocks) {
  TempDir dir;
  File f(dir.file("data"));
  std::mt19937_64 rng(4);
  pwrite_all(f.fd, random_bytes(rng, 4 << 20), 0);
  FileHashTree t = built(f.fd);
  pwrite_all(f.fd, "x", 5000);       // block 1
  pwrite_all(f.fd, "yy", 4095);      // blocks 0 and 1
  pwrite_all(f.fd, "z", 100 * 4096); // block 100
  t.mark_dirty(5000, 1);
  t.mark_dirty(4095, 2);
  t.mark_dirty(100 * 4096, 1);
  EXPECT_EQ(t.dirty_blocks(), 3u);
  EXPECT_EQ(t.refresh(f.fd), 3u);
  EXPECT_EQ(t.refresh(f.fd), 0u);
  expect_same_tree(t, built(f.fd));
  // Growing needs no reads at all: the new blocks are holes.
  ASSERT_EQ(ftruncate(f.fd, 64 << 20), 0);
  t.truncate(64 << 20);
  EXPECT_EQ(t.refresh(-1), 0u);
  expect_same_tree(t, built(f.fd));
}

// ----------------------------------------------------------------------------------------------
// Holes, zeros and sizes

TEST(HashTree, HolesAndWrittenZerosCompareEqual) {
  TempDir dir;
  File holes(dir.file("holes")), zeros(dir.file("zeros"));
  const uint64_t size = (1 << 20) + 5000;  // a partial last block as well
  ASSERT_EQ(ftruncate(holes.fd, size), 0);
  pwrite_all(zeros.fd, std::string(size, '\0'), 0);
  FileHashTree a = built(holes.fd), b = built(zeros.fd);
  EXPECT_EQ(a.root(), b.root());
  EXPECT_TRUE(diff(a, b).empty());
  // Zeros written over data bring a block back to the hole's hash.
  pwrite_all(zeros.fd, "data", 8192);
  b.mark_dirty(8192, 4);
  b.refresh(zeros.fd);
  EXPECT_EQ(diff(a, b), std::vector<uint64_t>{2});
  pwrite_all(zeros.fd, std::string(4, '\0'), 8192);
  b.mark_dirty(8192, 4);
  b.refresh(zeros.fd);
  EXPECT_EQ(a.root(), b.root());
}

TEST(HashTree, SizeChangesChangeTheRoot) {
  TempDir dir;
  File f(dir.file("data"));
  pwrite_all(f.fd, std::string(5000, 'a'), 0);
  FileHashTree t = built(f.fd);
  Hash128 r5000 = t.root();
  // Growth inside the last block: no block changes, but the size does.
  t.truncate(6000);
  EXPECT_FALSE(t.dirty());
  EXPECT_NE(t.root(), r5000);
  ASSERT_EQ(ftruncate(f.fd, 6000), 0);
  expect_same_tree(t, built(f.fd));
  FileHashTree at5000 = built(f.fd);
  at5000.truncate(5000);
  EXPECT_TRUE(at5000.dirty());  // cut mid-block: the cut tail may have held data
  EXPECT_EQ(at5000.refresh(f.fd), 1u);
  EXPECT_TRUE(diff(t, at5000).empty());  // same blocks, different size: only the root says so
  EXPECT_NE(t.root(), at5000.root());
  // Growth by whole blocks and a shrink back.
  t.truncate(3 * 4096);
  t.refresh(-1);
  Hash128 r12k = t.root();
  EXPECT_NE(r12k, r5000);
  t.truncate(5000);
  t.refresh(f.fd);  // block 1 was cut mid-way: reread
  ASSERT_EQ(ftruncate(f.fd, 5000), 0);
  EXPECT_EQ(t.root(), r5000);
  // Shrink to nothing and back.
  t.truncate(0);
  t.refresh(-1);
  EXPECT_EQ(t.levels(), 1u);
  EXPECT_EQ(t.level_size(0), 0u);
  EXPECT_NE(t.root(), r5000);
  FileHashTree empty(4096);
  EXPECT_EQ(t.root(), empty.root());
}

TEST(HashTree, DiffOfDifferentSizes) {
  TempDir dir;
  File a(dir.file("a")), b(dir.file("b"));
  std::mt19937_64 rng(5);
  std::string common = random_bytes(rng, 70 * 4096);
  pwrite_all(a.fd, common, 0);
  pwrite_all(b.fd, common, 0);
  pwrite_all(b.fd, random_bytes(rng, 5000 * 4096 - 70 * 4096), 70 * 4096);  // b: 5000 blocks
  pwrite_all(b.fd, "x", 3 * 4096);
  FileHashTree ta = built(a.fd), tb = built(b.fd);
  std::vector<uint64_t> want{3};
  for (uint64_t i = 70; i < 5000; i++) want.push_back(i);
  EXPECT_EQ(diff(ta, tb), want);
  EXPECT_EQ(diff(tb, ta), want);
}

// ----------------------------------------------------------------------------------------------
// Diff cost: m scattered changes in a 1 GiB file

struct DiffCase {
  std::vector<uint64_t> changed;
  DiffStats stats;
  std::vector<uint64_t> found;
  unsigned levels = 0;
};

// Two sparse 1 GiB files sharing 2000 data blocks; b differs in m scattered blocks (some over
// shared data, some in a's holes). Sparse files keep the build to the data actually written.
DiffCase diff_1gib(unsigned m, unsigned seed) {
  TempDir dir;
  File a(dir.file("a")), b(dir.file("b"));
  const uint64_t n = 262144, bs = 4096;
  EXPECT_EQ(ftruncate(a.fd, n * bs), 0);
  EXPECT_EQ(ftruncate(b.fd, n * bs), 0);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 2000; i++) {
    uint64_t blk = rng() % n;
    std::string data = random_bytes(rng, bs);
    pwrite_all(a.fd, data, blk * bs);
    pwrite_all(b.fd, data, blk * bs);
  }
  DiffCase c;
  std::set<uint64_t> changed;
  while (changed.size() < m) changed.insert(rng() % n);
  for (uint64_t blk : changed) pwrite_all(b.fd, random_bytes(rng, bs), blk * bs);
  c.changed.assign(changed.begin(), changed.end());
  FileHashTree ta = built(a.fd), tb = built(b.fd);
  c.levels = ta.levels();
  c.found = diff(ta, tb, &c.stats);

  // The same descent as the network protocol runs it: b asks a for the nodes it wants and
  // compares them with its own (differing_children), one exchange per level.
  unsigned level = ta.levels() - 1;
  std::vector<uint64_t> idx{0};
  unsigned trips = 0;
  for (;;) {
    std::vector<Hash128> theirs;
    for (uint64_t i : idx) theirs.push_back(ta.node(level, i));
    std::vector<uint64_t> next = tb.differing_children(level, idx, theirs, ta.size());
    if (level == 0) {
      EXPECT_EQ(next, c.found);
      break;
    }
    trips++;
    level--;
    idx = std::move(next);
  }
  EXPECT_EQ(trips, c.stats.round_trips);
  return c;
}

TEST(HashTree, DiffFindsScatteredBlocksInOLogN) {
  const uint64_t n = 262144, F = kHashFanOut;
  const unsigned want_trips = static_cast<unsigned>(std::ceil(std::log(double(n)) / std::log(double(F))));
  for (unsigned m : {1u, 100u}) {
    DiffCase c = diff_1gib(m, 100 + m);
    EXPECT_EQ(c.found, c.changed) << "m = " << m;
    EXPECT_EQ(c.levels, want_trips + 1);
    EXPECT_EQ(c.stats.round_trips, want_trips);
    // Per level at most m differing nodes, each opening F children; plus root and top node.
    EXPECT_LE(c.stats.hashes_compared, 2 + m * F * want_trips) << "m = " << m;
    EXPECT_LE(c.stats.hashes_compared, m * F * c.levels) << "m = " << m;
    printf("[ diff     ] n = %" PRIu64 " blocks (1 GiB), m = %u changed: %" PRIu64
           " hashes compared (%.1f KiB of hashes on the wire), %u round trips, bound m*F*levels = %" PRIu64 "\n",
           n, m, c.stats.hashes_compared, c.stats.hashes_compared * 16 / 1024.0, c.stats.round_trips,
           m * F * c.levels);
  }
}

TEST(HashTree, IdenticalTreesCompareOneHash) {
  TempDir dir;
  File a(dir.file("a"));
  pwrite_all(a.fd, std::string(1 << 20, 'q'), 0);
  DiffStats st;
  FileHashTree t = built(a.fd);
  EXPECT_TRUE(diff(t, built(a.fd), &st).empty());
  EXPECT_EQ(st.hashes_compared, 1u);
  EXPECT_EQ(st.round_trips, 0u);
}

TEST(HashTree, DiffChildrenHelper) {
  const uint64_t F = kHashFanOut;
  Hash128 x{1, 2}, y{3, 4};
  std::vector<uint64_t> idx{0, 1, 2};
  std::vector<Hash128> ours{x, x, x}, theirs{x, y, kAbsentNode};
  auto kids = FileHashTree::diff_children(1, idx, ours, theirs, 2 * F + 5);
  std::vector<uint64_t> want;
  for (uint64_t i = F; i < 2 * F + 5; i++) want.push_back(i);  // node 2 has only 5 children
  EXPECT_EQ(kids, want);
  EXPECT_EQ(FileHashTree::diff_children(0, idx, ours, theirs, 0), (std::vector<uint64_t>{1, 2}));
  EXPECT_THROW(FileHashTree::diff_children(0, idx, ours, std::vector<Hash128>{x}, 0), Error);
}

// ----------------------------------------------------------------------------------------------
// Saved leaves

TEST(HashTree, SaveLoadRoundTrip) {
  TempDir dir;
  File f(dir.file("data"));
  std::mt19937_64 rng(6);
  pwrite_all(f.fd, random_bytes(rng, (3 << 20) + 123), 0);
  FileHashTree t = built(f.fd, 512);
  t.save(dir.fd, 0xabcdef, /*durable=*/true);
  EXPECT_TRUE(std::filesystem::exists(dir.file("0000000000abcdef.leaves")));
  EXPECT_FALSE(std::filesystem::exists(dir.file("0000000000abcdef.leaves.tmp")));
  FileHashTree u(512);
  ASSERT_TRUE(u.load(dir.fd, 0xabcdef));
  expect_same_tree(t, u);
  // An empty file round-trips too; a save replaces the previous one.
  FileHashTree e(512);
  e.save(dir.fd, 0xabcdef, false);
  ASSERT_TRUE(u.load(dir.fd, 0xabcdef));
  EXPECT_EQ(u.root(), e.root());
  // Missing or unlinked: false, tree unchanged.
  FileHashTree::remove_saved(dir.fd, 0xabcdef);
  FileHashTree::remove_saved(dir.fd, 0xabcdef);
  EXPECT_FALSE(u.load(dir.fd, 0xabcdef));
  EXPECT_EQ(u.root(), e.root());
  // A dirty tree is not saved: it would describe blocks it has not hashed.
  t.mark_dirty(0, 1);
  EXPECT_THROW(t.save(dir.fd, 1, false), Error);
}

TEST(HashTree, DamagedLeavesAreRefused) {
  TempDir dir;
  File f(dir.file("data"));
  std::mt19937_64 rng(7);
  pwrite_all(f.fd, random_bytes(rng, 1 << 20), 0);
  FileHashTree t = built(f.fd);
  const std::string path = dir.file(FileHashTree::saved_name(42));
  auto damage = [&](auto&& how) {
    t.save(dir.fd, 42, false);
    int fd = open(path.c_str(), O_RDWR);
    how(fd);
    close(fd);
    FileHashTree u(4096);
    Hash128 before = u.root();
    bool ok = u.load(dir.fd, 42);
    if (!ok) EXPECT_EQ(u.root(), before);  // a refused load leaves the tree alone
    else EXPECT_EQ(u.root(), t.root());
    return ok;
  };
  EXPECT_TRUE(damage([](int) {}));
  EXPECT_FALSE(damage([](int fd) { pwrite(fd, "\x01", 1, 32 + 16 * 100 + 3); }));  // one leaf bit
  EXPECT_FALSE(damage([](int fd) { pwrite(fd, "X", 1, 0); }));                       // magic
  EXPECT_FALSE(damage([](int fd) { pwrite(fd, "\x02", 1, 16); }));                   // file size
  EXPECT_FALSE(damage([](int fd) { ASSERT_EQ(ftruncate(fd, 32 + 16 * 10), 0); }));  // torn
  EXPECT_FALSE(damage([](int fd) { ASSERT_EQ(ftruncate(fd, 5), 0); }));
  EXPECT_FALSE(damage([](int fd) { ASSERT_EQ(ftruncate(fd, 0), 0); }));
  EXPECT_FALSE(damage([](int fd) {  // checksum
    struct stat sb;
    fstat(fd, &sb);
    pwrite(fd, "\xff", 1, sb.st_size - 1);
  }));
  // Saved with another block size: valid, but not for this tree.
  t.save(dir.fd, 42, false);
  FileHashTree other(8192);
  EXPECT_FALSE(other.load(dir.fd, 42));
}

// ----------------------------------------------------------------------------------------------
// Dirty-region log

TEST(DirtyLog, NoteSyncLoadClear) {
  TempDir dir;
  const uint64_t E = DirtyLog::kExtentSize;
  {
    DirtyLog log(dir.fd, dir.path, /*durable=*/true);
    ASSERT_TRUE(log.load().has_value());
    EXPECT_TRUE(log.note(7, 100, 4096));       // extent 0 of fid 7: first write
    EXPECT_TRUE(log.note(7, 200, 10));         // same extent, not yet durable: still wait
    log.sync();
    EXPECT_EQ(log.syncs(), 1u);
    EXPECT_FALSE(log.note(7, E - 4096, 4096)); // same extent, durable: no sync
    EXPECT_TRUE(log.note(7, E - 10, 20));      // spans extents 0 and 1
    EXPECT_TRUE(log.note(8, 0, 1));            // another file
    log.sync();
    log.sync();                                // nothing pending: no I/O
    EXPECT_EQ(log.syncs(), 2u);
    EXPECT_FALSE(log.note(7, E + 5, 1));
    EXPECT_TRUE(log.note(9, 5 * E, 1));        // noted, never synced: crash before the write
    EXPECT_EQ(log.entries(), 4u);
  }  // "crash": no clear
  {
    DirtyLog log(dir.fd, dir.path, true);
    auto got = log.load();
    ASSERT_TRUE(got.has_value());
    std::vector<DirtyLog::Entry> want{{7, 0}, {7, 1}, {8, 0}};
    EXPECT_EQ(*got, want);
    EXPECT_FALSE(log.note(7, 0, 1));  // loaded entries count as logged
    log.clear();
    EXPECT_EQ(log.entries(), 0u);
    EXPECT_TRUE(log.note(7, 0, 1));  // after a clean point the first write logs again
  }
  {
    DirtyLog log(dir.fd, dir.path, true);
    auto got = log.load();
    ASSERT_TRUE(got.has_value());
    EXPECT_TRUE(got->empty());
  }
}

TEST(DirtyLog, CheckpointKeepsBothEpochsUntilEnded) {
  TempDir dir;
  {
    DirtyLog log(dir.fd, dir.path, false);
    log.load();
    log.note(1, 0, 1);
    log.sync();
    log.begin_checkpoint();
    EXPECT_TRUE(log.note(1, 0, 1));  // logged again in the new file
    log.note(2, 0, 1);
    log.sync();
    EXPECT_THROW(log.begin_checkpoint(), Error);  // the previous one has not ended
  }  // crash before end_checkpoint: both epochs count
  {
    DirtyLog log(dir.fd, dir.path, false);
    auto got = log.load();
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(*got, (std::vector<DirtyLog::Entry>{{1, 0}, {2, 0}}));
    log.begin_checkpoint();
    log.note(3, 0, 1);
    log.sync();
    log.end_checkpoint();  // forgets 1 and 2, keeps 3
  }
  DirtyLog log(dir.fd, dir.path, false);
  EXPECT_EQ(*log.load(), (std::vector<DirtyLog::Entry>{{3, 0}}));
}

TEST(DirtyLog, TornTailToleratedDamageRefusedUntilCleared) {
  TempDir dir;
  {
    DirtyLog log(dir.fd, dir.path, false);
    log.load();
    log.note(1, 0, 1);
    log.note(2, 0, 1);
    log.sync();
  }
  const std::string path = dir.file("dirty-log.0");
  {  // a torn append: half a record of garbage at the end
    int fd = open(path.c_str(), O_WRONLY | O_APPEND);
    ASSERT_EQ(write(fd, "garbage-garbage", 15), 15);
    close(fd);
  }
  {
    DirtyLog log(dir.fd, dir.path, false);
    auto got = log.load();
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(got->size(), 2u);
  }
  {  // damage to a synced record (a good one follows it): the log cannot be trusted
    int fd = open(path.c_str(), O_WRONLY);
    ASSERT_EQ(pwrite(fd, "X", 1, 32 + 3), 1);
    close(fd);
  }
  {
    DirtyLog log(dir.fd, dir.path, false);
    EXPECT_FALSE(log.load().has_value());
  }
  {  // ...and stays untrusted across restarts until a clean point after the full rehash
    DirtyLog log(dir.fd, dir.path, false);
    EXPECT_FALSE(log.load().has_value());
    log.clear();
  }
  {
    DirtyLog log(dir.fd, dir.path, false);
    auto got = log.load();
    ASSERT_TRUE(got.has_value());
    EXPECT_TRUE(got->empty());
  }
  {  // a bad header
    int fd = open(path.c_str(), O_WRONLY);
    ASSERT_EQ(pwrite(fd, "Z", 1, 0), 1);
    close(fd);
    DirtyLog log(dir.fd, dir.path, false);
    EXPECT_FALSE(log.load().has_value());
  }
}

TEST(DirtyLog, NoteTruncate) {
  TempDir dir;
  const uint64_t E = DirtyLog::kExtentSize;
  DirtyLog log(dir.fd, dir.path, false);
  log.load();
  EXPECT_TRUE(log.note_truncate(1, 10 * E, 3 * E + 5));  // cut extents 3..9
  EXPECT_TRUE(log.note_truncate(2, 5, 100 * E));          // growth: the old end's extent
  EXPECT_TRUE(log.note_truncate(3, 1000 * E, 0));         // huge cut: the whole file
  log.sync();
  EXPECT_FALSE(log.note_truncate(3, 500 * E, 0));
  log.begin_checkpoint();
  log.end_checkpoint();
  DirtyLog again(dir.fd, dir.path, false);
  EXPECT_TRUE(again.load()->empty());
  log.note_truncate(1, 10 * E, 3 * E + 5);
  log.note_truncate(2, 5, 100 * E);
  log.note_truncate(3, 1000 * E, 0);
  log.sync();
  std::vector<DirtyLog::Entry> want;
  for (uint64_t x = 3; x <= 9; x++) want.push_back({1, x});
  want.push_back({2, 0});
  want.push_back({3, DirtyLog::kWholeFile});
  DirtyLog reread(dir.fd, dir.path, false);
  EXPECT_EQ(*reread.load(), want);
}

// A fallocate or punch of a huge range (a record may carry 2^62 bytes) is one whole-file entry:
// noting every extent of it exhausted memory before the kernel was asked (a staged blockData
// with a huge `zeros`, or a fallocate record: tests/fuzz/fuzz_stage_log, regress-huge-punch-*).
TEST(DirtyLog, HugeRangeIsLoggedAsTheWholeFile) {
  TempDir dir;
  const uint64_t E = DirtyLog::kExtentSize;
  DirtyLog log(dir.fd, dir.path, false);
  log.load();
  EXPECT_TRUE(log.note(4, 0, uint64_t{1} << 62));
  EXPECT_TRUE(log.note(5, 3 * E, 64 * E));          // 64 extents: each one
  EXPECT_TRUE(log.note(6, UINT64_MAX - 10, 100));   // to the end of the offsets: no wrap-around
  log.sync();
  EXPECT_EQ(log.entries(), 1u + 64u + 1u);
  EXPECT_TRUE(log.logged(4, DirtyLog::kWholeFile));
  EXPECT_TRUE(log.logged(5, 66));
  EXPECT_FALSE(log.logged(5, 67));
  EXPECT_TRUE(log.logged(6, (UINT64_MAX - 10) >> DirtyLog::kExtentShift));
  DirtyLog reread(dir.fd, dir.path, false);
  EXPECT_EQ(reread.load()->size(), 66u);
}

// Writers on several threads: whoever gets false from note() (or returns from its sync()) may
// write, so by then the extent must be in the file, whichever thread's sync wrote it.
TEST(DirtyLog, ConcurrentWritersSeeOnlyDurableExtentsAsLogged) {
  TempDir dir;
  std::vector<std::set<DirtyLog::Entry>> written(4);
  {
    DirtyLog log(dir.fd, dir.path, false);
    log.load();
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; t++)
      threads.emplace_back([&, t] {
        std::mt19937_64 rng(t);
        for (int i = 0; i < 2000; i++) {
          FileId fid = 1 + rng() % 3;
          uint64_t off = (rng() % 200) * DirtyLog::kExtentSize + rng() % 1000;
          if (log.note(fid, off, 4096)) log.sync();
          written[t].insert({fid, off >> DirtyLog::kExtentShift});
        }
      });
    for (auto& th : threads) th.join();
  }
  DirtyLog log(dir.fd, dir.path, false);
  auto got = log.load();
  ASSERT_TRUE(got.has_value());
  std::set<DirtyLog::Entry> have(got->begin(), got->end()), want;
  for (auto& w : written) want.insert(w.begin(), w.end());
  EXPECT_EQ(have, want);
}

TEST(DirtyLog, SyncBeforeLoadRefused) {
  TempDir dir;
  DirtyLog log(dir.fd, dir.path, false);
  log.note(1, 0, 1);
  EXPECT_THROW(log.sync(), Error);
}

// ----------------------------------------------------------------------------------------------
// Crash recovery: saved leaves + logged extents give the same tree as a full rehash

TEST(DirtyLog, RecoveryRehashesOnlyLoggedExtents) {
  TempDir dir;
  const uint64_t E = DirtyLog::kExtentSize, size = 64 << 20;
  File f(dir.file("data"));
  std::mt19937_64 rng(8);
  pwrite_all(f.fd, random_bytes(rng, size), 0);
  {
    FileHashTree t = built(f.fd);
    DirtyLog log(dir.fd, dir.path, false);
    log.load();
    t.save(dir.fd, 77, false);  // clean point
    log.clear();
    // Writes into 3 extents (one past the old end), then a crash before the next clean point:
    // the tree in memory is lost, the saved one is stale.
    std::vector<uint64_t> offs{5 * E + 100, 5 * E + 9000, 11 * E - 2, size + 4096};
    for (uint64_t off : offs) {
      if (log.note(77, off, 4096)) log.sync();
      pwrite_all(f.fd, random_bytes(rng, 4096), off);
      t.mark_dirty(off, 4096);
    }
  }
  DirtyLog log(dir.fd, dir.path, false);
  auto entries = log.load();
  ASSERT_TRUE(entries.has_value());
  std::vector<uint64_t> extents;
  for (auto& e : *entries) extents.push_back(e.extent);
  EXPECT_EQ(extents, (std::vector<uint64_t>{5, 10, 11, 16}));
  FileHashTree t(4096, "data");
  uint64_t read = recover_file_tree(t, dir.fd, 77, f.fd, extents);
  EXPECT_LE(read, 4 * E / 4096);
  EXPECT_GT(read, 0u);
  expect_same_tree(t, built(f.fd));

  // Without a saved tree, or with a size change nobody logged, the whole file is rebuilt.
  FileHashTree::remove_saved(dir.fd, 77);
  FileHashTree u(4096, "data");
  EXPECT_EQ(recover_file_tree(u, dir.fd, 77, f.fd, {}), size / 4096 + 1);  // the data, not the hole
  u.save(dir.fd, 77, false);
  ASSERT_EQ(ftruncate(f.fd, 3 * E), 0);
  FileHashTree v(4096, "data");
  EXPECT_EQ(recover_file_tree(v, dir.fd, 77, f.fd, {}), 3 * E / 4096);
  expect_same_tree(v, built(f.fd));
}

// ----------------------------------------------------------------------------------------------
// Costs, printed for the owner to judge the write path (not asserted: timing is not a test)

TEST(HashTreeSpeed, Build256MiBAndRefreshAfterRandomWrites) {
  TempDir dir;
  File f(dir.file("data"));
  const uint64_t size = 256ull << 20;
  std::mt19937_64 rng(9);
  std::string chunk = random_bytes(rng, 8 << 20);
  for (uint64_t off = 0; off < size; off += chunk.size()) pwrite_all(f.fd, chunk, off);  // in page cache

  FileHashTree t(4096, "bench");
  auto t0 = Clock::now();
  uint64_t read = t.build(f.fd, size);
  double build_s = seconds_since(t0);
  EXPECT_EQ(read, size / 4096);
  printf("[ speed    ] build of a 256 MiB file (page cache): %.3f s, %.0f MiB/s\n", build_s, 256 / build_s);

  const int writes = 1000;
  std::string block = random_bytes(rng, 4096);
  std::vector<uint64_t> offs;
  for (int i = 0; i < writes; i++) {
    offs.push_back((rng() % (size / 4096)) * 4096);
    pwrite_all(f.fd, block, offs.back());
  }
  auto m0 = Clock::now();
  for (uint64_t off : offs) t.mark_dirty(off, 4096);
  double mark_s = seconds_since(m0);
  uint64_t dirty = t.dirty_blocks();
  t0 = Clock::now();
  read = t.refresh(f.fd);
  double refresh_s = seconds_since(t0);
  EXPECT_EQ(read, dirty);
  printf("[ speed    ] mark_dirty: %.0f ns per 4 KiB write; refresh after %d random 4 KiB writes (%" PRIu64
         " blocks): %.2f ms, %.1f us per block, %.0f blocks/s\n",
         mark_s / writes * 1e9, writes, dirty, refresh_s * 1e3, refresh_s / double(dirty) * 1e6, double(dirty) / refresh_s);

  // Hashing alone, without the read: XXH3-128 over 4 KiB blocks in memory.
  t0 = Clock::now();
  Hash128 acc{};
  for (size_t i = 0; i + 4096 <= chunk.size(); i += 4096) acc.lo ^= hash_bytes(chunk.data() + i, 4096).lo;
  double hash_s = seconds_since(t0);
  printf("[ speed    ] XXH3-128 of 4 KiB blocks in memory: %.0f MiB/s (%llx)\n", 8 / hash_s, (unsigned long long)(acc.lo & 0xf));

  // Save/load of the 256 MiB file's leaves (1 MiB).
  t0 = Clock::now();
  t.save(dir.fd, 1, /*durable=*/true);
  double save_s = seconds_since(t0);
  FileHashTree u(4096);
  t0 = Clock::now();
  ASSERT_TRUE(u.load(dir.fd, 1));
  double load_s = seconds_since(t0);
  EXPECT_EQ(u.root(), t.root());
  printf("[ speed    ] save (fsync'ed) %.2f ms, load %.2f ms of 65536 leaves\n", save_s * 1e3, load_s * 1e3);

  // The dirty log's write-path cost for writes into already-logged extents.
  DirtyLog log(dir.fd, dir.path, /*durable=*/true);
  log.load();
  for (uint64_t x = 0; x < size / DirtyLog::kExtentSize; x++) log.note(1, x * DirtyLog::kExtentSize, 1);
  t0 = Clock::now();
  log.sync();
  double sync_s = seconds_since(t0);
  const int notes = 1000000;
  int needed = 0;
  t0 = Clock::now();
  for (int i = 0; i < notes; i++) needed += log.note(1, (rng() % (size / 4096)) * 4096, 4096);
  double note_s = seconds_since(t0);
  EXPECT_EQ(needed, 0);
  printf("[ speed    ] DirtyLog: note() of a logged extent %.0f ns; one sync of 64 new extents %.2f ms\n",
         note_s / notes * 1e9, sync_s * 1e3);
}

}  // namespace
}  // namespace blockrepl
