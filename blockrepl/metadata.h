// The metadata folder <data>/.blockrepl: node identity and, later, the journal and hash trees.
// It is hidden from the mount and never replicated.
#pragma once
#include <dirent.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace blockrepl {

inline constexpr const char kMetadataDirName[] = ".blockrepl";
inline constexpr const char kLostFoundName[] = "lost+found";

// Entries at the root of a data directory that are not part of the volume: the metadata folder,
// and the lost+found directory of a file system whose root is the data directory (mkfs makes it
// and fsck needs it there). Tree walks skip them on master and slave alike, so a replica on a
// fresh file system compares equal to a master without one, and no wipe or diff removes it.
// `d_type` as readdir gives it; DT_UNKNOWN counts as a directory.
inline bool is_hidden_root_entry(const char* name, unsigned char d_type) {
  if (!strcmp(name, kMetadataDirName)) return true;
  return !strcmp(name, kLostFoundName) && (d_type == DT_DIR || d_type == DT_UNKNOWN);
}

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
// Reads <data>/.blockrepl/identity without creating anything: nullopt if there is none.
// Throws Error on a damaged file.
std::optional<Identity> read_identity(const std::string& data_path);
// Writes <meta>/identity atomically and durably (temp file, fsync, rename, fsync dir).
void store_identity(int meta_fd, const Identity& id, const std::string& data_path);

std::string random_hex_id(size_t bytes);

}  // namespace blockrepl
