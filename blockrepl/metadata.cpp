#include "blockrepl/metadata.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <map>
#include <set>
#include <random>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/fsutil.h"

namespace blockrepl {

namespace {
constexpr const char kIdentityFile[] = "identity";

// A whole decimal number, nothing else (no sign, no trailing characters), within `max`.
uint64_t parse_number(const std::string& s, uint64_t max) {
  if (s.empty() || s.size() > 20) throw std::invalid_argument(s);
  for (char c : s)
    if (c < '0' || c > '9') throw std::invalid_argument(s);
  uint64_t v = std::stoull(s);
  if (v > max) throw std::out_of_range(s);
  return v;
}

std::string read_small_file(int dirfd, const char* name, const std::string& where, bool* missing) {
  int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) {
      *missing = true;
      return {};
    }
    throw_errno("cannot open " + where, errno);
  }
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
      int e = errno;
      close(fd);
      throw_errno("cannot read " + where, e);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  *missing = false;
  return out;
}
}  // namespace

std::string random_hex_id(size_t bytes) {
  std::random_device rd;
  std::string s;
  static const char* hex = "0123456789abcdef";
  for (size_t i = 0; i < bytes; i++) {
    unsigned v = rd() & 0xff;
    s += hex[v >> 4];
    s += hex[v & 15];
  }
  return s;
}

int open_metadata_dir(int data_fd, const std::string& data_path) {
  if (mkdirat(data_fd, kMetadataDirName, 0700) != 0 && errno != EEXIST)
    throw_errno("cannot create metadata folder " + data_path + "/" + kMetadataDirName, errno);
  int fd = openat(data_fd, kMetadataDirName, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) throw_errno("cannot open metadata folder " + data_path + "/" + kMetadataDirName, errno);
  return fd;
}

namespace {

Identity parse_identity(const std::string& text, const std::string& data_path) {
  Identity id;
  std::istringstream in(text);
  std::string line;
  std::map<std::string, std::string> kv;
  while (std::getline(in, line)) {
    auto eq = line.find('=');
    if (eq == std::string::npos) continue;
    kv[line.substr(0, eq)] = line.substr(eq + 1);
  }
  // The keys are the format's version (blockrepl/README.md): a key this binary does not know
  // was written by a newer one, and rewriting the file without it would lose it.
  static const std::set<std::string> kKnownKeys = {"node_id", "cluster_id", "block_size", "lsn_reserved", "role", "lineage"};
  for (const auto& [key, value] : kv)
    if (!kKnownKeys.count(key))
      throw Error(data_path + "/" + kMetadataDirName + "/identity has the key '" + key +
                  "', which this version of blockrepl does not know (written by a newer one?)");
  if (kv["node_id"].empty())
    throw Error(data_path + "/" + kMetadataDirName + "/identity is damaged (no node_id)");
  id.node_id = kv["node_id"];
  id.cluster_id = kv["cluster_id"];
  id.role = kv["role"];
  try {
    std::string lin = kv["lineage"];
    size_t start = 0;
    while (start < lin.size()) {
      size_t comma = lin.find(',', start);
      if (comma == std::string::npos) comma = lin.size();
      std::string item = lin.substr(start, comma - start);
      size_t at = item.find('@');
      if (at == std::string::npos) throw std::invalid_argument("lineage");
      id.lineage.push_back({item.substr(0, at), parse_number(item.substr(at + 1), UINT64_MAX)});
      start = comma + 1;
    }
    if (!kv["block_size"].empty()) id.block_size = static_cast<uint32_t>(parse_number(kv["block_size"], 1u << 30));
    if (!kv["lsn_reserved"].empty()) id.lsn_reserved = parse_number(kv["lsn_reserved"], UINT64_MAX);
  } catch (const std::exception&) {
    throw Error(data_path + "/" + kMetadataDirName + "/identity is damaged (bad number)");
  }
  return id;
}

}  // namespace

Identity load_or_create_identity(int meta_fd, const std::string& data_path) {
  bool missing = false;
  const std::string where = data_path + "/" + kMetadataDirName + "/" + kIdentityFile;
  std::string text = read_small_file(meta_fd, kIdentityFile, where, &missing);
  if (missing) {
    Identity id;
    id.node_id = random_hex_id(8);
    store_identity(meta_fd, id, data_path);
    return id;
  }
  return parse_identity(text, data_path);
}

std::optional<Identity> read_identity(const std::string& data_path) {
  const std::string meta_path = data_path + "/" + kMetadataDirName;
  int meta_fd = open(meta_path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (meta_fd < 0) {
    if (errno == ENOENT) return std::nullopt;
    throw_errno("cannot open metadata folder " + meta_path, errno);
  }
  bool missing = false;
  std::string text;
  try {
    text = read_small_file(meta_fd, kIdentityFile, meta_path + "/" + kIdentityFile, &missing);
  } catch (...) {
    close(meta_fd);
    throw;
  }
  close(meta_fd);
  if (missing) return std::nullopt;
  return parse_identity(text, data_path);
}

void store_identity(int meta_fd, const Identity& id, const std::string& data_path) {
  std::ostringstream out;
  out << "node_id=" << id.node_id << "\n"
      << "cluster_id=" << id.cluster_id << "\n"
      << "block_size=" << id.block_size << "\n"
      << "lsn_reserved=" << id.lsn_reserved << "\n"
      << "role=" << id.role << "\n"
      << "lineage=";
  for (size_t i = 0; i < id.lineage.size(); i++)
    out << (i ? "," : "") << id.lineage[i].id << "@" << id.lineage[i].first_lsn;
  out << "\n";
  const std::string text = out.str();
  const std::string where = data_path + "/" + kMetadataDirName + "/identity";
  // Always durable: a node that forgot its identity (or its LSN reservation) after a crash
  // would reuse LSNs or look like a different node.
  if (int err = write_file_atomically(meta_fd, kIdentityFile, text, /*durable=*/true))
    throw_errno("cannot write " + where + " durably", err);
}

}  // namespace blockrepl
