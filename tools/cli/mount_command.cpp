#include "tools/cli/mount_command.h"

#include <cerrno>
#include <optional>
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
#include "blockrepl/control.h"
#include "blockrepl/follower.h"
#include "blockrepl/hash_index.h"
#include "blockrepl/journal.h"
#include "blockrepl/upstream.h"
#include "blockrepl/wire.h"
#include "fs/filesystem.h"
#include <nlohmann/json.hpp>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <malloc.h>
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

}  // namespace

bool parse_ack_level(const std::string& s, AckLevel* out) {
  if (s == "async") *out = AckLevel::async;
  else if (s == "recv") *out = AckLevel::recv;
  else if (s == "sync") *out = AckLevel::sync;
  else return false;
  return true;
}

bool parse_duration(const std::string& s, std::chrono::milliseconds* out) {
  try {
    size_t pos = 0;
    double v = std::stod(s, &pos);
    std::string unit = s.substr(pos);
    double ms;
    if (unit.empty() || unit == "s") ms = v * 1000;
    else if (unit == "ms") ms = v;
    else if (unit == "m" || unit == "min") ms = v * 60000;
    else return false;
    if (ms < 0) return false;
    *out = std::chrono::milliseconds(static_cast<int64_t>(ms));
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

bool parse_size(const std::string& s, uint64_t* out) {
  try {
    size_t pos = 0;
    unsigned long long v = std::stoull(s, &pos);
    std::string unit = s.substr(pos);
    uint64_t mul = 1;
    if (unit.empty() || unit == "B") mul = 1;
    else if (unit == "K" || unit == "KiB" || unit == "k") mul = 1ull << 10;
    else if (unit == "M" || unit == "MiB") mul = 1ull << 20;
    else if (unit == "G" || unit == "GiB") mul = 1ull << 30;
    else return false;
    *out = v * mul;
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

namespace {

// Everything a running daemon holds; destroyed in reverse order of construction.
struct Daemon {
  std::unique_ptr<Node> node;
  std::unique_ptr<HashIndex> hashes;
  std::unique_ptr<Journal> journal;
  std::unique_ptr<Upstream> upstream;
  std::unique_ptr<Follower> follower;
  std::unique_ptr<fs::Filesystem> filesystem;
  std::unique_ptr<ControlServer> control;
  std::string mountpoint;
  AckLevel ack = AckLevel::sync;
  bool no_fsync = false;
  std::atomic<int> exit_code{0};
  std::atomic<bool> promoted{false};  // a slave turned master by `blockrepl promote`
  std::mutex promote_mu;
};

// A progress line on the terminal while a foreground mount takes its first copy (it can take a
// while for a large volume); nothing when stderr is not a terminal.
class AttachProgress {
 public:
  AttachProgress(Follower& follower, bool enabled, const std::string& master) : follower_(follower), master_(master) {
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
      FollowerStatus st = follower_.status();
      const double mib = static_cast<double>(st.current_attach.bytes_received) / (1 << 20);
      const double secs = st.current_attach.seconds > 0 ? st.current_attach.seconds : 1e-9;
      fprintf(stderr, "\rattaching to %s: %8.1f MiB, %6llu files, %7.1f MiB/s, %5.1f s ", master_.c_str(), mib,
              static_cast<unsigned long long>(st.current_attach.files_received), mib / secs, st.current_attach.seconds);
      fflush(stderr);
    }
  }
  Follower& follower_;
  std::string master_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;
};

nlohmann::json status_json(Daemon& d) {
  using nlohmann::json;
  const Identity id = d.node->identity();
  json j;
  const bool slave = d.follower != nullptr && !d.promoted;
  j["role"] = slave ? "slave" : "master";
  j["node_id"] = id.node_id;
  j["cluster_id"] = id.cluster_id;
  json lin = json::array();
  for (auto& e : id.lineage) lin.push_back({{"id", e.id}, {"first_lsn", e.first_lsn}});
  j["lineage"] = lin;
  j["block_size"] = id.block_size;
  j["ack"] = ack_level_name(d.ack);
  j["data"] = d.node->data_path();
  j["mountpoint"] = d.mountpoint;
  j["no_fsync"] = d.no_fsync;
  j["upstream"] = nullptr;
  j["last_attach"] = nullptr;
  if (slave) {
    FollowerStatus fs = d.follower->status();
    j["lsn"] = fs.durable_lsn;
    json up = {{"address", fs.address}, {"state", fs.state}, {"received_lsn", fs.received_lsn}, {"durable_lsn", fs.durable_lsn}};
    if (!fs.last_error.empty() && fs.state == "disconnected") up["last_error"] = fs.last_error;
    if (!fs.waiting_for.empty()) up["waiting_for"] = fs.waiting_for;
    if (fs.state == "attaching")
      up["attach_progress"] = {{"bytes_received", fs.current_attach.bytes_received},
                               {"files_received", fs.current_attach.files_received},
                               {"blocks_received", fs.current_attach.blocks_received},
                               {"seconds", fs.current_attach.seconds}};
    j["upstream"] = up;
    if (fs.has_last_attach)
      j["last_attach"] = {{"method", fs.last_attach.method}, {"bytes_received", fs.last_attach.bytes_received},
                          {"blocks_received", fs.last_attach.blocks_received}, {"seconds", fs.last_attach.seconds}};
  } else {
    j["lsn"] = d.node->last_lsn();
  }
  json slaves = json::array();
  if (d.upstream) {
    for (auto& s : d.upstream->slaves())
      slaves.push_back({{"address", s.address}, {"node_id", s.node_id}, {"state", s.state}, {"ack", s.ack},
                        {"received_lsn", s.received_lsn}, {"durable_lsn", s.durable_lsn}, {"lag_bytes", s.lag_bytes}});
  }
  j["slaves"] = slaves;
  return j;
}

// A promote request: this slave stops following, starts a new lineage after its last LSN and
// becomes writable; its own slaves keep streaming from it.
nlohmann::json promote_json(Daemon& d) {
  using nlohmann::json;
  std::lock_guard lk(d.promote_mu);
  if (!d.follower || d.promoted) return json{{"error", "this node is already a master"}};
  try {
    if (!d.follower->has_data()) return json{{"error", "this replica never completed an attach: it holds nothing to serve"}};
    d.follower->stop();
    // What was applied becomes durable before the new history starts after it.
    if (int err = d.node->store().sync_all()) throw_errno("cannot sync " + d.node->data_path(), err);
    const Lsn last = d.node->last_lsn();
    const std::string lineage = random_hex_id(8);
    d.node->update_identity([&](Identity& id) {
      id.lineage.push_back({lineage, last + 1});
      id.role = "master";
    });
    if (d.upstream) d.node->set_barrier_waiter([u = d.upstream.get()](Lsn lsn) { return u->wait_barrier(lsn); });
    d.filesystem->set_read_only(false);
    d.promoted = true;
    d.node->store().set_direct_writes(false);  // a master's files are read back: keep them cached
    LOG_WARN("promoted to master at lsn %llu: new lineage %s", static_cast<unsigned long long>(last), lineage.c_str());
    return json{{"promoted", true}, {"lsn", last}, {"lineage", lineage}};
  } catch (const std::exception& e) {
    return json{{"error", e.what()}};
  }
}

// A verify request: compare this replica's trees with its master's.
nlohmann::json verify_json(Daemon& d, bool deep) {
  using nlohmann::json;
  if (!d.follower || d.promoted) return json{{"error", "this node is a master: run verify on a slave"}};
  try {
    // Compared while records keep arriving: a difference may only be a record in flight, so
    // differences count only if a second comparison, once we hold what the master had at
    // the first one, still finds them.
    DiffReport rep = d.follower->verify(deep);
    for (int attempt = 0; attempt < 3 && !rep.differences.empty(); attempt++) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1500));
      rep = d.follower->verify(false);
    }
    json diffs = json::array();
    for (auto& s : rep.differences) diffs.push_back(s);
    return json{{"identical", rep.differences.empty()}, {"differences", diffs}, {"dirs_listed", rep.dirs_listed},
                {"files_compared", rep.files_compared}, {"round_trips", rep.round_trips},
                {"dirs_covered", rep.dirs_covered}, {"entries_covered", rep.entries_covered}};
  } catch (const std::exception& e) {
    return json{{"error", e.what()}};
  }
}

}  // namespace

int run_mount(const MountOptions& opts) {
  set_log_level(opts.verbose >= 2 ? LogLevel::debug : opts.verbose == 1 ? LogLevel::info : LogLevel::warn);
  // Every option is checked before anything is written or forked.
  AckLevel ack;
  if (!parse_ack_level(opts.ack, &ack)) {
    fprintf(stderr, "blockrepl: --ack must be async, recv or sync (got '%s')\n", opts.ack.c_str());
    return 2;
  }
  std::chrono::milliseconds ack_timeout;
  if (!parse_duration(opts.ack_timeout, &ack_timeout) || ack_timeout.count() == 0) {
    fprintf(stderr, "blockrepl: --ack-timeout must be a positive duration such as 5s or 500ms (got '%s')\n", opts.ack_timeout.c_str());
    return 2;
  }
  uint64_t journal_bytes;
  if (!parse_size(opts.journal_size, &journal_bytes)) {
    fprintf(stderr, "blockrepl: --journal-size must be a size such as 256M or 0 (got '%s')\n", opts.journal_size.c_str());
    return 2;
  }
  if (opts.block_size && (*opts.block_size < 512 || *opts.block_size > (1u << 20) || (*opts.block_size & (*opts.block_size - 1)))) {
    fprintf(stderr, "blockrepl: --block-size must be a power of two from 512 to 1048576 (got %u)\n", *opts.block_size);
    return 2;
  }
  const bool slave = !opts.master.empty();
  if (!slave && (opts.no_fsync || opts.exit_on_disconnect)) {
    fprintf(stderr, "blockrepl: --no-fsync and --exit-on-disconnect are for slaves (use them with --master)\n");
    return 2;
  }
  if (slave && opts.min_sync_slaves && opts.listen.empty()) {
    fprintf(stderr, "blockrepl: --min-sync-slaves needs --listen\n");
    return 2;
  }
  MountPaths paths;
  if (auto err = check_mount_paths(opts.data, opts.mountpoint, &paths)) {
    fprintf(stderr, "blockrepl: %s\n", err->c_str());
    return 1;
  }
  // A slave's first attach replaces what its data directory holds: only an empty directory or a
  // volume is taken without being told.
  if (slave && !opts.discard_my_data)
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
  int lock_fd = -1;
  Daemon d;
  d.mountpoint = mnt_abs;
  d.ack = ack;
  d.no_fsync = opts.no_fsync;
  int listen_fd = -1;
  try {
    // A port in use is refused before anything is written to the data directory.
    if (!opts.listen.empty()) listen_fd = listen_on(opts.listen);
    if (paths.replace_dead_mount) {
      // Left by a daemon of this data directory that died (a crash, SIGKILL): mounting again
      // is the way back, so it needs no separate fusermount3 -u.
      detach_dead_mount(mnt_abs);
      LOG_WARN("removed the dead mount of %s on %s left by a daemon that died", data_abs.c_str(), mnt_abs.c_str());
    }
    lock_fd = lock_data_dir(data_abs);
    d.node = std::make_unique<Node>(data_abs);
    const Identity id = d.node->identity();
    if (opts.block_size && !id.cluster_id.empty() && *opts.block_size != id.block_size)
      throw Error("block size mismatch: " + data_abs + " was created with --block-size " + std::to_string(id.block_size) +
                  ", not " + std::to_string(*opts.block_size));
    if (opts.block_size && id.cluster_id.empty() && *opts.block_size != id.block_size)
      d.node->update_identity([&](Identity& i) { i.block_size = *opts.block_size; });
    if (!slave && (id.cluster_id.empty() || id.role != "master")) {
      // A new volume, or a former slave mounted as a master: a new history starts here.
      d.node->update_identity([&](Identity& i) {
        if (i.cluster_id.empty()) i.cluster_id = random_hex_id(16);
        i.lineage.push_back({random_hex_id(8), d.node->last_lsn() + 1});
        i.role = "master";
      });
    }
    // A former master mounted as a slave: its new master refuses it if it wrote after their
    // histories forked (unless --discard-my-data), and rewrites it by Merkle diff otherwise.
    // Hash trees for the Merkle re-attach, kept current from here on (recovered first if the
    // last stop was unclean).
    d.hashes = std::make_unique<HashIndex>(d.node->root_fd(), d.node->meta_fd(), data_abs, d.node->identity().block_size,
                                           !opts.no_fsync);
    d.node->store().set_hashes(d.hashes.get());
    if (!opts.listen.empty() || slave) {
      d.journal = std::make_unique<Journal>(journal_bytes, 64u << 20, ack_timeout);
    }
    fs::MountConfig cfg;
    cfg.mountpoint = mnt_abs;
    cfg.debug = opts.fuse_debug;
    cfg.read_only = slave;
    if (slave) {
      d.node->store().set_track_files(true);
      d.node->store().set_direct_writes(true);
      d.node->store().files().scan();
      FollowerConfig fc;
      fc.master_address = opts.master;
      fc.listen_address = opts.listen;
      fc.no_fsync = opts.no_fsync;
      fc.exit_on_disconnect = opts.exit_on_disconnect;
      fc.discard_my_data = opts.discard_my_data;
      fc.master_timeout = std::max(ack_timeout, std::chrono::milliseconds(3000));
      d.follower = std::make_unique<Follower>(*d.node, fc);
      if (!d.follower->has_data()) {
        LOG_INFO("replica %s is empty: attaching to %s", data_abs.c_str(), opts.master.c_str());
        AttachProgress progress(*d.follower, opts.foreground && isatty(STDERR_FILENO), opts.master);
        d.follower->attach_now();
      } else {
        // A replica with data is served even while its master is unreachable, but a master
        // that refuses it (another cluster, diverged) is an error the operator must see now.
        try {
          d.follower->attach_now();
        } catch (const FatalAttachError&) {
          throw;
        } catch (const std::exception& e) {
          LOG_WARN("%s; serving the replica and retrying in the background", e.what());
        }
      }
    }
    if (d.journal) {
      d.journal->set_start(d.node->last_lsn());
      d.node->add_sink(d.journal.get());
    }
    if (!opts.listen.empty()) {
      UpstreamConfig uc;
      uc.listen_address = opts.listen;
      uc.ack = ack;
      uc.ack_timeout = ack_timeout;
      uc.min_sync_slaves = opts.min_sync_slaves;
      uc.assign_ids = !slave;
      d.upstream = std::make_unique<Upstream>(*d.node, *d.journal, uc);
      d.upstream->start(listen_fd);
      listen_fd = -1;
      if (!slave) d.node->set_barrier_waiter([u = d.upstream.get()](Lsn lsn) { return u->wait_barrier(lsn); });
    }
    d.filesystem = std::make_unique<fs::Filesystem>(*d.node, cfg);
    d.control = std::make_unique<ControlServer>(control_socket_name(d.node->identity().node_id), [&d](const std::string& req) {
      if (req == "status") return status_json(d).dump();
      if (req == "promote") return promote_json(d).dump();
      if (req == "verify" || req == "verify deep") return verify_json(d, req == "verify deep").dump();
      return std::string("{\"error\":\"unknown request\"}");
    });
    d.filesystem->mount();
    if (!slave) lift_fuse_writeback_limit(mnt_abs);
  } catch (const std::exception& e) {
    if (listen_fd >= 0) close(listen_fd);
    readiness.failed(e.what());
    return 1;
  }
  if (d.follower) {
    d.follower->set_invalidator(d.filesystem->invalidator());
    d.follower->set_on_exit([&d](int code, const std::string& why) {
      LOG_ERROR("%s; exiting", why.c_str());
      d.exit_code = code;
      d.filesystem->stop();
      // Wake the FUSE loop: it only notices the exit flag on its next request.
      struct stat st;
      stat(d.mountpoint.c_str(), &st);
    });
    d.follower->start();
  }
  d.hashes->start_checkpoints();
  write_pid_file(data_abs);
  LOG_INFO("mounted %s on %s as %s", data_abs.c_str(), mnt_abs.c_str(), d.follower ? "slave" : "master");
  set_log_copy_fd(-1);  // from here on stderr is the log file itself
  readiness.ready(opts.log_file);
  int rc = d.filesystem->serve();
  if (d.follower) d.follower->stop();
  if (d.upstream) d.upstream->stop();
  d.control.reset();
  d.filesystem.reset();
  LOG_INFO("unmounted %s", mnt_abs.c_str());
  if (d.journal) {
    d.node->remove_sink(d.journal.get());
    d.journal->close();
  }
  if (!d.follower) d.node->close_clean();
  d.upstream.reset();
  d.follower.reset();
  try {
    d.hashes->close_clean();  // saves the trees, so the next start rehashes nothing
  } catch (const std::exception& e) {
    LOG_WARN("%s", e.what());
  }
  d.node->store().set_hashes(nullptr);
  d.hashes.reset();
  d.node.reset();
  remove_own_pid_file(data_abs);
  if (lock_fd >= 0) close(lock_fd);
  return d.exit_code ? d.exit_code.load() : rc;
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
    printf("%-12s %s %s received %llu durable %llu\n", "upstream", u["address"].get<std::string>().c_str(),
           u["state"].get<std::string>().c_str(), static_cast<unsigned long long>(u["received_lsn"].get<uint64_t>()),
           static_cast<unsigned long long>(u["durable_lsn"].get<uint64_t>()));
  }
  if (!j["last_attach"].is_null()) {
    auto& a = j["last_attach"];
    printf("%-12s %s, %llu bytes, %llu blocks, %.2f s\n", "last attach", a["method"].get<std::string>().c_str(),
           static_cast<unsigned long long>(a["bytes_received"].get<uint64_t>()),
           static_cast<unsigned long long>(a["blocks_received"].get<uint64_t>()), a["seconds"].get<double>());
  }
  for (auto& s : j["slaves"])
    printf("%-12s %s %s (%s) received %llu durable %llu lag %llu bytes\n", "slave", s["address"].get<std::string>().c_str(),
           s["state"].get<std::string>().c_str(), s["ack"].get<std::string>().c_str(),
           static_cast<unsigned long long>(s["received_lsn"].get<uint64_t>()),
           static_cast<unsigned long long>(s["durable_lsn"].get<uint64_t>()),
           static_cast<unsigned long long>(s["lag_bytes"].get<uint64_t>()));
  if (j["slaves"].empty() && j["role"] == "master") printf("%-12s none\n", "slaves");
  return 0;
}

}  // namespace blockrepl::cli
