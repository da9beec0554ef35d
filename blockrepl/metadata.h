// The metadata folder <data>/.blockrepl: node identity and, later, the journal and hash trees.
// It is hidden from the mount and never replicated.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace blockrepl {

inline constexpr const char kMetadataDirName[] = ".blockrepl";

// One period of a volume's history: records from first_lsn on were written under this id. A
// promotion starts a new one; two nodes share history up to where their lineages agree.
struct LineageEntry {
  std::string id;
  uint64_t first_lsn = 0;
  bool operator==(const LineageEntry&) const = default;
};

struct Identity {
  std::string node_id;     // random, made when this data directory was first mounted
  std::string cluster_id;  // made by the first master; a slave takes its master's
  uint32_t block_size = 4096;
  uint64_t lsn_reserved = 0;  // LSNs below this may have been used (see Node)
  std::vector<LineageEntry> lineage;  // oldest first; empty until the node first acts as master or attaches
  std::string role;  // "master" or "slave": what this directory last was
};

// Opens (creating on first use) <data>/.blockrepl and returns its fd (O_PATH|O_DIRECTORY).
// Throws Error with context on failure.
int open_metadata_dir(int data_fd, const std::string& data_path);

// Reads <meta>/identity; creates it with fresh ids if missing. Throws Error on a damaged file.
Identity load_or_create_identity(int meta_fd, const std::string& data_path);
// Writes <meta>/identity atomically and durably (temp file, fsync, rename, fsync dir).
void store_identity(int meta_fd, const Identity& id, const std::string& data_path);

std::string random_hex_id(size_t bytes);

}  // namespace blockrepl
