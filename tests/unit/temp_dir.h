// A fresh directory under /var/tmp (a real disk with xattrs), removed with its contents.
#pragma once
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>

namespace blockrepl {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/var/tmp/blockrepl-unit-XXXXXX";
    char* p = mkdtemp(tmpl);
    if (!p) throw std::runtime_error(std::string("mkdtemp: ") + strerror(errno));
    path = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

}  // namespace blockrepl
