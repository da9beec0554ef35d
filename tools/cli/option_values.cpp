#include "tools/cli/option_values.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>

#include "blockrepl/batch_codec.h"

namespace blockrepl::cli {

namespace {

// Runs one of CLI11's unit converters on `value`; false if it refuses it.
bool convert_units(CLI::Validator& units, std::string& value) {
  try {
    return units(value).empty();
  } catch (const CLI::ValidationError&) {
    return false;
  }
}

bool whole_number(const std::string& s, uint64_t* out) {
  const char* end = s.data() + s.size();
  auto [p, ec] = std::from_chars(s.data(), end, *out);
  return ec == std::errc() && p == end && !s.empty();
}

}  // namespace

CLI::Validator positive_duration_ms() {
  CLI::AsNumberWithUnit units(std::map<std::string, double>{{"ms", 1}, {"s", 1000}, {"m", 60000}, {"min", 60000}},
                              CLI::AsNumberWithUnit::CASE_SENSITIVE, "UNIT");
  return CLI::Validator(
      [units](std::string& value) mutable -> std::string {
        const std::string given = value;
        const std::string refusal = "must be a positive duration such as 5s or 500ms (got '" + given + "')";
        // A bare number is seconds.
        std::string v = value;
        if (!v.empty() && (std::isdigit(static_cast<unsigned char>(v.back())) || v.back() == '.')) v += "s";
        if (!convert_units(units, v)) return refusal;
        double ms = 0;
        if (!CLI::detail::lexical_cast(v, ms) || !std::isfinite(ms) || ms < 1 || ms > 1e15) return refusal;
        value = std::to_string(static_cast<int64_t>(ms));
        return {};
      },
      "DURATION");
}

CLI::Validator byte_size() {
  CLI::AsSizeValue units(false);
  return CLI::Validator(
      [units](std::string& value) mutable -> std::string {
        const std::string given = value;
        // CLI11's conversion (strtoull) takes "-5" for a huge number and saturates on overflow:
        // the result must read back as a whole number of bytes that fits.
        uint64_t bytes = 0;
        if (given.find('-') != std::string::npos || !convert_units(units, value) || !whole_number(value, &bytes))
          return "must be a size such as 256M or 0 (got '" + given + "')";
        return {};
      },
      "SIZE");
}

CLI::Validator hash_block_size() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        uint64_t n = 0;
        if (!whole_number(value, &n) || n < 512 || n > (1u << 20) || (n & (n - 1)))
          return "must be a power of two from 512 to 1048576 (got " + value + ")";
        return {};
      },
      "BYTES");
}

CLI::Validator compression() {
  return CLI::Validator(
      [](std::string& value) -> std::string {
        std::string why;
        return parse_compression(value, &why) ? std::string() : why;
      },
      "zstd[:LEVEL]");
}

}  // namespace blockrepl::cli
