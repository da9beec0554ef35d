#include "harness.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <dirent.h>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <cstdio>
#include <fstream>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sstream>
#include <stdexcept>
#include <sys/socket.h>
#include <grp.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

namespace blockrepl::test {

std::string blockrepl_binary() {
  if (const char* b = getenv("BLOCKREPL_BIN")) return b;
  return BLOCKREPL_BIN_PATH;
}

TempDir::TempDir(const std::string& tag) {
  const char* base = getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/var/tmp") + "/blockrepl-" + tag + "-XXXXXX";
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp " + tmpl + ": " + strerror(errno));
  path_ = buf.data();
}

TempDir::~TempDir() {
  // Never recurse into a mount that is still there: unmount anything left below first.
  std::ifstream in("/proc/self/mounts");
  std::string dev, mnt, rest;
  std::vector<std::string> left;
  while (in >> dev >> mnt && std::getline(in, rest))
    if (mnt.rfind(path_ + "/", 0) == 0) left.push_back(mnt);
  for (auto& m : left) run_command({"fusermount3", "-u", "-z", m}, 30);
  // BLOCKREPL_KEEP_TMP=1 keeps a test's directories (logs, backing directories) to look at.
  if (const char* keep = getenv("BLOCKREPL_KEEP_TMP"); keep && *keep && *keep != '0') {
    std::fprintf(stderr, "[ kept ] %s\n", path_.c_str());
    return;
  }
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

SmallExt4::SmallExt4(const std::string& dir, const std::string& size) : dir_(dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  image_ = d + ".ext4.img";
  std::error_code ec;
  std::filesystem::create_directories(dir_, ec);
  for (const std::vector<std::string>& argv :
       {std::vector<std::string>{"truncate", "-s", size, image_},
        std::vector<std::string>{"mkfs.ext4", "-q", "-F", "-E", "nodiscard", image_},
        std::vector<std::string>{"mount", "-o", "loop", image_, dir_}}) {
    CommandResult r = run_command(argv, 60);
    if (r.exit_code != 0) {
      error_ = argv[0] + ": " + r.err;
      return;
    }
  }
  mounted_ = true;
}

SmallExt4::~SmallExt4() {
  if (mounted_ && run_command({"umount", dir_}, 60).exit_code != 0) run_command({"umount", "-l", dir_}, 60);
  unlink(image_.c_str());
}

std::string TempDir::sub(const std::string& name) const {
  std::string p = path_ + "/" + name;
  std::filesystem::create_directories(p);
  return p;
}

CommandResult run_command(const std::vector<std::string>& argv, int timeout_sec) {
  CommandResult r;
  int out[2], err[2];
  if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0) throw std::runtime_error("pipe");
  pid_t pid = fork();
  if (pid == 0) {
    dup2(out[1], 1);
    dup2(err[1], 2);
    int null = open("/dev/null", O_RDONLY);
    dup2(null, 0);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  close(out[1]);
  close(err[1]);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_sec);
  bool out_open = true, err_open = true, timed_out = false;
  while (out_open || err_open) {
    pollfd p[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    int ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count());
    if (ms <= 0) {
      timed_out = true;
      break;
    }
    int n = poll(p, 2, ms);
    if (n < 0 && errno == EINTR) continue;
    char buf[4096];
    for (int i = 0; i < 2; i++) {
      if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t k = read(p[i].fd, buf, sizeof buf);
      if (k <= 0) {
        (i == 0 ? out_open : err_open) = false;
        p[i].fd = -1;
      } else {
        (i == 0 ? r.out : r.err).append(buf, static_cast<size_t>(k));
      }
    }
    if (!out_open) p[0].fd = -1;
  }
  close(out[0]);
  close(err[0]);
  if (timed_out) kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  r.exit_code = timed_out ? -1 : WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

CommandResult run_blockrepl(const std::vector<std::string>& args, int timeout_sec) {
  std::vector<std::string> argv = {blockrepl_binary()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, timeout_sec);
}

Mount::Mount(const std::string& data, const std::string& mnt, const std::vector<std::string>& extra)
    : data_(data), mnt_(mnt) {
  std::vector<std::string> args = {"mount", "--data", data};
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back(mnt);
  CommandResult r = run_blockrepl(args, 120);
  ok_ = r.exit_code == 0 && is_mounted(mnt);
  error_ = r.err;
  EXPECT_TRUE(ok_) << "mount failed (exit " << r.exit_code << "): " << r.err;
}

Mount::~Mount() { unmount(); }

void Mount::unmount() {
  if (!is_mounted(mnt_)) return;
  CommandResult r = run_blockrepl({"umount", mnt_}, 120);
  if (r.exit_code != 0) {
    // Busy (a test left a file open): detach lazily so nothing stays behind.
    run_command({"fusermount3", "-u", "-z", mnt_}, 30);
  }
}

bool is_mounted(const std::string& path) {
  char buf[PATH_MAX];
  std::string p = realpath(path.c_str(), buf) ? buf : path;
  std::ifstream in("/proc/self/mounts");
  std::string dev, mnt, rest;
  while (in >> dev >> mnt && std::getline(in, rest))
    if (mnt == p) return true;
  return false;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write " + path);
  out << data;
}

std::string errname(int e) {
  const char* n = strerrorname_np(e);
  return std::string(n ? n : "E?") + " (" + strerror(e) + ")";
}

[[noreturn]] void fail_sys(const std::string& what) {
  int e = errno;
  throw std::runtime_error(what + " failed: " + errname(e));
}

std::set<std::string> list_dir(const std::string& p) {
  DIR* d = opendir(p.c_str());
  if (!d) fail_sys("opendir(" + p + ")");
  std::set<std::string> names;
  errno = 0;
  while (dirent* e = readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.insert(n);
    errno = 0;
  }
  int e = errno;
  closedir(d);
  if (e) {
    errno = e;
    fail_sys("readdir(" + p + ")");
  }
  return names;
}

int free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

int as_user(uid_t uid, gid_t gid, const std::function<int()>& fn) {
  pid_t pid = fork();
  if (pid == 0) {
    if (setgroups(0, nullptr) != 0 || setresgid(gid, gid, gid) != 0 || setresuid(uid, uid, uid) != 0) _exit(255);
    _exit(fn() & 0xff);
  }
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status) == 255 ? -1 : WEXITSTATUS(status);
}

int open_errno(const std::string& path, int flags) {
  int fd = open(path.c_str(), flags | O_CLOEXEC, 0644);
  if (fd < 0) return errno;
  close(fd);
  return 0;
}

int exec_errno(const std::string& path, const std::string& arg) {
  int null = open("/dev/null", O_WRONLY);
  dup2(null, 1);
  dup2(null, 2);
  char* const argv[] = {const_cast<char*>(path.c_str()), const_cast<char*>(arg.c_str()), nullptr};
  execv(path.c_str(), argv);
  return errno;
}

}  // namespace blockrepl::test
