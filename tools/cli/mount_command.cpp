#include "tools/cli/mount_command.h"

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <memory>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include "blockrepl/error.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"
#include "blockrepl/node.h"
#include "fs/filesystem.h"
#include "tools/cli/daemon.h"
#include "tools/cli/mount_checks.h"

namespace blockrepl::cli {

namespace {

constexpr const char kPidFile[] = "daemon.pid";

// One daemon per data directory: an exclusive lock held for the daemon's life.
int lock_data_dir(const std::string& data_abs) {
  std::string meta = data_abs + "/" + kMetadataDirName;
  if (mkdir(meta.c_str(), 0700) != 0 && errno != EEXIST) throw_errno("cannot create " + meta, errno);
  std::string lock_path = meta + "/lock";
  int fd = open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd < 0) throw_errno("cannot open " + lock_path, errno);
  if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int e = errno;
    close(fd);
    if (e == EWOULDBLOCK) {
      std::string pid;
      if (FILE* f = fopen((meta + "/" + kPidFile).c_str(), "r")) {
        char buf[32] = {0};
        if (fgets(buf, sizeof buf, f)) pid = buf;
        fclose(f);
        while (!pid.empty() && (pid.back() == '\n')) pid.pop_back();
      }
      throw Error("data directory " + data_abs + " is already in use by another blockrepl daemon" +
                  (pid.empty() ? "" : " (pid " + pid + ")"));
    }
    throw_errno("cannot lock " + lock_path, e);
  }
  return fd;
}

void write_pid_file(const std::string& data_abs) {
  std::string path = data_abs + "/" + kMetadataDirName + "/" + kPidFile;
  if (FILE* f = fopen(path.c_str(), "w")) {
    fprintf(f, "%d\n", getpid());
    fclose(f);
  }
}

void raise_fd_limit() {
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

}  // namespace

int run_mount(const MountOptions& opts) {
  set_log_level(opts.verbose >= 2 ? LogLevel::debug : opts.verbose == 1 ? LogLevel::info : LogLevel::warn);
  std::string data_abs, mnt_abs;
  if (auto err = check_mount_paths(opts.data, opts.mountpoint, &data_abs, &mnt_abs)) {
    fprintf(stderr, "blockrepl: %s\n", err->c_str());
    return 1;
  }

  Readiness readiness;
  readiness.start(opts.foreground);
  // From here on we are the daemon (or the foreground process).
  umask(0);  // modes come from the application (the kernel already applied its umask)
  raise_fd_limit();
  int lock_fd = -1;
  std::unique_ptr<Node> node;
  std::unique_ptr<fs::Filesystem> filesystem;
  try {
    lock_fd = lock_data_dir(data_abs);
    node = std::make_unique<Node>(data_abs);
    fs::MountConfig cfg;
    cfg.mountpoint = mnt_abs;
    cfg.debug = opts.fuse_debug;
    filesystem = std::make_unique<fs::Filesystem>(*node, cfg);
    filesystem->mount();
  } catch (const std::exception& e) {
    readiness.failed(e.what());
    return 1;
  }
  write_pid_file(data_abs);
  LOG_INFO("mounted %s on %s", data_abs.c_str(), mnt_abs.c_str());
  readiness.ready(opts.log_file);
  int rc = filesystem->serve();
  filesystem.reset();
  LOG_INFO("unmounted %s", mnt_abs.c_str());
  node.reset();
  unlink((data_abs + "/" + kMetadataDirName + "/" + kPidFile).c_str());
  if (lock_fd >= 0) close(lock_fd);
  return rc;
}

int run_umount(const std::string& mountpoint, bool lazy) {
  char buf[PATH_MAX];
  if (!realpath(mountpoint.c_str(), buf)) {
    // A dead FUSE mount cannot be resolved; let fusermount3 deal with the path as given.
    if (errno != ENOTCONN) {
      fprintf(stderr, "blockrepl: mount point %s: %s\n", mountpoint.c_str(), strerror(errno));
      return 1;
    }
    snprintf(buf, sizeof buf, "%s", mountpoint.c_str());
  }
  std::string mnt = buf;
  auto data = blockrepl_data_dir_of(mnt);
  if (!data) {
    fprintf(stderr, "blockrepl: %s is not a blockrepl mount\n", mnt.c_str());
    return 1;
  }
  pid_t daemon_pid = 0;
  if (FILE* f = fopen((*data + "/" + kMetadataDirName + "/" + kPidFile).c_str(), "r")) {
    if (fscanf(f, "%d", &daemon_pid) != 1) daemon_pid = 0;
    fclose(f);
  }
  pid_t pid = fork();
  if (pid == 0) {
    int null = open("/dev/null", O_WRONLY);
    if (null >= 0) dup2(null, STDERR_FILENO);
    if (lazy) execlp("fusermount3", "fusermount3", "-u", "-z", mnt.c_str(), nullptr);
    else execlp("fusermount3", "fusermount3", "-u", mnt.c_str(), nullptr);
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
      fprintf(stderr, "blockrepl: cannot run fusermount3 (install the fuse3 package)\n");
    else
      fprintf(stderr, "blockrepl: cannot unmount %s: it is busy (files open or a process inside); retry, or use --lazy\n",
              mnt.c_str());
    return 1;
  }
  // Wait for the daemon to finish so the data directory is free when we return.
  if (daemon_pid > 0) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (kill(daemon_pid, 0) == 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return 0;
}

}  // namespace blockrepl::cli
