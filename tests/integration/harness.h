// Shared helpers for integration tests: temporary directories, running the blockrepl command,
// and RAII mounts that are always unmounted, also when a test fails.
#pragma once
#include <set>
#include <string>
#include <vector>

namespace blockrepl::test {

// Path of the blockrepl binary under test ($BLOCKREPL_BIN overrides the build's).
std::string blockrepl_binary();

// A fresh directory under $TMPDIR (default /var/tmp, a real disk) removed with everything in it.
class TempDir {
 public:
  explicit TempDir(const std::string& tag = "t");
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string sub(const std::string& name) const;  // creates path/name as a directory
 private:
  std::string path_;
};

struct CommandResult {
  int exit_code = -1;   // -1 if killed by the timeout
  std::string out, err;
};
// Runs argv (no shell) with a timeout in seconds, capturing stdout and stderr.
CommandResult run_command(const std::vector<std::string>& argv, int timeout_sec = 60);
// Runs `blockrepl args...`.
CommandResult run_blockrepl(const std::vector<std::string>& args, int timeout_sec = 60);

// Mounts with `blockrepl mount --data DATA [extra...] MNT` (daemon mode); the destructor
// unmounts (lazily if busy) and waits for the daemon to exit. Fails the test if mounting fails.
class Mount {
 public:
  Mount(const std::string& data, const std::string& mnt, const std::vector<std::string>& extra = {});
  ~Mount();
  Mount(const Mount&) = delete;
  Mount& operator=(const Mount&) = delete;
  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }
  const std::string& path() const { return mnt_; }
  std::string file(const std::string& rel) const { return mnt_ + "/" + rel; }
  void unmount();

 private:
  std::string data_, mnt_;
  bool ok_ = false;
  std::string error_;
};

bool is_mounted(const std::string& path);
std::string read_file(const std::string& path);         // whole file; throws on error
void write_file(const std::string& path, const std::string& data);
// "ENOENT (No such file or directory)"
std::string errname(int e);
// Throws std::runtime_error "<what> failed: <errname(errno)>".
[[noreturn]] void fail_sys(const std::string& what);
// The names in a directory, without "." and ".."; throws on error.
std::set<std::string> list_dir(const std::string& path);

// A loopback TCP port that is free now, distinct per process and call.
int free_port();

}  // namespace blockrepl::test
