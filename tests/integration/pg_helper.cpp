#include "pg_helper.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <filesystem>
#include <fstream>
#include <pwd.h>
#include <sstream>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

namespace blockrepl::test {

namespace fs = std::filesystem;

namespace {

constexpr const char kRunuser[] = "/usr/sbin/runuser";

bool executable(const std::string& p) { return access(p.c_str(), X_OK) == 0; }

bool has_server_binaries(const std::string& dir) {
  for (const char* b : {"initdb", "pg_ctl", "postgres", "psql", "pgbench"})
    if (!executable(dir + "/" + b)) return false;
  return true;
}

bool postgres_user(uid_t* uid, gid_t* gid) {
  struct passwd* pw = getpwnam("postgres");
  if (!pw) return false;
  *uid = pw->pw_uid;
  *gid = pw->pw_gid;
  return true;
}

std::string trim(std::string s) {
  while (!s.empty() && isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  size_t i = 0;
  while (i < s.size() && isspace(static_cast<unsigned char>(s[i]))) i++;
  return s.substr(i);
}

}  // namespace

std::string postgres_missing_reason() {
  uid_t u;
  gid_t g;
  if (const char* d = getenv("BLOCKREPL_PG_BINDIR"); d && *d && !has_server_binaries(d))
    return std::string("BLOCKREPL_PG_BINDIR=") + d + " lacks initdb/pg_ctl/postgres/psql/pgbench";
  if (!postgres_user(&u, &g)) return "PostgreSQL is not installed here (no `postgres` user)";
  if (!executable(kRunuser)) return std::string("PostgreSQL tests need ") + kRunuser;
  return "PostgreSQL is not installed here (no /usr/lib/postgresql/<version>/bin with initdb, pg_ctl, postgres, "
         "psql and pgbench; install the postgresql package)";
}

std::string find_postgres_bindir() {
  uid_t u;
  gid_t g;
  if (!postgres_user(&u, &g) || !executable(kRunuser)) return "";
  if (const char* d = getenv("BLOCKREPL_PG_BINDIR"); d && *d) return has_server_binaries(d) ? d : "";
  std::string best;
  long best_version = -1;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/usr/lib/postgresql", ec)) {
    std::string name = e.path().filename().string();
    char* end = nullptr;
    long v = strtol(name.c_str(), &end, 10);
    if (end == name.c_str()) continue;
    std::string bin = e.path().string() + "/bin";
    if (v > best_version && has_server_binaries(bin)) {
      best_version = v;
      best = bin;
    }
  }
  return best;
}

void give_to_postgres(const std::string& path, const std::string& within) {
  uid_t uid;
  gid_t gid;
  if (!postgres_user(&uid, &gid)) throw std::runtime_error("no postgres user");
  if (lchown(path.c_str(), uid, gid) != 0) throw std::runtime_error("chown " + path + ": " + strerror(errno));
  std::error_code ec;
  if (fs::is_directory(path))
    for (const auto& e : fs::recursive_directory_iterator(path, ec))
      if (lchown(e.path().c_str(), uid, gid) != 0)
        throw std::runtime_error("chown " + e.path().string() + ": " + strerror(errno));
  // Let postgres reach `path`: o+x on the directories from `within` down to its parent.
  std::string w = fs::weakly_canonical(within).string();
  for (fs::path p = fs::weakly_canonical(path).parent_path(); !p.empty(); p = p.parent_path()) {
    std::string s = p.string();
    if (s != w && s.rfind(w + "/", 0) != 0) break;
    struct stat st;
    if (stat(s.c_str(), &st) == 0 && (st.st_mode & S_IXOTH) == 0) chmod(s.c_str(), (st.st_mode & 07777) | S_IXOTH);
    if (s == w || p == p.parent_path()) break;
  }
}

PgServer::PgServer(std::string bindir, std::string datadir, int port)
    : bindir_(std::move(bindir)), datadir_(fs::weakly_canonical(datadir).string()), port_(port) {
  sockdir_ = std::make_unique<TempDir>("pgsock");
  give_to_postgres(sockdir_->path(), sockdir_->path());
  chmod(sockdir_->path().c_str(), 0711);
}

PgServer::~PgServer() {
  kill_all();
  // The socket directory holds files of the postgres user; TempDir removes them as root.
}

CommandResult PgServer::run_as_postgres(const std::vector<std::string>& argv, int timeout_sec) const {
  std::vector<std::string> a = {kRunuser, "-u", "postgres", "--", "/usr/bin/env", "-C", "/"};
  a.insert(a.end(), argv.begin(), argv.end());
  return run_command(a, timeout_sec);
}

std::vector<std::string> PgServer::conn_args() const {
  return {"-h", sockdir_->path(), "-p", std::to_string(port_), "-U", "postgres"};
}

CommandResult PgServer::initdb(int timeout_sec) {
  std::error_code ec;
  fs::create_directory(datadir_, ec);
  if (ec) {
    CommandResult r;
    r.exit_code = 1;
    r.err = "cannot create " + datadir_ + ": " + ec.message();
    return r;
  }
  chmod(datadir_.c_str(), 0700);
  give_to_postgres(datadir_, fs::path(datadir_).parent_path().string());
  // fsync stays on (no --no-sync): the point is to exercise the file system's barriers.
  return run_as_postgres({bin("initdb"), "-D", datadir_, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                          "--locale=C", "--no-instructions"},
                         timeout_sec);
}

CommandResult PgServer::start(int timeout_sec) {
  std::string opts = "-p " + std::to_string(port_) + " -k '" + sockdir_->path() +
                     "' -c listen_addresses='' -c logging_collector=off -c max_connections=30";
  CommandResult r = run_as_postgres({bin("pg_ctl"), "-w", "-t", std::to_string(timeout_sec), "-D", datadir_, "-l",
                                     log_path(), "-o", opts, "start"},
                                    timeout_sec + 10);
  // Even a failed start may have left a postmaster behind: the destructor looks for it.
  started_ = true;
  if (r.exit_code == 0) {
    std::ifstream in(datadir_ + "/postmaster.pid");
    int pid = 0;
    if (in >> pid) postmaster_pid_ = pid;
  }
  return r;
}

CommandResult PgServer::stop(const std::string& mode, int timeout_sec) {
  CommandResult r = run_as_postgres(
      {bin("pg_ctl"), "-w", "-t", std::to_string(timeout_sec), "-D", datadir_, "-m", mode, "stop"}, timeout_sec + 10);
  if (r.exit_code == 0) {
    started_ = false;
    postmaster_pid_ = 0;
  }
  return r;
}

std::vector<int> PgServer::processes_in_datadir() const {
  // PostgreSQL's processes all run with the data directory as their cwd; reading the link
  // does not touch the (possibly hung) file system.
  std::vector<int> pids;
  DIR* d = opendir("/proc");
  if (!d) return pids;
  while (dirent* e = readdir(d)) {
    char* end = nullptr;
    long pid = strtol(e->d_name, &end, 10);
    if (*end != '\0' || pid <= 0) continue;
    if (pid == postmaster_pid_) {
      pids.push_back(static_cast<int>(pid));
      continue;
    }
    char buf[4096];
    ssize_t n = readlink(("/proc/" + std::string(e->d_name) + "/cwd").c_str(), buf, sizeof buf - 1);
    if (n <= 0) continue;
    std::string cwd(buf, static_cast<size_t>(n));
    if (cwd == datadir_ || cwd == datadir_ + " (deleted)") pids.push_back(static_cast<int>(pid));
  }
  closedir(d);
  return pids;
}

void PgServer::kill_all() {
  if (!started_ && processes_in_datadir().empty()) return;
  if (started_) {
    // Quick and without a checkpoint; bounded, so a hung file system cannot hang the test.
    run_as_postgres({bin("pg_ctl"), "-w", "-t", "15", "-D", datadir_, "-m", "immediate", "stop"}, 20);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(15);
  for (;;) {
    std::vector<int> left = processes_in_datadir();
    if (postmaster_pid_ > 0 && kill(postmaster_pid_, 0) != 0) {
      left.erase(std::remove(left.begin(), left.end(), postmaster_pid_), left.end());
    }
    if (left.empty() || std::chrono::steady_clock::now() > deadline) break;
    for (int pid : left) kill(pid, SIGKILL);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  started_ = false;
  postmaster_pid_ = 0;
}

CommandResult PgServer::psql(const std::string& sql, const std::string& db, int timeout_sec) {
  std::vector<std::string> a = {bin("psql")};
  auto c = conn_args();
  a.insert(a.end(), c.begin(), c.end());
  a.insert(a.end(), {"-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql});
  return run_command(a, timeout_sec);
}

std::string PgServer::query_value(const std::string& sql, const std::string& db) {
  CommandResult r = psql(sql, db);
  if (r.exit_code != 0) {
    ADD_FAILURE() << "psql failed (exit " << r.exit_code << ") on: " << sql << "\n" << r.err;
    return "";
  }
  return trim(r.out);
}

CommandResult PgServer::pgbench(const std::vector<std::string>& args, const std::string& db, int timeout_sec) {
  std::vector<std::string> a = {bin("pgbench")};
  auto c = conn_args();
  a.insert(a.end(), c.begin(), c.end());
  a.insert(a.end(), args.begin(), args.end());
  a.push_back(db);
  return run_command(a, timeout_sec);
}

bool PgServer::has_pg_amcheck() const { return executable(bindir_ + "/pg_amcheck"); }

CommandResult PgServer::pg_amcheck(const std::vector<std::string>& extra, const std::string& db, int timeout_sec) {
  std::vector<std::string> a = {bin("pg_amcheck")};
  auto c = conn_args();
  a.insert(a.end(), c.begin(), c.end());
  a.push_back("--install-missing");
  a.insert(a.end(), extra.begin(), extra.end());
  a.push_back(db);
  return run_command(a, timeout_sec);
}

std::string PgServer::log_tail(size_t max_bytes) const {
  std::ifstream in(log_path(), std::ios::binary);
  if (!in) return "(no server log at " + log_path() + ")";
  std::ostringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  if (s.size() > max_bytes) s = "..." + s.substr(s.size() - max_bytes);
  return s;
}

}  // namespace blockrepl::test
