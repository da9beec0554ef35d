#include "tools/cli/mount_command.h"

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <malloc.h>
#include <memory>
#include <mutex>
#include <optional>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "blockrepl/control.h"
#include "blockrepl/error.h"
#include "blockrepl/log.h"
#include "blockrepl/metadata.h"
#include "blockrepl/replica.h"
#include "blockrepl/trace.h"
#include "fs/filesystem.h"
#include "tools/cli/control_answers.h"
#include "tools/cli/daemon.h"
#include "tools/cli/mount_checks.h"

namespace blockrepl::cli {

namespace {

std::string pid_file_path(const std::string& data_abs) { return data_abs + "/" + kMetadataDirName + "/" + kPidFile; }

void write_pid_file(const std::string& data_abs) {
  if (FILE* f = fopen(pid_file_path(data_abs).c_str(), "w")) {
    fprintf(f, "%d\n", getpid());
    fclose(f);
  }
}

// Removes the pid file only if it still names this process: it tells `umount` and error
// messages which daemon serves the data directory, and a newer daemon's must survive an older
// one's exit. Called while the data directory's lock is still held.
void remove_own_pid_file(const std::string& data_abs) {
  const std::string path = pid_file_path(data_abs);
  pid_t pid = 0;
  if (FILE* f = fopen(path.c_str(), "r")) {
    if (fscanf(f, "%d", &pid) != 1) pid = 0;
    fclose(f);
  }
  if (pid == getpid()) unlink(path.c_str());
}

void raise_fd_limit() {
  rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

// A progress line on the terminal while a foreground mount takes its first copy (it can take a
// while for a large volume); nothing when stderr is not a terminal.
class AttachProgress {
 public:
  AttachProgress(Replica& replica, bool enabled, const std::string& master) : replica_(replica), master_(master) {
    if (enabled) thread_ = std::thread([this] { run(); });
  }
  ~AttachProgress() {
    if (!thread_.joinable()) return;
    {
      std::lock_guard lk(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
    fprintf(stderr, "\n");
  }

 private:
  void run() {
    std::unique_lock lk(mu_);
    while (!cv_.wait_for(lk, std::chrono::milliseconds(250), [&] { return done_; })) {
      const AttachReport a = replica_.attach_progress();
      const double mib = static_cast<double>(a.bytes_received) / (1 << 20);
      const double secs = a.seconds > 0 ? a.seconds : 1e-9;
      fprintf(stderr, "\rattaching to %s: %8.1f MiB, %6llu files, %7.1f MiB/s, %5.1f s ", master_.c_str(), mib,
              static_cast<unsigned long long>(a.files_received), mib / secs, a.seconds);
      fflush(stderr);
    }
  }
  Replica& replica_;
  std::string master_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

// ", authenticated, encrypted" / ", not authenticated, not encrypted" for a peer's status line.
std::string security_words(const nlohmann::json& peer) {
  return std::string(peer.value("authenticated", false) ? ", authenticated" : ", not authenticated") +
         (peer.value("encrypted", false) ? ", encrypted" : ", not encrypted");
}

// ", zstd:3 (12.0 MiB of batches sent as 3.1 MiB)" / ", not compressed" for a peer's status line.
std::string compression_words(const nlohmann::json& peer) {
  const std::string codec = peer.value("compression", std::string("off"));
  if (codec == "off") return ", not compressed";
  std::string out = ", " + codec;
  if (peer.contains("batch_bytes")) {
    char buf[96];
    snprintf(buf, sizeof buf, " (%.1f MiB of batches sent as %.1f MiB)", peer.value("batch_bytes", uint64_t{0}) / 1048576.0,
             peer.value("batch_wire_bytes", uint64_t{0}) / 1048576.0);
    out += buf;
  }
  return out;
}

}  // namespace

int run_mount(const MountOptions& opts) {
  set_log_level(opts.verbose >= 2 ? LogLevel::debug : opts.verbose == 1 ? LogLevel::info : LogLevel::warn);
  // Every option is checked before anything is written or forked (the values themselves by the
  // parser, see main.cpp; here how they go together).
  const ReplicaConfig& given = opts.replica;
  const bool slave = !given.master_address.empty();
  if (!slave && (given.no_fsync || given.exit_on_disconnect)) {
    fprintf(stderr, "blockrepl: --no-fsync and --exit-on-disconnect are for slaves (use them with --master)\n");
    return 2;
  }
  if (slave && given.min_sync_slaves && given.listen_address.empty()) {
    fprintf(stderr, "blockrepl: --min-sync-slaves needs --listen\n");
    return 2;
  }
  // A listener others can reach serves the volume to whoever connects unless peers must prove
  // the secret.
  if (!given.listen_address.empty() && opts.security.secret_file.empty() && !opts.security.insecure &&
      !is_loopback_address(given.listen_address)) {
    fprintf(stderr,
            "blockrepl: --listen %s is reachable from other hosts and no --secret-file is given: anyone who connects could "
            "copy the volume or pose as a slave; give a --secret-file (and --tls-*), or --insecure to accept that\n",
            given.listen_address.c_str());
    return 2;
  }
  if (opts.trace) Trace::enable();
  ReplicaConfig replica_cfg = given;
  if (auto err = load_peer_security(opts.security, &replica_cfg.security)) {
    fprintf(stderr, "blockrepl: %s\n", err->c_str());
    return 2;  // a setting to fix: a unit does not restart on 2
  }
  MountPaths paths;
  if (auto err = check_mount_paths(opts.data, opts.mountpoint, &paths)) {
    fprintf(stderr, "blockrepl: %s\n", err->c_str());
    return 1;
  }
  if (auto err = slave ? check_backing_dir_private(paths.data_abs) : std::nullopt) {
    fprintf(stderr, "blockrepl: %s\n", err->c_str());
    return 2;  // a setting to fix: a unit does not restart on 2
  }
  // A slave's first attach replaces what its data directory holds: only an empty directory or a
  // volume is taken without being told.
  if (slave && !given.discard_my_data)
    if (auto err = check_replica_data_dir(paths.data_abs, "slave")) {
      fprintf(stderr, "blockrepl: %s\n", err->c_str());
      return 1;
    }
  const std::string& data_abs = paths.data_abs;
  const std::string& mnt_abs = paths.mountpoint_abs;

  Readiness readiness;
  readiness.start(opts.foreground);
  // Until the daemon is ready its lines go to `mount`'s stderr; the log file gets them too.
  int early_log_fd = -1;
  if (!opts.foreground && !opts.log_file.empty()) {
    early_log_fd = open(opts.log_file.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    set_log_copy_fd(early_log_fd);
  }
  struct EarlyLogCloser {
    int& fd;
    ~EarlyLogCloser() {
      set_log_copy_fd(-1);
      if (fd >= 0) close(fd);
      fd = -1;
    }
  } early_log_closer{early_log_fd};
  // From here on we are the daemon (or the foreground process).
  umask(0);  // modes come from the application (the kernel already applied its umask)
  raise_fd_limit();
  signal(SIGPIPE, SIG_IGN);
  // Records and frames of up to a few MiB are allocated and freed all the time: keep them on
  // the heap for reuse instead of an mmap + page faults + zeroing for every one.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  ReplicaConfig rcfg = replica_cfg;
  rcfg.data_path = data_abs;
  int lock_fd = -1;
  std::unique_ptr<Replica> replica;
  std::unique_ptr<fs::Filesystem> filesystem;  // goes before the replica it asks
  std::atomic<int> exit_code{0};
  try {
    // A port in use is refused before anything is written to the data directory.
    replica = std::make_unique<Replica>(rcfg);
    if (paths.replace_dead_mount) {
      // Left by a daemon of this data directory that died (a crash, SIGKILL): mounting again
      // is the way back, so it needs no separate fusermount3 -u.
      detach_dead_mount(mnt_abs);
      LOG_WARN("removed the dead mount of %s on %s left by a daemon that died", data_abs.c_str(), mnt_abs.c_str());
    }
    lock_fd = lock_data_dir(data_abs);
    replica->open();
    {
      std::optional<AttachProgress> progress;
      if (replica->needs_first_copy()) progress.emplace(*replica, opts.foreground && isatty(STDERR_FILENO), given.master_address);
      replica->start();
    }
    fs::MountConfig cfg;
    cfg.mountpoint = mnt_abs;
    cfg.debug = opts.fuse_debug;
    cfg.writable = [r = replica.get()] { return r->writable(); };
    filesystem = std::make_unique<fs::Filesystem>(replica->node(), cfg);
    replica->serve_control(
        [r = replica.get(), mnt_abs](const std::string& request) { return answer_control_request(*r, mnt_abs, request); });
    filesystem->mount();
  } catch (const std::exception& e) {
    readiness.failed(e.what());
    return 1;
  }
  replica->run_in_background(filesystem->invalidator(), [&](int code, const std::string& why) {
    LOG_ERROR("%s; exiting", why.c_str());
    exit_code = code;
    filesystem->stop();
    // Wake the FUSE loop: it only notices the exit flag on its next request.
    struct stat st;
    stat(mnt_abs.c_str(), &st);
  });
  write_pid_file(data_abs);
  LOG_INFO("mounted %s on %s as %s", data_abs.c_str(), mnt_abs.c_str(), slave ? "slave" : "master");
  set_log_copy_fd(-1);  // from here on stderr is the log file itself
  readiness.ready(opts.log_file);
  int rc = filesystem->serve();
  replica->stop();
  LOG_INFO("unmounted %s", mnt_abs.c_str());
  filesystem.reset();
  replica.reset();
  remove_own_pid_file(data_abs);
  if (lock_fd >= 0) close(lock_fd);
  return exit_code ? exit_code.load() : rc;
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

namespace blockrepl::cli {

namespace {

// Asks the daemon behind `mountpoint` over its control socket; prints one error line (prefixed
// with `what`) and returns nullopt on failure, including an {"error": ...} answer.
std::optional<nlohmann::json> ask_daemon(const std::string& mountpoint, const std::string& what, const std::string& request,
                                         int timeout_ms, std::string* mnt_abs) {
  char buf[PATH_MAX];
  if (!realpath(mountpoint.c_str(), buf)) {
    fprintf(stderr, "blockrepl: mount point %s: %s\n", mountpoint.c_str(), strerror(errno));
    return std::nullopt;
  }
  *mnt_abs = buf;
  auto data = blockrepl_data_dir_of(buf);
  if (!data) {
    fprintf(stderr, "blockrepl: %s is not a blockrepl mount\n", buf);
    return std::nullopt;
  }
  std::string resp;
  try {
    int meta = open((*data + "/" + kMetadataDirName).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (meta < 0) throw_errno("cannot open " + *data + "/" + kMetadataDirName, errno);
    Identity id = load_or_create_identity(meta, *data);
    close(meta);
    resp = control_request(control_socket_name(id.node_id), request, timeout_ms);
  } catch (const std::exception& e) {
    fprintf(stderr, "blockrepl: %s %s: %s\n", what.c_str(), buf, e.what());
    return std::nullopt;
  }
  nlohmann::json j = nlohmann::json::parse(resp, nullptr, false);
  if (j.is_discarded()) {
    fprintf(stderr, "blockrepl: %s %s: bad answer from the daemon\n", what.c_str(), buf);
    return std::nullopt;
  }
  if (j.contains("error")) {
    fprintf(stderr, "blockrepl: %s %s: %s\n", what.c_str(), buf, j["error"].get<std::string>().c_str());
    return std::nullopt;
  }
  return j;
}

}  // namespace

int run_promote(const std::string& mountpoint) {
  std::string mnt;
  auto answer = ask_daemon(mountpoint, "promote", "promote", 60000, &mnt);
  if (!answer) return 1;
  nlohmann::json& j = *answer;
  printf("%s is now a master (new lineage %s after lsn %llu)\n", mnt.c_str(), j["lineage"].get<std::string>().c_str(),
         static_cast<unsigned long long>(j["lsn"].get<uint64_t>()));
  return 0;
}

int run_verify(const std::string& mountpoint, bool deep) {
  std::string mnt;
  auto answer = ask_daemon(mountpoint, "verify", deep ? "verify deep" : "verify", 3600 * 1000, &mnt);
  if (!answer) return 1;
  nlohmann::json& j = *answer;
  if (j["identical"].get<bool>()) {
    // Equal hashes vouch for everything below them: report the whole tree they cover.
    const uint64_t dirs = j.value("dirs_covered", uint64_t{0});
    const uint64_t entries = j.value("entries_covered", uint64_t{0});
    printf("identical to the master (%llu files and %llu directories compared by hash, in %u round trips)\n",
           static_cast<unsigned long long>(entries - std::min(entries, dirs > 0 ? dirs - 1 : 0)),
           static_cast<unsigned long long>(dirs), j.value("round_trips", 0u));
    return 0;
  }
  printf("differs from the master:\n");
  for (auto& d : j["differences"]) printf("  %s\n", d.get<std::string>().c_str());
  return 3;
}

int run_status(const std::string& mountpoint, bool json) {
  std::string mnt;
  auto answer = ask_daemon(mountpoint, "status of", "status", 10000, &mnt);
  if (!answer) return 1;
  nlohmann::json& j = *answer;
  if (json) {
    printf("%s\n", j.dump(2).c_str());
    return 0;
  }
  auto lin = j["lineage"].empty() ? std::string("-") : j["lineage"].back()["id"].get<std::string>();
  printf("%-12s %s\n", "role", j["role"].get<std::string>().c_str());
  printf("%-12s %s\n", "node", j["node_id"].get<std::string>().c_str());
  printf("%-12s %s\n", "cluster", j["cluster_id"].get<std::string>().c_str());
  printf("%-12s %s\n", "lineage", lin.c_str());
  printf("%-12s %llu\n", "lsn", static_cast<unsigned long long>(j["lsn"].get<uint64_t>()));
  printf("%-12s %s%s\n", "ack", j["ack"].get<std::string>().c_str(), j["no_fsync"].get<bool>() ? " (no-fsync)" : "");
  printf("%-12s %u\n", "block size", j["block_size"].get<unsigned>());
  if (!j["upstream"].is_null()) {
    auto& u = j["upstream"];
    printf("%-12s %s %s received %llu durable %llu%s%s\n", "upstream", u["address"].get<std::string>().c_str(),
           u["state"].get<std::string>().c_str(), static_cast<unsigned long long>(u["received_lsn"].get<uint64_t>()),
           static_cast<unsigned long long>(u["durable_lsn"].get<uint64_t>()), security_words(u).c_str(),
           compression_words(u).c_str());
  }
  if (!j["last_attach"].is_null()) {
    auto& a = j["last_attach"];
    printf("%-12s %s, %llu bytes, %llu blocks, %.2f s\n", "last attach", a["method"].get<std::string>().c_str(),
           static_cast<unsigned long long>(a["bytes_received"].get<uint64_t>()),
           static_cast<unsigned long long>(a["blocks_received"].get<uint64_t>()), a["seconds"].get<double>());
  }
  for (auto& s : j["slaves"])
    printf("%-12s %s %s (%s) received %llu durable %llu lag %llu bytes%s%s\n", "slave", s["address"].get<std::string>().c_str(),
           s["state"].get<std::string>().c_str(), s["ack"].get<std::string>().c_str(),
           static_cast<unsigned long long>(s["received_lsn"].get<uint64_t>()),
           static_cast<unsigned long long>(s["durable_lsn"].get<uint64_t>()),
           static_cast<unsigned long long>(s["lag_bytes"].get<uint64_t>()), security_words(s).c_str(), compression_words(s).c_str());
  if (j["slaves"].empty() && j["role"] == "master") printf("%-12s none\n", "slaves");
  return 0;
}

}  // namespace blockrepl::cli
