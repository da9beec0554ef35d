// The metadata folder <data>/.blockrepl: node identity and, later, the journal and hash trees.
// It is hidden from the mount and never replicated.
#pragma once
#include <cstdint>
#include <string>

namespace blockrepl {

inline constexpr const char kMetadataDirName[] = ".blockrepl";

struct Identity {
  std::string node_id;     // random, made when this data directory was first mounted
  std::string cluster_id;  // made by the first master; a slave takes its master's
  uint32_t block_size = 4096;
  uint64_t lsn_reserved = 0;  // LSNs below this may have been used (see LsnAllocator)
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
