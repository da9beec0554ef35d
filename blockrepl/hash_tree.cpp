#include "blockrepl/hash_tree.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "blockrepl/error.h"
#include "blockrepl/fsutil.h"
#include "blockrepl/log.h"

namespace blockrepl {

// The saved leaves and the log are written as raw little-endian words; the project builds for
// x86-64 and arm64 Linux only. A big-endian port needs byte swaps here.
static_assert(std::endian::native == std::endian::little, "on-disk formats assume little-endian");

namespace {

constexpr uint64_t kF = kHashFanOut;

uint64_t div_ceil(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

Hash128 from_xxh(XXH128_hash_t h) { return Hash128{h.low64, h.high64}; }

// Reads exactly len bytes at off unless EOF comes first; returns the bytes read.
size_t pread_full(int fd, char* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    ssize_t n = pread(fd, buf + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("read", errno);  // rethrown with context by the caller
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

std::string_view bytes_of(const void* data, size_t len) { return {static_cast<const char*>(data), len}; }

void write_full(int fd, const void* data, size_t len, uint64_t off, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  size_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, p + done, len - done, static_cast<off_t>(off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot write " + what, errno);
    }
    done += static_cast<size_t>(n);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Hashing

std::string Hash128::hex() const {
  char buf[33];
  snprintf(buf, sizeof buf, "%016" PRIx64 "%016" PRIx64, hi, lo);
  return buf;
}

Hash128 hash_bytes(const void* data, size_t len) { return from_xxh(XXH3_128bits(data, len)); }

Hash128 hash_block(const void* data, size_t len, uint32_t block_size) {
  if (len >= block_size) return hash_bytes(data, block_size);
  // Only a file's last block is partial: a copy is simpler than a streaming state and rare.
  std::vector<char> padded(block_size, 0);
  memcpy(padded.data(), data, len);
  return hash_bytes(padded.data(), block_size);
}

Hash128 zero_block_hash(uint32_t block_size) {
  static std::mutex mu;
  static std::map<uint32_t, Hash128> cache;
  std::lock_guard lk(mu);
  auto it = cache.find(block_size);
  if (it != cache.end()) return it->second;
  std::vector<char> zeros(block_size, 0);
  Hash128 h = hash_bytes(zeros.data(), zeros.size());
  cache.emplace(block_size, h);
  return h;
}

namespace {
// Deeper than any tree: 2^64 bytes in 512-byte blocks is 2^55 leaves, 11 levels at F = 64.
constexpr unsigned kMaxLevels = 12;

unsigned levels_for_blocks(uint64_t n) {
  unsigned l = 1;
  while (n > 1) {
    n = div_ceil(n, kF);
    l++;
  }
  return l;
}

// full_zero_hashes(bs)[k]: a node at level k over F^k zero blocks. Each level hashes F copies of
// the one below, exactly as a node over real children does, so zeros need no storage.
const std::vector<Hash128>& full_zero_hashes(uint32_t block_size) {
  static std::mutex mu;
  static std::map<uint32_t, std::vector<Hash128>> cache;  // never erased: references stay valid
  std::lock_guard lk(mu);
  auto [it, inserted] = cache.try_emplace(block_size);
  if (inserted) {
    std::vector<Hash128> children(kF);
    Hash128 h = zero_block_hash(block_size);
    for (unsigned k = 0; k < kMaxLevels; k++) {
      it->second.push_back(h);
      std::fill(children.begin(), children.end(), h);
      h = hash_bytes(children.data(), children.size() * sizeof(Hash128));
    }
  }
  return it->second;
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// FileHashTree: shape

FileHashTree::FileHashTree(uint32_t block_size, std::string label)
    : block_size_(block_size), label_(label.empty() ? "a file" : std::move(label)) {
  if (block_size < 512 || block_size > (16u << 20) || !std::has_single_bit(block_size))
    throw Error("hash tree of " + label_ + ": block size " + std::to_string(block_size) +
                " is not a power of two between 512 and 16 MiB");
  shift_ = static_cast<unsigned>(std::countr_zero(block_size));
  zero_hash_ = zero_block_hash(block_size);
  full_zeros_ = &full_zero_hashes(block_size);
  levels_.resize(1);
}

uint64_t FileHashTree::block_count() const { return levels_[0].size; }

uint64_t FileHashTree::stored_bytes() const {
  uint64_t chunks = 0;
  for (const Level& l : levels_) chunks += l.chunks.size();
  return chunks * sizeof(Chunk);
}

Hash128 FileHashTree::full_zero(unsigned level) const { return (*full_zeros_)[level]; }

Hash128 FileHashTree::zero_node(unsigned level, uint64_t index) const {
  // Only the last node of a level can have fewer children than F below it.
  if (index + 1 == levels_[level].size && level < edge_zeros_.size()) return edge_zeros_[level];
  return full_zero(level);
}

Hash128 FileHashTree::get(unsigned level, uint64_t index) const {
  const auto& chunks = levels_[level].chunks;
  auto it = chunks.find(index / kF);
  return it == chunks.end() ? zero_node(level, index) : it->second[index % kF];
}

FileHashTree::Chunk* FileHashTree::chunk_for(unsigned level, uint64_t index) {
  auto [it, inserted] = levels_[level].chunks.try_emplace(index / kF);
  if (inserted) {
    const uint64_t first = index / kF * kF;
    for (uint64_t j = 0; j < kF; j++) it->second[j] = first + j < levels_[level].size ? zero_node(level, first + j) : full_zero(level);
  }
  return &it->second;
}

void FileHashTree::put(unsigned level, uint64_t index, const Hash128& h) {
  auto& chunks = levels_[level].chunks;
  auto it = chunks.find(index / kF);
  if (it != chunks.end()) {
    it->second[index % kF] = h;
    return;
  }
  // A zero node where nothing is stored is already what get() answers: store nothing.
  if (h == zero_node(level, index)) return;
  (*chunk_for(level, index))[index % kF] = h;
}

Hash128 FileHashTree::compute_node(unsigned level, uint64_t index) const {
  const Level& below = levels_[level - 1];
  auto it = below.chunks.find(index);
  if (it == below.chunks.end()) return zero_node(level, index);  // an all-zero subtree
  const uint64_t count = std::min<uint64_t>(kF, below.size - index * kF);
  return hash_bytes(it->second.data(), count * sizeof(Hash128));
}

void FileHashTree::trim_level(unsigned level, uint64_t new_size) {
  auto& chunks = levels_[level].chunks;
  chunks.erase(chunks.lower_bound(div_ceil(new_size, kF)), chunks.end());
  if (new_size % kF == 0) return;
  auto it = chunks.find(new_size / kF);
  if (it == chunks.end()) return;
  for (uint64_t j = new_size % kF; j < kF; j++) it->second[j] = full_zero(level);
}

void FileHashTree::reshape_levels(uint64_t blocks) {
  const unsigned want = levels_for_blocks(blocks);
  if (want < levels_.size()) levels_.resize(want);
  uint64_t n = blocks;
  for (unsigned k = 0; k < want; k++) {
    if (k >= levels_.size()) levels_.emplace_back();
    if (n < levels_[k].size) trim_level(k, n);
    levels_[k].size = n;
    n = div_ceil(n, kF);
  }
}

void FileHashTree::refresh_edge_zeros() {
  const uint64_t blocks = levels_[0].size;
  if (edge_blocks_ == blocks && edge_zeros_.size() == levels_.size()) return;
  edge_zeros_.assign(levels_.size(), full_zero(0));
  Chunk buf;
  for (unsigned k = 1; k < levels_.size(); k++) {
    const uint64_t children = levels_[k - 1].size - (levels_[k].size - 1) * kF;
    for (uint64_t j = 0; j + 1 < children; j++) buf[j] = full_zero(k - 1);
    buf[children - 1] = edge_zeros_[k - 1];
    edge_zeros_[k] = hash_bytes(buf.data(), children * sizeof(Hash128));
  }
  edge_blocks_ = blocks;
}

unsigned FileHashTree::levels_for(uint64_t file_size, uint32_t block_size) {
  return levels_for_blocks(div_ceil(file_size, block_size));
}

uint64_t FileHashTree::level_size_for(uint64_t file_size, uint32_t block_size, unsigned level) {
  uint64_t n = div_ceil(file_size, block_size);
  for (unsigned k = 0; k < level; k++) {
    if (n <= 1) return 0;  // above the top
    n = div_ceil(n, kF);
  }
  return n;
}

void FileHashTree::require_clean(const char* what) const {
  if (dirty())
    throw Error("hash tree of " + label_ + ": " + what + " with changes not yet refreshed");
}

unsigned FileHashTree::levels() const {
  require_clean("levels()");
  return static_cast<unsigned>(levels_.size());
}

uint64_t FileHashTree::level_size(unsigned level) const {
  require_clean("level_size()");
  return level < levels_.size() ? levels_[level].size : 0;
}

Hash128 FileHashTree::node(unsigned level, uint64_t index) const {
  require_clean("node()");
  if (level >= levels_.size() || index >= levels_[level].size) return kAbsentNode;
  return get(level, index);
}

std::vector<Hash128> FileHashTree::nodes(unsigned level, uint64_t first, uint64_t count) const {
  require_clean("nodes()");
  if (level >= levels_.size()) return {};
  const uint64_t size = levels_[level].size;
  if (first >= size) return {};
  const uint64_t end = first + std::min<uint64_t>(count, size - first);
  std::vector<Hash128> out;
  out.reserve(end - first);
  for (uint64_t i = first; i < end; i++) out.push_back(get(level, i));
  return out;
}

Hash128 FileHashTree::root() const {
  require_clean("root()");
  // The top node says nothing about bytes past EOF in the last block (they hash as zeros), so
  // the size goes in too; the block size as well, so trees of different shapes never match.
  uint64_t buf[4] = {0, 0, size_, block_size_};
  const auto top = static_cast<unsigned>(levels_.size() - 1);
  if (levels_[top].size > 0) {
    const Hash128 h = get(top, 0);
    buf[0] = h.lo;
    buf[1] = h.hi;
  }
  return hash_bytes(buf, sizeof buf);
}

// ---------------------------------------------------------------------------------------------
// FileHashTree: changes

void FileHashTree::add_range(Ranges& r, uint64_t start, uint64_t end) {
  if (start >= end) return;
  auto it = r.upper_bound(start);
  Ranges::iterator cur;
  if (it != r.begin() && std::prev(it)->second >= start) {
    // Overlaps or touches the range before: grow that one in place (rewrites of a dirty block
    // and sequential appends, the common cases, allocate nothing).
    cur = std::prev(it);
    if (cur->second >= end) return;
    cur->second = end;
  } else {
    cur = r.emplace_hint(it, start, end);
  }
  // Swallow the ranges that start inside (or right at the end of) the grown one.
  for (auto next = std::next(cur); next != r.end() && next->first <= cur->second;) {
    cur->second = std::max(cur->second, next->second);
    next = r.erase(next);
  }
}

void FileHashTree::clip_ranges(Ranges& r, uint64_t end) {
  auto it = r.lower_bound(end);
  r.erase(it, r.end());
  if (!r.empty()) {
    auto last = std::prev(r.end());
    if (last->second > end) last->second = end;
  }
}

void FileHashTree::mark_dirty(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  uint64_t end = offset + length;
  if (end < offset) throw Error("hash tree of " + label_ + ": range overflows");
  if (end > size_) truncate(end);
  add_range(dirty_, offset >> shift_, div_ceil(end, block_size_));
}

void FileHashTree::remove_range(Ranges& r, uint64_t start, uint64_t end) {
  if (start >= end) return;
  auto it = r.upper_bound(start);
  if (it != r.begin() && std::prev(it)->second > start) {
    // The range before reaches into [start, end): keep its head, and its tail past end.
    auto prev = std::prev(it);
    const uint64_t prev_end = prev->second;
    if (prev->first < start) prev->second = start;
    else r.erase(prev);
    if (prev_end > end) {
      r.emplace(end, prev_end);
      return;
    }
  }
  while (it != r.end() && it->first < end) {
    if (it->second > end) {
      const uint64_t tail_end = it->second;
      r.erase(it);
      r.emplace(end, tail_end);
      return;
    }
    it = r.erase(it);
  }
}

void FileHashTree::wrote(uint64_t offset, std::string_view data) {
  // Every block the write touches is dirty, as for any write; then the blocks it covers whole
  // are hashed from the data and are clean again. Only the partial blocks at either end are
  // left to be read back.
  mark_dirty(offset, data.size());
  const uint64_t first_whole = div_ceil(offset, block_size_);
  const uint64_t end_whole = (offset + data.size()) >> shift_;
  if (first_whole >= end_whole) return;
  const char* p = data.data() + ((first_whole << shift_) - offset);
  for (uint64_t b = first_whole; b < end_whole; b++, p += block_size_) put(0, b, hash_bytes(p, block_size_));
  remove_range(dirty_, first_whole, end_whole);
  add_range(stale_, first_whole, end_whole);
}

void FileHashTree::truncate(uint64_t new_size) {
  if (new_size == size_) return;
  uint64_t old_n = levels_[0].size;
  uint64_t new_n = div_ceil(new_size, block_size_);
  if (new_size < size_) {
    clip_ranges(dirty_, new_n);
    clip_ranges(stale_, new_n);
    // A cut inside a block leaves its tail past EOF, which now hashes as zeros.
    if (new_size % block_size_ != 0) add_range(dirty_, new_n - 1, new_n);
  }
  // New blocks are holes: nothing is stored for them and nothing read, whatever their number.
  // (Growing inside the last block changes no leaf at all: the bytes past the old EOF were
  // already hashed as zeros.)
  reshape_levels(new_n);
  // Only the old and the new last node of every level change: the nodes in between cover
  // whole zero subtrees, whose hashes are the per-level constants.
  if (new_n != old_n) {
    const uint64_t kept = std::min(old_n, new_n);
    if (kept > 0) add_range(stale_, kept - 1, kept);
    if (new_n > 0) add_range(stale_, new_n - 1, new_n);
    reshape_ = true;  // a shrink to 0 or 1 block leaves nothing stale but levels to drop
  }
  size_ = new_size;
}

uint64_t FileHashTree::dirty_blocks() const {
  uint64_t n = 0;
  for (auto& [s, e] : dirty_) n += e - s;
  return n;
}

void FileHashTree::hash_blocks(int fd, uint64_t first, uint64_t end, std::vector<char>& buf) {
  // Read in chunks of up to 1 MiB: large enough for sequential throughput, small enough to
  // stay in cache while it is hashed.
  const uint64_t chunk_blocks = std::max<uint64_t>(1, (uint64_t{1} << 20) >> shift_);
  for (uint64_t b = first; b < end;) {
    uint64_t nb = std::min(chunk_blocks, end - b);
    uint64_t off = b << shift_;
    uint64_t want = std::min<uint64_t>(nb << shift_, size_ - off);  // never past the tree's EOF
    if (buf.size() < (nb << shift_)) buf.resize(nb << shift_);
    size_t got;
    try {
      got = pread_full(fd, buf.data(), want, off);
    } catch (const Error& e) {
      throw Error("cannot read " + label_ + " at offset " + std::to_string(off) + " to hash it: " +
                      strerror(e.errno_value()),
                  e.errno_value());
    }
    // A file shorter than the tree thinks (a truncate still on its way to mark_dirty) reads
    // as zeros, as it will hash once the truncate arrives.
    if (got < (nb << shift_)) memset(buf.data() + got, 0, (nb << shift_) - got);
    for (uint64_t i = 0; i < nb; i++) put(0, b + i, hash_bytes(buf.data() + (i << shift_), block_size_));
    b += nb;
  }
}

void FileHashTree::recompute_internal() {
  // The levels already have their shape (truncate keeps it); the zero hash of each level's last
  // node depends on it.
  refresh_edge_zeros();
  // Walk the changed ranges up, one level at a time. A node whose subtree turned out all zeros
  // drops the chunk of its children: a hole or written zeros cost nothing once hashed.
  Ranges cur = std::move(stale_);
  stale_.clear();
  reshape_ = false;
  for (unsigned k = 1; k < levels_.size(); k++) {
    Ranges up;
    for (auto& [lo, hi] : cur) add_range(up, lo / kF, div_ceil(hi, kF));
    clip_ranges(up, levels_[k].size);
    for (auto& [lo, hi] : up)
      for (uint64_t i = lo; i < hi; i++) {
        const Hash128 h = compute_node(k, i);
        if (h == zero_node(k, i)) levels_[k - 1].chunks.erase(i);
        put(k, i, h);
      }
    cur = std::move(up);
  }
  drop_zero_top();
}

void FileHashTree::drop_zero_top() {
  // The top chunk has no parent to drop it: once the whole file hashes as zeros, drop it here.
  const auto top = static_cast<unsigned>(levels_.size() - 1);
  auto& chunks = levels_[top].chunks;
  auto it = chunks.find(0);
  if (it != chunks.end() && (levels_[top].size == 0 || it->second[0] == zero_node(top, 0))) chunks.erase(it);
}

uint64_t FileHashTree::refresh(int fd) {
  uint64_t read = 0;
  if (!dirty_.empty()) {
    if (fd < 0) throw Error("hash tree of " + label_ + ": blocks to rehash but no file to read");
    std::vector<char> buf;
    while (!dirty_.empty()) {
      auto [lo, hi] = *dirty_.begin();
      hash_blocks(fd, lo, hi, buf);  // throws with the range still dirty
      dirty_.erase(dirty_.begin());
      add_range(stale_, lo, hi);
      read += hi - lo;
    }
  }
  if (!stale_.empty() || reshape_) recompute_internal();
  return read;
}

uint64_t FileHashTree::build(int fd, uint64_t size) {
  levels_.assign(1, {});
  dirty_.clear();
  stale_.clear();
  reshape_ = false;
  size_ = 0;
  truncate(size);  // all holes: nothing stored, only the last node stale
  // Read only what SEEK_DATA calls data: holes hash as zero blocks without a read, so a sparse
  // 1 TiB file costs what its data costs. File systems without hole support answer the whole
  // file as data (the kernel's generic lseek), which is slower but still right.
  std::vector<char> buf;
  uint64_t read = 0, pos = 0;
  while (pos < size) {
    off_t d = lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (d < 0) {
      if (errno == ENXIO) break;  // no data past pos
      throw_errno("cannot scan " + label_ + " for data", errno);
    }
    if (static_cast<uint64_t>(d) >= size) break;
    off_t h = lseek(fd, d, SEEK_HOLE);
    if (h < 0) throw_errno("cannot scan " + label_ + " for holes", errno);
    uint64_t first = static_cast<uint64_t>(d) >> shift_;
    uint64_t end = div_ceil(std::min<uint64_t>(static_cast<uint64_t>(h), size), block_size_);
    hash_blocks(fd, first, end, buf);
    add_range(stale_, first, end);
    read += end - first;
    pos = end << shift_;
  }
  recompute_internal();
  return read;
}

// ---------------------------------------------------------------------------------------------
// Diff

std::vector<uint64_t> FileHashTree::diff_children(unsigned level, std::span<const uint64_t> indices,
                                                  std::span<const Hash128> ours,
                                                  std::span<const Hash128> theirs,
                                                  uint64_t child_level_size) {
  if (ours.size() != indices.size() || theirs.size() != indices.size())
    throw Error("hash tree diff: " + std::to_string(indices.size()) + " indices but " +
                std::to_string(ours.size()) + " and " + std::to_string(theirs.size()) + " hashes");
  std::vector<uint64_t> out;
  for (size_t j = 0; j < indices.size(); j++) {
    if (ours[j] == theirs[j]) continue;
    if (level == 0) {
      out.push_back(indices[j]);
      continue;
    }
    uint64_t c0 = indices[j] * kF, c1 = std::min<uint64_t>(c0 + kF, child_level_size);
    for (uint64_t c = c0; c < c1; c++) out.push_back(c);
  }
  return out;
}

std::vector<uint64_t> FileHashTree::differing_children(unsigned level, std::span<const uint64_t> indices,
                                                       std::span<const Hash128> theirs,
                                                       uint64_t their_size) const {
  std::vector<Hash128> ours;
  ours.reserve(indices.size());
  for (uint64_t i : indices) ours.push_back(node(level, i));
  uint64_t child = 0;
  if (level > 0)
    child = std::max(level_size(level - 1), level_size_for(their_size, block_size_, level - 1));
  return diff_children(level, indices, ours, theirs, child);
}

std::vector<uint64_t> diff(const FileHashTree& a, const FileHashTree& b, DiffStats* stats) {
  if (a.block_size() != b.block_size())
    throw Error("hash tree diff of " + a.label() + " and " + b.label() + ": block sizes differ (" +
                std::to_string(a.block_size()) + " vs " + std::to_string(b.block_size()) + ")");
  DiffStats local;
  DiffStats& st = stats ? *stats : local;
  st = {};
  st.hashes_compared = 1;
  if (a.root() == b.root()) return {};
  // Start at the taller tree's top; a level the other tree lacks answers kAbsentNode, so a
  // size difference simply looks like differing nodes along the right edge.
  unsigned level = std::max(a.levels(), b.levels()) - 1;
  std::vector<uint64_t> indices{0};
  for (;;) {
    std::vector<Hash128> ha, hb;
    ha.reserve(indices.size());
    hb.reserve(indices.size());
    for (uint64_t i : indices) {
      ha.push_back(a.node(level, i));
      hb.push_back(b.node(level, i));
    }
    st.hashes_compared += indices.size();
    uint64_t child = level > 0 ? std::max(a.level_size(level - 1), b.level_size(level - 1)) : 0;
    std::vector<uint64_t> next = FileHashTree::diff_children(level, indices, ha, hb, child);
    if (level == 0 || next.empty()) return level == 0 ? next : std::vector<uint64_t>{};
    st.round_trips++;  // fetching level-1 is one more exchange with the peer
    level--;
    indices = std::move(next);
  }
}

// ---------------------------------------------------------------------------------------------
// Saved leaves: a 32-byte header, a body, then an XXH3-128 trailer over the body seeded with
// XXH3-64 of the header.
//   version 1 (still loaded, no longer written): the body is every leaf, 16 bytes each, so a
//     sparse file's saved tree was as large as its apparent size demanded.
//   version 2 (written): the body is the stored leaf chunks only, ascending, each an 8-byte
//     little-endian chunk index c then the F leaves [c*F, c*F+F) (leaves past the file's last
//     block are the zero-block hash). A chunk left out holds only zero-block hashes. leaf_count
//     is still the file's block count.

namespace {
constexpr char kLeavesMagic[8] = {'B', 'R', 'L', 'E', 'A', 'V', 'E', 'S'};
constexpr uint32_t kLeavesVersionDense = 1;
constexpr uint32_t kLeavesVersion = 2;
struct LeavesHeader {
  char magic[8];
  uint32_t version;
  uint32_t block_size;
  uint64_t file_size;
  uint64_t leaf_count;
};
static_assert(sizeof(LeavesHeader) == 32);
constexpr size_t kChunkRecordBytes = sizeof(uint64_t) + kF * sizeof(Hash128);

// Reads a saved tree's body in pieces while checksumming it; throws Error on I/O errors.
class BodyReader {
 public:
  BodyReader(int fd, uint64_t seed) : fd_(fd), state_(XXH3_createState()) {
    XXH3_128bits_reset_withSeed(state_, seed);
  }
  ~BodyReader() { XXH3_freeState(state_); }
  BodyReader(const BodyReader&) = delete;
  BodyReader& operator=(const BodyReader&) = delete;
  bool read(void* buf, size_t len) {
    if (pread_full(fd_, static_cast<char*>(buf), len, off_) != len) return false;
    XXH3_128bits_update(state_, buf, len);
    off_ += len;
    return true;
  }
  bool trailer_matches() {
    Hash128 sum;
    if (pread_full(fd_, reinterpret_cast<char*>(&sum), sizeof sum, off_) != sizeof sum) return false;
    return from_xxh(XXH3_128bits_digest(state_)) == sum;
  }

 private:
  int fd_;
  uint64_t off_ = sizeof(LeavesHeader);
  XXH3_state_t* state_;
};
}  // namespace

std::string FileHashTree::saved_name(FileId fid) {
  char buf[40];
  snprintf(buf, sizeof buf, "%016" PRIx64 ".leaves", fid);
  return buf;
}

void FileHashTree::save(int dirfd, FileId fid, bool durable) const {
  require_clean("save()");
  const std::string name = saved_name(fid);
  const std::string what = "saved hash tree " + name + " of " + label_;
  LeavesHeader h{};
  memcpy(h.magic, kLeavesMagic, sizeof h.magic);
  h.version = kLeavesVersion;
  h.block_size = block_size_;
  h.file_size = size_;
  h.leaf_count = levels_[0].size;
  std::string body;
  body.reserve(levels_[0].chunks.size() * kChunkRecordBytes);
  for (const auto& [c, chunk] : levels_[0].chunks) {
    body.append(bytes_of(&c, sizeof c));
    body.append(bytes_of(chunk.data(), sizeof chunk));
  }
  const Hash128 sum = from_xxh(XXH3_128bits_withSeed(body.data(), body.size(), XXH3_64bits(&h, sizeof h)));

  // Written to <name>.tmp and renamed, so a crash leaves the old leaves or the new, never a mix;
  // synced (file and folder) only when durable: otherwise the checkpoint syncs them once.
  const std::string_view pieces[] = {bytes_of(&h, sizeof h), body, bytes_of(&sum, sizeof sum)};
  if (int err = write_file_atomically(dirfd, name.c_str(), pieces, durable)) throw_errno("cannot write " + what, err);
}

void FileHashTree::load_leaf_run(uint64_t first, const Hash128* leaves, uint64_t count) {
  for (uint64_t i = 0; i < count; i++) put(0, first + i, leaves[i]);
  add_range(stale_, first, first + count);
}

bool FileHashTree::load_v1(int fd, uint64_t body_bytes, uint64_t leaf_count, uint64_t seed, const std::string& name) {
  if (body_bytes != leaf_count * sizeof(Hash128)) return false;
  // A chunk at a time: the file may be huge for a sparse file, its zeros are not kept.
  BodyReader in(fd, seed);
  Chunk buf;
  for (uint64_t first = 0; first < leaf_count; first += kF) {
    const uint64_t n = std::min<uint64_t>(kF, leaf_count - first);
    if (!in.read(buf.data(), n * sizeof(Hash128))) return false;
    if (std::any_of(buf.begin(), buf.begin() + static_cast<ptrdiff_t>(n), [&](const Hash128& x) { return !(x == zero_hash_); }))
      load_leaf_run(first, buf.data(), n);
  }
  if (!in.trailer_matches()) return false;
  LOG_INFO("saved hash tree %s of %s has the dense format 1; it is saved sparse at the next checkpoint",
           name.c_str(), label_.c_str());
  return true;
}

bool FileHashTree::load_v2(int fd, uint64_t body_bytes, uint64_t leaf_count, uint64_t seed, const std::string&) {
  if (body_bytes % kChunkRecordBytes != 0) return false;
  BodyReader in(fd, seed);
  const uint64_t chunks = div_ceil(leaf_count, kF);
  uint64_t next = 0;  // chunk indices must ascend: each stored once
  for (uint64_t r = 0; r < body_bytes / kChunkRecordBytes; r++) {
    uint64_t c;
    Chunk leaves;
    if (!in.read(&c, sizeof c) || !in.read(leaves.data(), sizeof leaves)) return false;
    if (c < next || c >= chunks) return false;
    next = c + 1;
    load_leaf_run(c * kF, leaves.data(), std::min<uint64_t>(kF, leaf_count - c * kF));
  }
  return in.trailer_matches();
}

bool FileHashTree::load(int dirfd, FileId fid) {
  const std::string name = saved_name(fid);
  int fd = openat(dirfd, name.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno != ENOENT) LOG_WARN("cannot open saved hash tree %s of %s: %s; rehashing", name.c_str(), label_.c_str(), strerror(errno));
    return false;
  }
  auto damaged = [&](const char* why) {
    LOG_WARN("saved hash tree %s of %s is damaged (%s); rehashing", name.c_str(), label_.c_str(), why);
    close(fd);
    return false;
  };
  struct stat sb;
  if (fstat(fd, &sb) != 0) return damaged(strerror(errno));
  const uint64_t fsize = static_cast<uint64_t>(sb.st_size);
  LeavesHeader h{};
  if (fsize < sizeof h + sizeof(Hash128)) return damaged("too short");
  const uint64_t body_bytes = fsize - sizeof h - sizeof(Hash128);
  try {
    if (pread_full(fd, reinterpret_cast<char*>(&h), sizeof h, 0) != sizeof h) return damaged("short read");
  } catch (const Error& e) {
    return damaged(e.what());
  }
  if (memcmp(h.magic, kLeavesMagic, sizeof h.magic) != 0) return damaged("bad magic");
  if (h.version != kLeavesVersion && h.version != kLeavesVersionDense) return damaged("unknown version");
  if (h.block_size < 512 || !std::has_single_bit(h.block_size)) return damaged("bad block size");
  if (h.leaf_count != div_ceil(h.file_size, h.block_size)) return damaged("leaf count does not match the size");
  if (h.block_size != block_size_) {
    close(fd);
    LOG_WARN("saved hash tree %s of %s has block size %u, not %u; rehashing", name.c_str(), label_.c_str(),
             h.block_size, block_size_);
    return false;
  }
  // Read into a fresh tree so that a damaged file leaves this one unchanged.
  FileHashTree loaded(block_size_, label_);
  loaded.truncate(h.file_size);
  const uint64_t seed = XXH3_64bits(&h, sizeof h);
  bool ok;
  try {
    ok = h.version == kLeavesVersionDense ? loaded.load_v1(fd, body_bytes, h.leaf_count, seed, name)
                                          : loaded.load_v2(fd, body_bytes, h.leaf_count, seed, name);
  } catch (const Error& e) {
    return damaged(e.what());
  }
  if (!ok) return damaged("length, chunk order or checksum wrong");
  close(fd);
  loaded.recompute_internal();
  *this = std::move(loaded);
  return true;
}

void FileHashTree::remove_saved(int dirfd, FileId fid) {
  std::string name = saved_name(fid);
  if (unlinkat(dirfd, name.c_str(), 0) != 0 && errno != ENOENT)
    throw_errno("cannot remove saved hash tree " + name, errno);
}

int open_hashes_dir(int meta_fd, const std::string& data_path) {
  std::string where = data_path + "/.blockrepl/" + kHashesDirName;
  if (mkdirat(meta_fd, kHashesDirName, 0700) != 0 && errno != EEXIST)
    throw_errno("cannot create " + where, errno);
  int fd = openat(meta_fd, kHashesDirName, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) throw_errno("cannot open " + where, errno);
  return fd;
}

// ---------------------------------------------------------------------------------------------
// DirtyLog: two files, dirty-log.0 and .1; entries go to the active one, a checkpoint switches
// files so that the old one can be emptied once the trees it covers are saved. Each file is a
// header then 24-byte records {fid, extent, check}; the check (XXH3-64 of the first 16 bytes
// with a seed) tells a record from the zeros or garbage of a torn append.

namespace {
constexpr char kLogMagic[8] = {'B', 'R', 'D', 'I', 'R', 'T', 'Y', '1'};
constexpr uint64_t kLogSeed = 0x626c6f636b72706cULL;  // "blockrpl"
struct LogHeader {
  char magic[8];
  uint32_t version;
  uint32_t extent_shift;
  uint64_t reserved;
  uint64_t check;  // XXH3-64 of the 24 bytes above
};
static_assert(sizeof(LogHeader) == 32);
struct LogRecord {
  uint64_t fid;
  uint64_t extent;
  uint64_t check;
};
static_assert(sizeof(LogRecord) == 24);

LogHeader make_log_header() {
  LogHeader h{};
  memcpy(h.magic, kLogMagic, sizeof h.magic);
  h.version = 1;
  h.extent_shift = DirtyLog::kExtentShift;
  h.check = XXH3_64bits_withSeed(&h, offsetof(LogHeader, check), kLogSeed);
  return h;
}
uint64_t record_check(const LogRecord& r) { return XXH3_64bits_withSeed(&r, 16, kLogSeed); }
const char* log_file_name(int i) { return i == 0 ? "dirty-log.0" : "dirty-log.1"; }
}  // namespace

// Not a real file (fid 0 is never used): "the log was damaged, rehash every file".
const DirtyLog::Entry DirtyLog::kEverything{kInvalidFileId, DirtyLog::kWholeFile};

size_t DirtyLog::EntryHash::operator()(const Entry& e) const {
  return static_cast<size_t>(XXH3_64bits(&e, sizeof e));
}

DirtyLog::DirtyLog(int meta_fd, std::string where, bool durable)
    : meta_fd_(meta_fd), where_(std::move(where)), durable_(durable) {
  try {
    open_file(0);
    open_file(1);
  } catch (...) {
    for (int& fd : fds_)
      if (fd >= 0) close(fd);
    throw;
  }
  end_ = sizeof(LogHeader);
}

DirtyLog::~DirtyLog() {
  for (int fd : fds_)
    if (fd >= 0) close(fd);
}

void DirtyLog::open_file(int i) {
  fds_[i] = openat(meta_fd_, log_file_name(i), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fds_[i] < 0) throw_errno("cannot open dirty-region log " + where_ + "/" + log_file_name(i), errno);
  // A new file gets its header at once, so appends never leave a headerless file behind.
  struct stat sb;
  if (fstat(fds_[i], &sb) != 0) throw_errno("cannot open dirty-region log " + where_ + "/" + log_file_name(i), errno);
  if (sb.st_size == 0) reset_file(i);
}

void DirtyLog::reset_file(int i) {
  const std::string what = "dirty-region log " + where_ + "/" + log_file_name(i);
  if (ftruncate(fds_[i], 0) != 0) throw_errno("cannot reset " + what, errno);
  LogHeader h = make_log_header();
  write_full(fds_[i], &h, sizeof h, 0, what);
  if (durable_ && fdatasync(fds_[i]) != 0) throw_errno("cannot sync " + what, errno);
}

std::optional<std::vector<DirtyLog::Entry>> DirtyLog::read_file(int i) {
  const std::string what = where_ + "/" + log_file_name(i);
  struct stat sb;
  if (fstat(fds_[i], &sb) != 0) throw_errno("cannot read dirty-region log " + what, errno);
  std::vector<Entry> out;
  // Empty: created just before a crash, before its header (written before any record).
  if (sb.st_size == 0) return out;
  std::vector<char> buf(static_cast<size_t>(sb.st_size));
  size_t got;
  try {
    got = pread_full(fds_[i], buf.data(), buf.size(), 0);
  } catch (const Error& e) {
    LOG_WARN("cannot read dirty-region log %s: %s", what.c_str(), strerror(e.errno_value()));
    return std::nullopt;
  }
  LogHeader want = make_log_header();
  if (got < sizeof want || memcmp(buf.data(), &want, sizeof want) != 0) {
    LOG_WARN("dirty-region log %s has a bad header", what.c_str());
    return std::nullopt;
  }
  bool torn = false;
  for (size_t off = sizeof want; off + sizeof(LogRecord) <= got; off += sizeof(LogRecord)) {
    LogRecord r;
    memcpy(&r, buf.data() + off, sizeof r);
    if (r.check != record_check(r)) {
      torn = true;
      continue;
    }
    // A good record after a bad one: not a torn last batch but damage in synced entries.
    if (torn) {
      LOG_WARN("dirty-region log %s is damaged at offset %zu", what.c_str(), off);
      return std::nullopt;
    }
    out.push_back({r.fid, r.extent});
  }
  if (torn) LOG_INFO("dirty-region log %s ends in a torn batch (ignored)", what.c_str());
  return out;
}

std::optional<std::vector<DirtyLog::Entry>> DirtyLog::load() {
  std::lock_guard slk(sync_mu_);
  std::vector<Entry> all;
  bool damaged = false;
  for (int i = 0; i < 2; i++) {
    auto got = read_file(i);
    if (!got) damaged = true;
    else all.insert(all.end(), got->begin(), got->end());
  }
  std::sort(all.begin(), all.end());
  all.erase(std::unique(all.begin(), all.end()), all.end());
  if (std::find(all.begin(), all.end(), kEverything) != all.end()) damaged = true;
  // A damaged log is replaced by one entry that says "rehash everything", so a second crash
  // before the caller's full rehash is saved still finds that verdict instead of an empty log.
  if (damaged) all.assign(1, kEverything);
  // Consolidate into file 0 so both checkpoint files start from a known state: the union is
  // written and synced before file 1 is emptied, so a crash in between loses nothing.
  std::lock_guard lk(mu_);
  state_.clear();
  pending_.clear();
  active_ = 0;
  reset_file(0);
  std::vector<LogRecord> recs;
  recs.reserve(all.size());
  for (const Entry& e : all) {
    LogRecord r{e.fid, e.extent, 0};
    r.check = record_check(r);
    recs.push_back(r);
    state_.emplace(e, kDurable);
  }
  const std::string what = "dirty-region log " + where_ + "/" + log_file_name(0);
  write_full(fds_[0], recs.data(), recs.size() * sizeof(LogRecord), sizeof(LogHeader), what);
  if (durable_ && fdatasync(fds_[0]) != 0) throw_errno("cannot sync " + what, errno);
  end_ = sizeof(LogHeader) + recs.size() * sizeof(LogRecord);
  reset_file(1);
  loaded_ = true;
  if (damaged) return std::nullopt;
  return all;
}

bool DirtyLog::note(FileId fid, uint64_t offset, uint64_t length) {
  if (length == 0) return false;
  uint64_t first = offset >> kExtentShift;
  uint64_t last = (std::min(length, UINT64_MAX - offset) + offset - 1) >> kExtentShift;
  // A range over more extents than a long truncate (a fallocate or punch of a huge range, from
  // the mount or a peer's record) is logged as the whole file, as note_truncate does: one entry,
  // not one per extent (2^40 of them for a 2^62-byte range: memory exhausted before the kernel
  // is even asked).
  bool need = false;
  std::lock_guard lk(mu_);
  if (last - first >= kMaxTruncateExtents) {
    auto [it, inserted] = state_.try_emplace(Entry{fid, kWholeFile}, kPending);
    if (inserted) pending_.push_back(it->first);
    return it->second != kDurable;
  }
  for (uint64_t x = first; x <= last; x++) {
    auto [it, inserted] = state_.try_emplace(Entry{fid, x}, kPending);
    if (inserted) pending_.push_back(it->first);
    // Pending also means "not yet durable" when another thread noted it first: this writer
    // must wait for that sync too (sync() serializes, so its call waits for the first one).
    if (it->second != kDurable) need = true;
  }
  return need;
}

bool DirtyLog::logged(FileId fid, uint64_t extent) const {
  std::lock_guard lk(mu_);
  return state_.count(Entry{fid, extent}) > 0;
}

bool DirtyLog::note_truncate(FileId fid, uint64_t old_size, uint64_t new_size) {
  if (new_size >= old_size) {
    // Growth reads as zeros and needs no rehash, but logging the old end's extent keeps every
    // size change visible to recovery, which rebuilds a file whose size changed unlogged.
    return note(fid, old_size, 1);
  }
  uint64_t extents = ((old_size - 1) >> kExtentShift) - (new_size >> kExtentShift) + 1;
  if (extents > kMaxTruncateExtents) {
    std::lock_guard lk(mu_);
    auto [it, inserted] = state_.try_emplace(Entry{fid, kWholeFile}, kPending);
    if (inserted) pending_.push_back(it->first);
    return it->second != kDurable;
  }
  return note(fid, new_size, old_size - new_size);
}

void DirtyLog::sync() {
  std::lock_guard slk(sync_mu_);
  std::vector<Entry> batch;
  int active;
  uint64_t end;
  {
    std::lock_guard lk(mu_);
    if (!loaded_) throw Error("dirty-region log " + where_ + ": written before it was loaded");
    batch.swap(pending_);
    active = active_;
    end = end_;
  }
  if (batch.empty()) return;  // someone else's sync already made ours durable
  std::vector<LogRecord> recs;
  recs.reserve(batch.size());
  for (const Entry& e : batch) {
    LogRecord r{e.fid, e.extent, 0};
    r.check = record_check(r);
    recs.push_back(r);
  }
  const std::string what = "dirty-region log " + where_ + "/" + log_file_name(active);
  try {
    write_full(fds_[active], recs.data(), recs.size() * sizeof(LogRecord), end, what);
    if (durable_ && fdatasync(fds_[active]) != 0) throw_errno("cannot sync " + what, errno);
  } catch (...) {
    // Still not durable: put them back so the next sync retries (writers keep waiting).
    std::lock_guard lk(mu_);
    pending_.insert(pending_.end(), batch.begin(), batch.end());
    throw;
  }
  std::lock_guard lk(mu_);
  end_ = end + recs.size() * sizeof(LogRecord);
  syncs_++;
  for (const Entry& e : batch) {
    auto it = state_.find(e);
    if (it != state_.end()) it->second = kDurable;
  }
}

void DirtyLog::begin_checkpoint() {
  sync();  // entries noted before the switch belong to the old file
  std::lock_guard slk(sync_mu_);
  std::lock_guard lk(mu_);
  int next = 1 - active_;
  // The other file was emptied by the previous end_checkpoint (or load); its header is valid.
  struct stat sb;
  if (fstat(fds_[next], &sb) != 0) throw_errno("cannot stat dirty-region log " + where_, errno);
  if (static_cast<uint64_t>(sb.st_size) > sizeof(LogHeader))
    throw Error("dirty-region log " + where_ + ": checkpoint begun before the previous one ended");
  active_ = next;
  end_ = sizeof(LogHeader);
  // Forget everything: the next write to any extent is logged again, in the new file. Pending
  // entries cannot exist here (sync above, and writers are paused by the caller).
  state_.clear();
  pending_.clear();
}

void DirtyLog::end_checkpoint() {
  std::lock_guard slk(sync_mu_);
  int old;
  {
    std::lock_guard lk(mu_);
    old = 1 - active_;
  }
  reset_file(old);
}

void DirtyLog::clear() {
  begin_checkpoint();
  end_checkpoint();
}

size_t DirtyLog::entries() const {
  std::lock_guard lk(mu_);
  return state_.size();
}

uint64_t DirtyLog::syncs() const {
  std::lock_guard lk(mu_);
  return syncs_;
}

// ---------------------------------------------------------------------------------------------
// Recovery

uint64_t recover_file_tree(FileHashTree& tree, int hashes_dirfd, FileId fid, int fd,
                           std::span<const uint64_t> extents) {
  struct stat sb;
  if (fstat(fd, &sb) != 0) throw_errno("cannot stat " + tree.label() + " to recover its hash tree", errno);
  const uint64_t size = static_cast<uint64_t>(sb.st_size);
  bool whole = std::find(extents.begin(), extents.end(), DirtyLog::kWholeFile) != extents.end();
  if (!whole && tree.load(hashes_dirfd, fid)) {
    if (tree.size() != size && extents.empty()) {
      LOG_WARN("%s is %" PRIu64 " bytes but its saved hash tree says %" PRIu64 " and no change was logged; rehashing it",
               tree.label().c_str(), size, tree.size());
      whole = true;
    } else {
      tree.truncate(size);
      for (uint64_t x : extents) {
        uint64_t off = x << DirtyLog::kExtentShift;
        if (off >= size) continue;  // cut off since: truncate() already dropped it
        tree.mark_dirty(off, std::min(DirtyLog::kExtentSize, size - off));
      }
      return tree.refresh(fd);
    }
  }
  return tree.build(fd, size);
}

}  // namespace blockrepl
