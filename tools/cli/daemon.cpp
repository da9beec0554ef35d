#include "tools/cli/daemon.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

namespace blockrepl::cli {

void Readiness::start(bool foreground) {
  if (foreground) return;
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0) {
    fprintf(stderr, "blockrepl: cannot create a pipe: %s\n", strerror(errno));
    exit(1);
  }
  pid_t pid = fork();
  if (pid < 0) {
    fprintf(stderr, "blockrepl: cannot fork: %s\n", strerror(errno));
    exit(1);
  }
  if (pid > 0) {
    close(p[1]);
    std::string msg;
    char buf[512];
    ssize_t n;
    while ((n = read(p[0], buf, sizeof buf)) != 0) {
      if (n < 0) {
        if (errno == EINTR) continue;
        break;
      }
      msg.append(buf, static_cast<size_t>(n));
    }
    if (msg == "ok") _exit(0);
    if (msg.rfind("error:", 0) == 0) {
      fprintf(stderr, "blockrepl: %s\n", msg.c_str() + 6);
    } else {
      int status = 0;
      waitpid(pid, &status, 0);
      fprintf(stderr, "blockrepl: the mount daemon died before the mount was ready%s\n",
              WIFSIGNALED(status) ? " (killed by a signal)" : "");
    }
    _exit(1);
  }
  close(p[0]);
  fd_ = p[1];
  setsid();
  int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (null >= 0) {
    dup2(null, STDIN_FILENO);
    close(null);
  }
}

Readiness::~Readiness() {
  if (told_systemd_ready_) sd_notify(0, "STOPPING=1");
}

void Readiness::ready(const std::string& log_file) {
  // unset_environment 0: a daemon started by the service keeps NOTIFY_SOCKET for STOPPING=1.
  told_systemd_ready_ = sd_notify(0, "READY=1") > 0;
  if (fd_ < 0) return;
  // Detach stdout/stderr so that a caller capturing our output is not held open by the daemon.
  int out = log_file.empty() ? open("/dev/null", O_WRONLY | O_CLOEXEC)
                             : open(log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (out >= 0) {
    dup2(out, STDOUT_FILENO);
    dup2(out, STDERR_FILENO);
    close(out);
  }
  ssize_t ignored = write(fd_, "ok", 2);
  (void)ignored;
  close(fd_);
  fd_ = -1;
}

void Readiness::failed(const std::string& message) {
  if (fd_ < 0) {
    fprintf(stderr, "blockrepl: %s\n", message.c_str());
    return;
  }
  std::string m = "error:" + message;
  ssize_t ignored = write(fd_, m.data(), m.size());
  (void)ignored;
  close(fd_);
  fd_ = -1;
}

}  // namespace blockrepl::cli
