// CLI11 validators for the values of `mount`'s options: each turns what the user typed into the
// number the option holds, or refuses it with one sentence that names the bad value (CLI11
// puts the option's name in front).
#pragma once
#include <CLI/CLI.hpp>

namespace blockrepl::cli {

// "5s", "500ms", "1.5m" / "1.5min", "2" (seconds) -> whole milliseconds, more than 0.
CLI::Validator positive_duration_ms();
// "256M", "1G", "64KiB", "4096", "0" -> bytes (K, M, G... are powers of 1024, any case).
CLI::Validator byte_size();
// A power of two from 512 to 1048576.
CLI::Validator hash_block_size();
// zstd, zstd:LEVEL (1..19) or off (blockrepl/batch_codec.h: parse_compression).
CLI::Validator compression();

}  // namespace blockrepl::cli
