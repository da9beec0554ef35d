// XXH3-128 block hashing and FileHashTree updates: what every write costs the hash index, and
// what a rehash after an unclean stop or a full build costs per byte.
#include <benchmark/benchmark.h>

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "blockrepl/hash_tree.h"

namespace blockrepl {
namespace {

constexpr uint32_t kBlock = 4096;
constexpr uint64_t kTreeBytes = 256ull << 20;  // 65,536 leaves of 4 KiB: three levels

std::string random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i + 8 <= n; i += 8) {
    uint64_t v = rng();
    memcpy(&s[i], &v, 8);
  }
  return s;
}

// Aligned 4 KiB offsets spread over the tree, drawn up front so the loop times only the tree.
std::vector<uint64_t> random_block_offsets(uint64_t file_bytes, size_t count) {
  std::mt19937_64 rng(42);
  std::vector<uint64_t> offsets(count);
  for (auto& o : offsets) o = (rng() % (file_bytes / kBlock)) * kBlock;
  return offsets;
}

// A clean tree of a file that is all holes (no I/O needed to build it).
FileHashTree empty_tree_of(uint64_t size) {
  FileHashTree tree(kBlock, "bench");
  tree.truncate(size);
  tree.refresh(-1);
  return tree;
}

// A file of random data on disk (in the page cache once written), removed on destruction.
struct ScratchFile {
  std::string path;
  int fd = -1;
  explicit ScratchFile(uint64_t size) {
    char tmpl[] = "/var/tmp/blockrepl-micro-bench-XXXXXX";
    fd = mkstemp(tmpl);
    if (fd < 0) throw std::runtime_error("mkstemp failed");
    path = tmpl;
    const std::string chunk = random_bytes(1 << 20, 7);
    for (uint64_t off = 0; off < size; off += chunk.size())
      if (pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(chunk.size()))
        throw std::runtime_error("pwrite failed");
  }
  ~ScratchFile() {
    close(fd);
    unlink(path.c_str());
  }
};

// The hash itself, per block size: the floor under every tree operation.
void BM_HashBlock(benchmark::State& state) {
  const auto size = static_cast<uint32_t>(state.range(0));
  const std::string block = random_bytes(size, 1);
  for (auto _ : state) benchmark::DoNotOptimize(hash_block(block.data(), block.size(), size));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * size);
}
BENCHMARK(BM_HashBlock)->Arg(512)->Arg(4096)->Arg(64 << 10)->Arg(1 << 20);

// The master's write path: a 4 KiB write hashed from the data it carries, then the tree made
// clean again (leaf plus one node per level above it). No file I/O.
void BM_TreeWroteAndRefresh(benchmark::State& state) {
  FileHashTree tree = empty_tree_of(kTreeBytes);
  const std::string data = random_bytes(kBlock, 2);
  const auto offsets = random_block_offsets(kTreeBytes, 4096);
  size_t i = 0;
  for (auto _ : state) {
    tree.wrote(offsets[i++ % offsets.size()], data);
    tree.refresh(-1);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kBlock);
}
BENCHMARK(BM_TreeWroteAndRefresh);

// The same write batched as the checkpoint sees it: state.range(0) scattered writes, then one
// refresh, so nodes shared between changed leaves are recomputed once.
void BM_TreeWroteBatchThenRefresh(benchmark::State& state) {
  FileHashTree tree = empty_tree_of(kTreeBytes);
  const std::string data = random_bytes(kBlock, 3);
  const auto batch = static_cast<size_t>(state.range(0));
  const auto offsets = random_block_offsets(kTreeBytes, 4096);
  size_t i = 0;
  for (auto _ : state) {
    for (size_t k = 0; k < batch; k++) tree.wrote(offsets[i++ % offsets.size()], data);
    tree.refresh(-1);
  }
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * batch));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * batch) * kBlock);
}
BENCHMARK(BM_TreeWroteBatchThenRefresh)->Arg(64)->Arg(1024);

// A slave's or a partial write's path: only told where the write went (mark_dirty), the block
// is read back (pread from the page cache) and rehashed by refresh().
void BM_TreeMarkDirtyAndRefreshFromFile(benchmark::State& state) {
  constexpr uint64_t kFileBytes = 64ull << 20;
  ScratchFile file(kFileBytes);
  FileHashTree tree(kBlock, "bench");
  tree.build(file.fd, kFileBytes);
  const auto offsets = random_block_offsets(kFileBytes, 4096);
  size_t i = 0;
  for (auto _ : state) {
    tree.mark_dirty(offsets[i++ % offsets.size()], kBlock);
    tree.refresh(file.fd);
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kBlock);
}
BENCHMARK(BM_TreeMarkDirtyAndRefreshFromFile);

// A full build (a file with no saved tree): reads and hashes every block of a cached file.
void BM_TreeBuildFromFile(benchmark::State& state) {
  const auto bytes = static_cast<uint64_t>(state.range(0));
  ScratchFile file(bytes);
  for (auto _ : state) {
    FileHashTree tree(kBlock, "bench");
    benchmark::DoNotOptimize(tree.build(file.fd, bytes));
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
}
BENCHMARK(BM_TreeBuildFromFile)->Arg(64 << 20)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace blockrepl
