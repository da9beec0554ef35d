// Shared helpers for integration tests: temporary directories, running the blockrepl command,
// and RAII mounts that are always unmounted, also when a test fails.
#pragma once
#include <sys/types.h>

#include <functional>
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

// A small ext4 file system on a loop device, mounted over the directory `dir` (created if
// missing) for the length of a test: full-disk cases and freshly made file systems (with their
// lost+found). The image lives beside `dir`; the destructor unmounts (lazily if still busy),
// which detaches the loop device, and deletes the image, also when the test failed. Unmount
// any FUSE mount that uses it first (declare it before the Mount or Cluster that does).
class SmallExt4 {
 public:
  SmallExt4(const std::string& dir, const std::string& size);  // size as for truncate: "96M"
  ~SmallExt4();
  SmallExt4(const SmallExt4&) = delete;
  SmallExt4& operator=(const SmallExt4&) = delete;
  bool ok() const { return mounted_; }
  const std::string& error() const { return error_; }
  const std::string& path() const { return dir_; }

 private:
  std::string dir_, image_, error_;
  bool mounted_ = false;
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

// What an unprivileged local user can do (security tests). as_user runs fn in a child process as
// uid:gid without supplementary groups and returns fn's result (an errno, or 0), or -1 when the
// child could not drop its privileges.
int as_user(uid_t uid, gid_t gid, const std::function<int()>& fn);
// open(path, flags)'s errno (0: it opened; the descriptor is closed at once).
int open_errno(const std::string& path, int flags);
// execv(path, {path, arg})'s errno, for a child made by as_user (when the program runs, it
// replaces the child and exits with its own status). Its output goes to /dev/null.
int exec_errno(const std::string& path, const std::string& arg);

}  // namespace blockrepl::test
