// Per-file block hash trees for the Merkle re-attach (DESIGN.md section 3, path 2), and the
// dirty-region log that lets them survive a crash without a full rescan.
//
// A FileHashTree holds one hash per block of a file (the leaves) and, above them, levels of
// nodes that each hash kHashFanOut children. Two nodes compare roots, then only the children of
// nodes that differ, level by level: m changed blocks of an n-block file cost about
// m * kHashFanOut * log_F(n) hashes and ceil(log_F(n)) round trips, never a scan of either side.
//
// The tree is kept current as the file changes: the write path only records which blocks
// changed (mark_dirty, truncate: no I/O, no hashing); refresh() later rereads and rehashes just
// those blocks and the nodes above them. Leaves are saved in <metadata>/hashes/<fid>.leaves;
// internal levels are recomputed on load (1/63 of the leaf bytes, cheap).
//
// Sparse storage: a file costs memory for the data it holds, not its apparent size. Every level
// is kept as chunks of kHashFanOut nodes (the children of one parent), and a chunk is stored
// only while its parent's subtree holds a non-zero block. The hash of an all-zero subtree is a
// constant per level (the "zero hash"; the rightmost node of a level, which may have fewer
// children, has its own), so a hole or a range of written zeros is one absent chunk and any node
// can still be answered. A dense file costs 1/64 more than a flat array (one map node per
// chunk); a sparse one about one chunk per level per scattered non-zero block.
//
// DirtyLog is the crash story, after DRBD's activity log: before the first write into a 4 MiB
// extent since the last clean point, (fid, extent) is made durable in a small log. After an
// unclean stop only the logged extents are rehashed (recover_file_tree).
//
// FileHashTree does no locking (one owner, or the caller's mutex around it); DirtyLog is
// thread-safe because every FUSE worker calls note() on its write path.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "blockrepl/record.h"

namespace blockrepl {

// Children per internal node. Every node that differs costs one answer of F hashes (F * 16
// bytes) and the descent takes ceil(log_F n) round trips, so F trades bytes for round trips.
// For 100 scattered changes in 1 GiB (n = 2^18 blocks of 4 KiB), next to 400 KiB of block data:
//   F = 16: 5 round trips, ~63 KiB of hashes;   F = 64: 3 round trips, ~150 KiB;
//   F = 256: 3 round trips, ~400 KiB (the upper levels no longer save a round trip).
// 64 keeps the hash bytes well under the data bytes and the whole repair under the 1 MiB of
// DESIGN.md section 6, with 3 round trips up to 1 GiB, 4 up to 64 GiB and 5 up to 4 TiB per
// file (a slow link pays per round trip, and each file with changes pays them anew). It also
// keeps internal levels small (1/63 of the leaves) and a refresh cheap (1 KiB per level per
// changed leaf). Both peers must agree: F is part of the tree's definition, like the hash.
inline constexpr unsigned kHashFanOut = 64;

// An XXH3-128 digest. Serialized (on disk, and wherever bytes are hashed) as lo then hi, each
// little-endian; that is also its in-memory layout on the little-endian hosts we build for.
struct Hash128 {
  uint64_t lo = 0;
  uint64_t hi = 0;
  bool operator==(const Hash128&) const = default;
  std::string hex() const;  // 32 hex digits, hi first (as XXH128 prints)
};
static_assert(sizeof(Hash128) == 16, "Hash128 is hashed and saved as 16 raw bytes");

// What node() answers for a node a tree does not have (beyond its end). Differs from every
// real hash except with probability 2^-128, the same odds we accept for block collisions.
inline constexpr Hash128 kAbsentNode{};

// XXH3-128 of raw bytes.
Hash128 hash_bytes(const void* data, size_t len);
// The hash of one block whose first `len` bytes are `data` (len <= block_size), the rest zero:
// the last, partial block of a file hashes as if zero-padded, so a hole, written zeros and the
// bytes past EOF in the last block all hash the same (extending a file never rehashes it).
Hash128 hash_block(const void* data, size_t len, uint32_t block_size);
// hash_block of a block of zeros (cached per block size).
Hash128 zero_block_hash(uint32_t block_size);

// How many hashes a diff compared and how many levels it had to fetch after the roots: the
// round trips of the network protocol.
struct DiffStats {
  uint64_t hashes_compared = 0;
  unsigned round_trips = 0;
};

class FileHashTree {
 public:
  // block_size: a power of two in [512, 16 MiB]. label names the file in errors and logs
  // (e.g. "fid 00ab.. (/srv/db/base/1234)").
  explicit FileHashTree(uint32_t block_size, std::string label = {});

  uint32_t block_size() const { return block_size_; }
  uint64_t size() const { return size_; }                    // the file size the tree describes
  uint64_t block_count() const;  // ceil(size / block_size)
  const std::string& label() const { return label_; }
  // Bytes of hashes held in memory (stored chunks, all levels): what the tree costs, which for a
  // sparse file follows its data, not its size.
  uint64_t stored_bytes() const;

  // Full (re)hash of `size` bytes of fd. Skips holes (SEEK_DATA/SEEK_HOLE) without reading
  // them, so a sparse file costs what its data costs. Moves fd's file offset. Returns the
  // number of blocks read. Throws Error on I/O errors.
  uint64_t build(int fd, uint64_t size);

  // Bytes [offset, offset+length) changed. A range past the end extends the file as pwrite
  // does (the gap reads as zeros). Cheap: no I/O, no hashing; O(log r) in the r dirty ranges.
  void mark_dirty(uint64_t offset, uint64_t length);
  // `data` was written at `offset` (the write that mark_dirty would be told of), and the caller
  // still holds it: the blocks it covers whole are hashed from it now, so they never have to be
  // read back from the file; a block it covers in part is marked dirty. Writes to one file must
  // reach the file and this call in the same order (the Store applies them one at a time).
  void wrote(uint64_t offset, std::string_view data);
  // The file is now new_size bytes. Blocks that appear are holes (zero hash, nothing to read);
  // only a shrink that cuts a block in the middle leaves that block to rehash.
  void truncate(uint64_t new_size);

  // Whether refresh() has work: blocks to rehash or internal nodes to recompute.
  bool dirty() const { return !dirty_.empty() || !stale_.empty() || reshape_; }
  uint64_t dirty_blocks() const;
  // Rereads (pread) and rehashes the dirty blocks, then recomputes the nodes above every
  // changed leaf. fd may be -1 when no block needs reading (after truncate or load alone).
  // Returns the number of blocks read. On error throws Error and keeps what is still dirty.
  uint64_t refresh(int fd);

  // Queries for the diff protocol; the tree must be clean (refresh() first), else Error.
  // Level 0 holds the leaves; level levels()-1 holds a single node (none for an empty file).
  unsigned levels() const;
  uint64_t level_size(unsigned level) const;
  // kAbsentNode beyond the end of the level (or above the top).
  Hash128 node(unsigned level, uint64_t index) const;
  // The nodes [first, first+count) of `level`, clipped to its end.
  std::vector<Hash128> nodes(unsigned level, uint64_t first, uint64_t count) const;
  // Hash of the top node, the file size and the block size: equal roots mean equal files
  // (content and size). Two files equal in every block but not in size differ only here.
  Hash128 root() const;

  // The shape of any file's tree, so a peer can be reasoned about from its size alone.
  static unsigned levels_for(uint64_t file_size, uint32_t block_size);
  static uint64_t level_size_for(uint64_t file_size, uint32_t block_size, unsigned level);

  // One step of the diff protocol. `indices` are nodes at `level` (ascending), `ours` and
  // `theirs` their hashes on each side (kAbsentNode where a side has none). Returns the
  // children (indices at level-1) of every node that differs, clipped to child_level_size
  // (the larger of the two sides' sizes at level-1), ascending; at level 0 returns the
  // differing block indices themselves.
  static std::vector<uint64_t> diff_children(unsigned level, std::span<const uint64_t> indices,
                                             std::span<const Hash128> ours,
                                             std::span<const Hash128> theirs,
                                             uint64_t child_level_size);
  // The same against this tree, for a peer whose file is their_size bytes.
  std::vector<uint64_t> differing_children(unsigned level, std::span<const uint64_t> indices,
                                           std::span<const Hash128> theirs,
                                           uint64_t their_size) const;

  // Writes the leaves to <dirfd>/<fid as 16 hex digits>.leaves atomically (temp file, rename;
  // with durable, fsync of the file before and of the directory after the rename). The tree
  // must be clean. Throws Error on failure (the previous saved file is then left intact).
  void save(int dirfd, FileId fid, bool durable = true) const;
  // Replaces this tree with the saved one. False (tree unchanged) if the file is missing,
  // unreadable, damaged (checksum, size, header) or saved with another block size: the
  // caller must then build() from the data.
  bool load(int dirfd, FileId fid);
  // Deletes a saved tree (the file was unlinked for good). Missing is fine.
  static void remove_saved(int dirfd, FileId fid);
  static std::string saved_name(FileId fid);

 private:
  using Ranges = std::map<uint64_t, uint64_t>;  // start -> end, disjoint, not adjacent
  static void add_range(Ranges& r, uint64_t start, uint64_t end);
  static void clip_ranges(Ranges& r, uint64_t end);
  static void remove_range(Ranges& r, uint64_t start, uint64_t end);
  void require_clean(const char* what) const;
  void hash_blocks(int fd, uint64_t first, uint64_t end, std::vector<char>& buf);
  void recompute_internal();

  // One level's stored nodes: chunk c holds nodes [c*F, c*F+F), the children of node c one
  // level up. An absent chunk means every node in it is the zero hash of its position.
  // Invariant: in a stored chunk, positions at or past the level's size hold full_zero(level),
  // so growing a level never has to visit them.
  using Chunk = std::array<Hash128, kHashFanOut>;
  struct Level {
    uint64_t size = 0;  // nodes at this level
    std::map<uint64_t, Chunk> chunks;
  };
  Hash128 full_zero(unsigned level) const;  // a node over F^level zero blocks
  Hash128 zero_node(unsigned level, uint64_t index) const;  // what an absent node hashes as
  Hash128 get(unsigned level, uint64_t index) const;
  void put(unsigned level, uint64_t index, const Hash128& h);
  Chunk* chunk_for(unsigned level, uint64_t index);  // materialized with zero hashes
  Hash128 compute_node(unsigned level, uint64_t index) const;  // from its children
  void reshape_levels(uint64_t blocks);  // level count and sizes; trims what was cut off
  void trim_level(unsigned level, uint64_t new_size);
  void refresh_edge_zeros();
  void drop_zero_top();
  void load_leaf_run(uint64_t first, const Hash128* leaves, uint64_t count);
  bool load_v1(int fd, uint64_t body_bytes, uint64_t leaf_count, uint64_t seed, const std::string& name);
  bool load_v2(int fd, uint64_t body_bytes, uint64_t leaf_count, uint64_t seed, const std::string& name);

  uint32_t block_size_;
  unsigned shift_;  // log2(block_size)
  std::string label_;
  Hash128 zero_hash_;
  const std::vector<Hash128>* full_zeros_;  // per level, shared by all trees of this block size
  uint64_t size_ = 0;
  // levels_[0]: leaves; node i of levels_[k+1] hashes nodes [i*F, min((i+1)*F, size)) of
  // levels_[k]. Internal levels are only consistent with the leaves when !dirty().
  std::vector<Level> levels_;
  // edge_zeros_[k]: the hash of the last node of level k if the whole file were zeros (it may
  // have fewer than F children). Valid for edge_blocks_ blocks; recomputed on refresh.
  std::vector<Hash128> edge_zeros_;
  uint64_t edge_blocks_ = UINT64_MAX;
  Ranges dirty_;  // leaf ranges to reread and rehash
  Ranges stale_;  // leaf ranges whose ancestors must be recomputed (resize, load, build)
  bool reshape_ = false;  // the block count changed: levels to resize (even with nothing stale)
};

// The differing block indices of two trees of the same block size (the reference for the
// network protocol: it descends exactly as the peers do). Both must be clean. Blocks that
// exist on one side only count as differing; a pure size difference within the last block
// yields no blocks (compare sizes for that).
std::vector<uint64_t> diff(const FileHashTree& a, const FileHashTree& b, DiffStats* stats = nullptr);

// <meta>/hashes, created on first use; returns an fd (O_RDONLY|O_DIRECTORY) for save/load.
inline constexpr const char kHashesDirName[] = "hashes";
int open_hashes_dir(int meta_fd, const std::string& data_path);

// The persistent record of which file regions may differ from their saved hash trees.
//
// Write path (every change to file data or size, before the change reaches the backing file):
//   if (log.note(fid, off, len)) log.sync();   // only the first write to an extent syncs
//   pwrite(...); tree.mark_dirty(off, len);
// note() of an extent already durably logged is one hash-set lookup, no I/O. A batch of
// changes may note() them all and sync() once. Truncates use note_truncate().
//
// Clean point (bounds the log and the recovery work), with writers excluded only briefly:
//   1. writers paused (e.g. an exclusive lock that writers hold shared across note..mark_dirty)
//      -> begin_checkpoint() -> writers resume; new writes are logged afresh in the other file.
//   2. make the data durable (syncfs or fsync of the changed files), refresh() and save() the
//      trees changed before step 1.
//   3. end_checkpoint(): forget the entries logged before step 1.
// The order matters: a saved hash must never describe data that is not yet durable, and an
// entry may only go once a durable hash covers its extent. clear() is 1+3 for a quiet volume.
//
// Recovery (mount after an unclean stop): load(), then recover_file_tree() for each file
// named in it (and load() + trust the saved tree for the others), save them, clear().
class DirtyLog {
 public:
  static constexpr unsigned kExtentShift = 22;  // 4 MiB extents, as DRBD's activity log
  static constexpr uint64_t kExtentSize = uint64_t{1} << kExtentShift;
  // Extent value meaning "rehash the whole file" (a shrink by more than kMaxTruncateExtents).
  static constexpr uint64_t kWholeFile = UINT64_MAX;
  static constexpr uint64_t kMaxTruncateExtents = 64;

  struct Entry {
    FileId fid = kInvalidFileId;
    uint64_t extent = 0;  // or kWholeFile
    bool operator==(const Entry&) const = default;
    auto operator<=>(const Entry&) const = default;
  };
  // Kept in the log after load() found it damaged: "rehash every file" (fid 0 is never used).
  static const Entry kEverything;

  // Opens (creating) <meta_fd>/dirty-log.0 and .1. where names the folder in errors. With
  // durable false nothing is fsync'ed (tests). Call load() before the first note().
  DirtyLog(int meta_fd, std::string where, bool durable = true);
  ~DirtyLog();
  DirtyLog(const DirtyLog&) = delete;
  DirtyLog& operator=(const DirtyLog&) = delete;

  // The extents logged since the last clean point, sorted; nullopt if the log is damaged
  // beyond a torn last batch: then every file must be rehashed, and load() keeps answering
  // nullopt (the verdict is made durable) until clear() after that full rehash. Keeps the
  // entries as logged, so writes to them need no sync until the next clean point.
  std::optional<std::vector<Entry>> load();

  // Records that [offset, offset+length) of fid is about to change (a range over more than
  // kMaxTruncateExtents extents: the whole file). Returns true if an extent is not yet durably
  // logged: the caller must sync() before writing.
  bool note(FileId fid, uint64_t offset, uint64_t length);
  // Whether an extent of fid was noted since the last clean point.
  bool logged(FileId fid, uint64_t extent) const;
  // The same for a size change: a shrink notes the cut extents (the whole file past
  // kMaxTruncateExtents), a growth the extent where the old end was.
  bool note_truncate(FileId fid, uint64_t old_size, uint64_t new_size);
  // Makes every noted extent durable (one write and one fdatasync for the batch). Throws
  // Error on failure (the entries stay pending) or if load() was never called.
  void sync();

  void begin_checkpoint();
  void end_checkpoint();
  void clear();  // begin_checkpoint(); end_checkpoint();

  size_t entries() const;  // extents noted since the last clean point
  uint64_t syncs() const;  // fdatasync calls so far (for tests and status)

 private:
  struct EntryHash {
    size_t operator()(const Entry& e) const;
  };
  enum State : uint8_t { kPending, kDurable };
  void open_file(int i);
  void reset_file(int i);  // to just a header, durably
  std::optional<std::vector<Entry>> read_file(int i);

  int meta_fd_;
  std::string where_;
  bool durable_;
  int fds_[2] = {-1, -1};
  mutable std::mutex sync_mu_;  // serializes sync, checkpoints, load; taken before mu_
  mutable std::mutex mu_;       // guards the fields below
  int active_ = 0;              // the file new entries go to
  uint64_t end_ = 0;            // append offset in the active file
  std::unordered_map<Entry, State, EntryHash> state_;
  std::vector<Entry> pending_;  // noted, not yet written
  uint64_t syncs_ = 0;
  bool loaded_ = false;  // appends before load() would overwrite entries not yet read
};

// Brings `tree` for file fid (open as fd) up to date after an unclean stop: loads the saved
// leaves and rehashes only the logged extents, or builds the whole file when the log says so,
// the saved tree is missing or damaged, or its size disagrees with the file while the log
// names no extent of it. Returns the number of blocks read.
uint64_t recover_file_tree(FileHashTree& tree, int hashes_dirfd, FileId fid, int fd,
                           std::span<const uint64_t> extents);

}  // namespace blockrepl
