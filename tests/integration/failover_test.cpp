// Failover on real FUSE mounts: a master killed with SIGKILL under SQLite and PostgreSQL load
// and its slave promoted (every acknowledged transaction survives), a former master refused as
// a slave of the new master because it diverged and rewritten with --discard-my-data, a chained
// slave that follows its upstream's promotion by stream, `blockrepl pull` killed at random
// moments (the directory is always the old state or the new one), and operator mistakes.
// Every comparison is of backing directories (byte for byte, metadata and file ids included);
// every wait has a deadline; every mount is unmounted by the Cluster, also on failure.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <map>
#include <mutex>
#include <random>
#include <regex>
#include <string>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "harness.h"
#include "pg_helper.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;
using repl::Clock;
using repl::Cluster;
using repl::json;
using repl::Node;

std::string errtext(int e) { return std::string(strerror(e)) + " (errno " + std::to_string(e) + ")"; }

double secs_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string real(const std::string& p) {
  char buf[PATH_MAX];
  return realpath(p.c_str(), buf) ? std::string(buf) : p;
}

// Whether s is exactly one non-empty line ending in '\n'.
bool one_line(const std::string& s) {
  return !s.empty() && s.back() == '\n' && s.find('\n') == s.size() - 1 && s.size() > 1;
}

std::string show(const CommandResult& r) {
  return "exit " + std::to_string(r.exit_code) + "\n--- stdout ---\n" + r.out + "--- stderr ---\n" + r.err;
}

// Writes data to path (create/truncate) and fsyncs it; returns 0 or errno.
int put_file(const std::string& path, const std::string& data, mode_t mode = 0644) {
  int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, mode);
  if (fd < 0) return errno;
  try {
    repl::pwrite_all(fd, data, 0);
  } catch (const std::exception&) {
    int e = errno ? errno : EIO;
    close(fd);
    return e;
  }
  int rc = fsync(fd) == 0 ? 0 : errno;
  close(fd);
  return rc;
}

// The lineage ids of a node's status, oldest first (empty on error).
std::vector<std::string> lineage_of(const std::string& mnt) {
  std::vector<std::string> out;
  json j = repl::status(mnt);
  if (!j.is_object() || !j["lineage"].is_array()) return out;
  for (auto& e : j["lineage"]) out.push_back(e.value("id", std::string("?")));
  return out;
}

std::string role_of(const std::string& mnt) {
  json j = repl::status(mnt);
  if (!j.is_object()) return "<no status>";
  return j.value("role", std::string("<no role>"));
}

std::string last_attach_method(const Node& n) {
  json j = repl::status(n.mnt);
  if (!j.is_object() || !j["last_attach"].is_object()) return "<none: " + j.dump() + ">";
  return j["last_attach"].value("method", std::string("<no method>"));
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

struct Promoted {
  bool ok = false;
  std::string lineage;
  uint64_t lsn = 0;
};

// `blockrepl promote MNT`: must exit 0 and print "MNT is now a master (new lineage X after
// lsn N)"; then the node's status says master and its lineage ends with X starting at N+1.
Promoted promote(const Node& n) {
  Promoted p;
  std::vector<std::string> before = lineage_of(n.mnt);
  CommandResult r = run_blockrepl({"promote", n.mnt}, 90);
  EXPECT_EQ(r.exit_code, 0) << "promote " << n.name << ": " << show(r);
  if (r.exit_code != 0) return p;
  std::smatch mt;
  std::regex re(R"(^(\S+) is now a master \(new lineage (\S+) after lsn (\d+)\)\n$)");
  if (!std::regex_match(r.out, mt, re)) {
    ADD_FAILURE() << "promote printed something else: " << show(r);
    return p;
  }
  EXPECT_EQ(mt[1].str(), real(n.mnt));
  p.lineage = mt[2];
  p.lsn = std::stoull(mt[3]);
  json j = repl::status(n.mnt);
  EXPECT_EQ(j.value("role", std::string("?")), "master") << j.dump();
  if (j.is_object() && j["lineage"].is_array() && !j["lineage"].empty()) {
    EXPECT_EQ(j["lineage"].back().value("id", std::string("?")), p.lineage) << j.dump();
    EXPECT_EQ(j["lineage"].back().value("first_lsn", uint64_t{0}), p.lsn + 1) << j.dump();
    EXPECT_EQ(j["lineage"].size(), before.size() + 1) << "lineage before: " << join(before) << "; after: " << j.dump();
  } else {
    ADD_FAILURE() << "status after promote has no lineage: " << j.dump();
  }
  p.ok = !::testing::Test::HasFailure();
  return p;
}

// Creating a file on the mount: 0 or errno.
int try_create(const std::string& path) {
  int fd = open(path.c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
  if (fd < 0) return errno;
  close(fd);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// SQLite

class Db {
 public:
  explicit Db(const std::string& path, int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) {
    rc_ = sqlite3_open_v2(path.c_str(), &db_, flags | SQLITE_OPEN_NOMUTEX, nullptr);
    if (rc_ != SQLITE_OK) error_ = std::string(db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc_)) + " opening " + path;
  }
  ~Db() { close(); }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  bool ok() const { return rc_ == SQLITE_OK; }
  const std::string& error() const { return error_; }
  sqlite3* get() { return db_; }
  int close() {
    int rc = SQLITE_OK;
    if (db_) rc = sqlite3_close_v2(db_);
    db_ = nullptr;
    return rc;
  }
  std::string sys_error() const {
    int e = db_ ? sqlite3_system_errno(db_) : 0;
    return e ? " (" + errtext(e) + ")" : "";
  }
  int exec(const std::string& sql) {
    char* msg = nullptr;
    int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &msg);
    if (rc != SQLITE_OK) error_ = std::string(msg ? msg : sqlite3_errstr(rc)) + sys_error() + " [" + sql + "]";
    sqlite3_free(msg);
    return rc;
  }
  // Every row of the first column, joined by '\n'; errors are appended.
  std::string rows(const std::string& sql) {
    sqlite3_stmt* st = nullptr;
    std::string out;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) != SQLITE_OK)
      return "prepare failed: " + std::string(sqlite3_errmsg(db_)) + sys_error();
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
      if (!out.empty()) out += "\n";
      const unsigned char* t = sqlite3_column_text(st, 0);
      out += t ? reinterpret_cast<const char*>(t) : "NULL";
    }
    if (rc != SQLITE_DONE) out += "\nstep failed: " + std::string(sqlite3_errmsg(db_)) + sys_error();
    sqlite3_finalize(st);
    return out;
  }

 private:
  sqlite3* db_ = nullptr;
  int rc_ = SQLITE_OK;
  std::string error_;
};

// ---------------------------------------------------------------------------------------------
// A child process that can be killed at a chosen moment (for `blockrepl pull`).

pid_t spawn(const std::vector<std::string>& argv, const std::string& output) {
  pid_t pid = fork();
  if (pid == 0) {
    int fd = open(output.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int null = open("/dev/null", O_RDONLY);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
    }
    if (null >= 0) dup2(null, 0);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  return pid;
}

// Reaps pid; its exit status (128+signal if killed), -1 on error.
int reap(pid_t pid) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

bool exists(const std::string& p) {
  struct stat st;
  return lstat(p.c_str(), &st) == 0;
}

}  // namespace

// =============================================================================================
// 1. SQLite on a sync master killed with SIGKILL: the promoted slave holds every transaction
//    whose COMMIT returned, and the database is intact and writable there.

TEST(FailoverSqlite, KilledSyncMasterLosesNoCommittedTransaction) {
  auto t0 = Clock::now();
  Cluster c("fo-sqlite");
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m, {}, /*listen=*/true);
  ASSERT_TRUE(s.ok());

  const std::string path = m.file("app.db");
  {
    Db db(path);
    ASSERT_TRUE(db.ok()) << db.error();
    ASSERT_EQ(db.rows("PRAGMA journal_mode=WAL"), "wal");
    ASSERT_EQ(db.exec("PRAGMA synchronous=FULL"), SQLITE_OK) << db.error();
    ASSERT_EQ(db.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, payload TEXT NOT NULL)"), SQLITE_OK) << db.error();
  }
  std::atomic<bool> stop{false};
  std::atomic<long> committed{0};
  std::atomic<bool> writer_done{false};
  std::string writer_error;  // read only after join
  std::thread writer([&] {
    struct Done {
      std::atomic<bool>& d;
      ~Done() { d = true; }
    } done{writer_done};
    Db db(path, SQLITE_OPEN_READWRITE);
    if (!db.ok()) {
      writer_error = "open: " + db.error();
      return;
    }
    sqlite3_busy_timeout(db.get(), 5000);
    if (db.exec("PRAGMA synchronous=FULL") != SQLITE_OK || db.rows("PRAGMA synchronous") != "2" ||
        db.rows("PRAGMA journal_mode") != "wal") {
      writer_error = "pragmas: " + db.error();
      return;
    }
    const std::string payload(300, 'p');
    for (long id = 1; !stop.load(); id++) {
      if (db.exec("BEGIN IMMEDIATE") != SQLITE_OK) {
        writer_error = db.error();
        break;
      }
      if (db.exec("INSERT INTO t(id, payload) VALUES(" + std::to_string(id) + ",'" + payload + "')") != SQLITE_OK) {
        writer_error = db.error();
        db.exec("ROLLBACK");
        break;
      }
      if (db.exec("COMMIT") != SQLITE_OK) {
        writer_error = db.error();
        break;
      }
      committed = id;  // COMMIT returned: the transaction is acknowledged
    }
    db.close();
  });
  std::this_thread::sleep_for(2s);
  const long before_kill = committed.load();
  const pid_t pid = m.pid();
  ASSERT_GT(pid, 0);
  ASSERT_EQ(kill(pid, SIGKILL), 0) << errtext(errno);
  EXPECT_TRUE(repl::wait_dead(pid, 10s)) << "master daemon " << pid << " survived SIGKILL";
  // The writer's next statement fails on the dead mount.
  bool writer_failed = repl::wait_until([&] { return writer_done.load(); }, 10s);
  stop = true;
  writer.join();
  const long acked = committed.load();
  EXPECT_TRUE(writer_failed) << "the writer went on after the master died";
  EXPECT_NE(writer_error, "") << "no statement failed after the master was killed";
  EXPECT_GT(before_kill, 20) << "the writer committed too little in 2 s to mean anything";
  RecordProperty("committed", static_cast<int>(acked));
  c.detach(m);

  // Read-only before the promotion, writable after.
  EXPECT_EQ(try_create(s.file("probe-before")), EROFS);
  Promoted p = promote(s);
  ASSERT_TRUE(p.ok);
  EXPECT_EQ(try_create(s.file("probe-after")), 0) << "the promoted slave is still read-only";
  {
    Db db(s.file("app.db"), SQLITE_OPEN_READWRITE);
    ASSERT_TRUE(db.ok()) << db.error();
    sqlite3_busy_timeout(db.get(), 5000);
    EXPECT_EQ(db.rows("PRAGMA integrity_check"), "ok");
    EXPECT_EQ(db.rows("SELECT count(*) FROM t WHERE id <= " + std::to_string(acked)), std::to_string(acked))
        << "acknowledged transactions are missing on the promoted slave (acked up to id " << acked << ")";
    std::string max = db.rows("SELECT max(id) FROM t");
    std::string count = db.rows("SELECT count(*) FROM t");
    EXPECT_EQ(count, max) << "ids are not contiguous";
    long mx = atol(max.c_str());
    EXPECT_GE(mx, acked);
    EXPECT_LE(mx, acked + 1) << "more than the one transaction in flight appeared";
    EXPECT_EQ(db.exec("PRAGMA synchronous=FULL"), SQLITE_OK) << db.error();
    EXPECT_EQ(db.exec("INSERT INTO t(id, payload) VALUES(" + std::to_string(mx + 1) + ", 'after failover')"), SQLITE_OK)
        << db.error();
    EXPECT_EQ(db.rows("SELECT payload FROM t WHERE id = " + std::to_string(mx + 1)), "after failover");
    EXPECT_EQ(db.rows("PRAGMA integrity_check"), "ok");
  }
  double secs = secs_since(t0);
  RecordProperty("seconds", static_cast<int>(secs));
  EXPECT_LT(secs, 40);
}

// =============================================================================================
// 2. PostgreSQL on a sync master whose daemon is killed with SIGKILL mid-load: the promoted
//    slave's copy of the cluster recovers and holds every acknowledged transaction.

TEST(FailoverPostgres, KilledMasterPromotedSlaveRecoversEveryCommittedTransaction) {
  const std::string bindir = find_postgres_bindir();
  if (bindir.empty()) GTEST_SKIP() << postgres_missing_reason();
  auto t0 = Clock::now();
  Cluster c("fo-pg");
  chmod(c.path().c_str(), 0755);  // the postgres user must reach the mounts inside
  Node& m = c.add_master({"--ack", "sync"});
  ASSERT_TRUE(m.ok());
  Node& s = c.define_slave(m);
  s.data = c.private_data_dir("slave-vault");  // but nobody else the slave's backing directory
  ASSERT_TRUE(c.mount(s));
  // Declared after the Cluster: destroyed (servers stopped) before the mounts go away.
  PgServer pg(bindir, m.file("pgdata"), free_port());
  CommandResult r = pg.initdb();
  ASSERT_EQ(r.exit_code, 0) << "initdb on the master mount failed:\n" << r.out << r.err;
  r = pg.start();
  ASSERT_EQ(r.exit_code, 0) << "pg_ctl start failed:\n" << r.err << "\nserver log:\n" << pg.log_tail();
  r = pg.psql("CREATE TABLE t(id integer PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = pg.pgbench({"-i", "-s", "1", "-q"});
  ASSERT_EQ(r.exit_code, 0) << "pgbench -i failed:\n" << r.err << "\nserver log:\n" << pg.log_tail();
  const double setup_secs = secs_since(t0);

  std::atomic<bool> stop{false};
  std::atomic<long> acked{0};
  std::string insert_error;
  std::thread inserter([&] {
    for (long id = 1; !stop.load(); id++) {
      CommandResult q = pg.psql("INSERT INTO t(id) VALUES (" + std::to_string(id) + ")", "postgres", 20);
      if (q.exit_code != 0) {
        insert_error = "insert " + std::to_string(id) + ": " + q.err;
        break;
      }
      acked = id;  // psql returned success: the server acknowledged the COMMIT
    }
  });
  CommandResult bench;
  std::thread bencher([&] { bench = pg.pgbench({"-c", "2", "-j", "2", "-T", "30"}, "postgres", 60); });
  std::this_thread::sleep_for(3s);
  const long before_kill = acked.load();
  const pid_t pid = m.pid();
  ASSERT_GT(pid, 0);
  ASSERT_EQ(kill(pid, SIGKILL), 0) << errtext(errno);
  EXPECT_TRUE(repl::wait_dead(pid, 10s));
  stop = true;
  // PostgreSQL on the dead mount fails (or hangs in its I/O): kill it too.
  std::this_thread::sleep_for(300ms);
  pg.kill_all();
  inserter.join();
  bencher.join();
  const long committed = acked.load();
  RecordProperty("acknowledged_inserts", static_cast<int>(committed));
  EXPECT_GT(before_kill, 10) << "too few inserts before the kill to mean anything; last insert error: " << insert_error;
  EXPECT_NE(bench.exit_code, 0) << "pgbench finished normally although its server's file system died:\n" << bench.out;
  c.detach(m);

  Promoted p = promote(s);
  ASSERT_TRUE(p.ok);
  PgServer pg2(bindir, s.file("pgdata"), free_port());
  r = pg2.start(120);
  ASSERT_EQ(r.exit_code, 0) << "PostgreSQL did not recover on the promoted slave:\n" << r.err << "\nserver log:\n"
                            << pg2.log_tail();
  CommandResult ready = pg2.run_as_postgres({pg2.bin("pg_isready"), "-h", pg2.socket_dir(), "-p", std::to_string(pg2.port())});
  EXPECT_EQ(ready.exit_code, 0) << show(ready);
  EXPECT_EQ(pg2.query_value("SELECT count(*) FROM t WHERE id <= " + std::to_string(committed)), std::to_string(committed))
      << "acknowledged inserts are missing (acknowledged up to id " << committed << ")\nserver log:\n" << pg2.log_tail();
  std::string cm = pg2.query_value("SELECT count(*) || ',' || coalesce(max(id), 0) FROM t");
  long cnt = atol(cm.substr(0, cm.find(',')).c_str());
  long mx = atol(cm.substr(cm.find(',') + 1).c_str());
  EXPECT_EQ(cnt, mx) << "ids are not contiguous: " << cm;
  EXPECT_GE(mx, committed);
  EXPECT_LE(mx, committed + 1) << "more than the one insert in flight appeared: " << cm;
  // pgbench's transactions are atomic: every delta is in history, accounts, tellers and branches.
  std::string sums = pg2.query_value(
      "SELECT (SELECT coalesce(sum(abalance),0) FROM pgbench_accounts) || '|' || "
      "(SELECT coalesce(sum(bbalance),0) FROM pgbench_branches) || '|' || "
      "(SELECT coalesce(sum(tbalance),0) FROM pgbench_tellers) || '|' || "
      "(SELECT coalesce(sum(delta),0) FROM pgbench_history)");
  ASSERT_FALSE(sums.empty());
  std::string h = sums.substr(sums.rfind('|') + 1);
  EXPECT_EQ(sums, h + "|" + h + "|" + h + "|" + h) << "sum(abalance)|sum(bbalance)|sum(tbalance)|sum(delta) differ";
  EXPECT_EQ(pg2.query_value("SELECT count(*) FROM pgbench_accounts"), "100000");
  if (pg2.has_pg_amcheck()) {
    CommandResult a = pg2.pg_amcheck({"--heapallindexed"});
    EXPECT_EQ(a.exit_code, 0) << "pg_amcheck found problems:\n" << a.out << a.err;
  }
  // Writable: the recovered server takes new transactions.
  r = pg2.psql("INSERT INTO t(id) VALUES (" + std::to_string(mx + 1) + ")");
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(pg2.query_value("SELECT max(id) FROM t"), std::to_string(mx + 1));
  r = pg2.stop("fast");
  EXPECT_EQ(r.exit_code, 0) << "pg_ctl stop -m fast failed:\n" << r.err << "\nserver log:\n" << pg2.log_tail();
  double secs = secs_since(t0);
  RecordProperty("seconds", static_cast<int>(secs));
  RecordProperty("setup_seconds", static_cast<int>(setup_secs));
  EXPECT_LT(secs, 60);
}

// =============================================================================================
// 3. A former master (killed) mounted as a slave of the promoted node: refused without
//    --discard-my-data (nothing in its directory changes), rewritten to the new master with it.

TEST(FailoverDivergence, FormerMasterRefusedWithoutDiscardAndRewrittenWith) {
  auto t0 = Clock::now();
  Cluster c("fo-div");
  Node& a = c.add_master();
  ASSERT_TRUE(a.ok());
  Node& b = c.add_slave(a, {}, /*listen=*/true);
  ASSERT_TRUE(b.ok());
  ASSERT_EQ(mkdir(a.file("dir").c_str(), 0755), 0);
  for (int i = 0; i < 8; i++)
    ASSERT_EQ(put_file(a.file("dir/f" + std::to_string(i)), repl::random_bytes(100 + i, 50000 + i * 7000)), 0);
  ASSERT_EQ(put_file(a.file("big"), repl::random_bytes(7, 3 << 20)), 0);
  ASSERT_EQ(put_file(a.file("gone-later"), "x"), 0);
  {
    std::string why = repl::sync_and_wait(a.mnt, {b.mnt});
    ASSERT_EQ(why, "");
  }
  // A keeps writing a little after the last sync point (as a master does when it dies).
  {
    int fd = open(a.file("big").c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0);
    repl::pwrite_all(fd, repl::random_bytes(8, 8192), 4096 * 10);
    close(fd);
  }
  const pid_t pid = a.pid();
  ASSERT_GT(pid, 0);
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  ASSERT_TRUE(repl::wait_dead(pid, 10s));
  c.detach(a);

  Promoted p = promote(b);
  ASSERT_TRUE(p.ok);
  // The new master writes: changes, new files, removals.
  {
    int fd = open(b.file("big").c_str(), O_WRONLY | O_CLOEXEC);
    ASSERT_GE(fd, 0) << errtext(errno);
    for (int k = 0; k < 20; k++) repl::pwrite_all(fd, repl::random_bytes(1000 + k, 4096), 4096 * (k * 31 % 700));
    ASSERT_EQ(fsync(fd), 0);
    close(fd);
  }
  ASSERT_EQ(put_file(b.file("dir/new-on-b"), repl::random_bytes(55, 123456)), 0);
  ASSERT_EQ(put_file(b.file("dir/f3"), "rewritten on b"), 0);
  ASSERT_EQ(unlink(b.file("gone-later").c_str()), 0);
  ASSERT_EQ(repl::sync_point(b.mnt), "");

  // Refused: the former master may hold records past the fork.
  const auto before = repl::manifest(a.data);
  CommandResult r = run_blockrepl({"mount", "--data", a.data, "-v", "--log-file", a.log, "--master", b.address(), a.mnt}, 60);
  EXPECT_NE(r.exit_code, 0) << "a diverged former master was accepted as a slave: " << show(r);
  EXPECT_NE(r.err.find("diverged"), std::string::npos) << show(r);
  EXPECT_NE(r.err.find("forked"), std::string::npos) << show(r);
  EXPECT_NE(r.err.find("after lsn"), std::string::npos) << show(r);
  if (is_mounted(a.mnt)) {
    ADD_FAILURE() << "the refused mount is mounted";
    run_command({"fusermount3", "-u", "-z", a.mnt}, 30);
  }
  EXPECT_EQ(repl::manifest_diff(before, repl::manifest(a.data)), "") << "the refused mount changed the former master's data";

  // With --discard-my-data: rewritten by Merkle diff to the new master's state.
  a.master_address = b.address();
  a.port = 0;
  a.extra = {"--discard-my-data"};
  ASSERT_TRUE(c.mount(a));
  EXPECT_EQ(last_attach_method(a), "merkle");
  EXPECT_EQ(role_of(a.mnt), "slave");
  {
    std::string why = repl::sync_and_wait(b.mnt, {a.mnt});
    ASSERT_EQ(why, "");
  }
  EXPECT_EQ(repl::diff_report(b.data, a.data, {}, "new master", "former master"), "");
  EXPECT_EQ(lineage_of(a.mnt), lineage_of(b.mnt)) << "the rewritten node did not adopt the new master's history";
  EXPECT_EQ(read_file(a.file("dir/f3")), "rewritten on b");
  EXPECT_FALSE(exists(a.file("gone-later")));
  // And it keeps following: a change on B arrives.
  ASSERT_EQ(put_file(b.file("after-rejoin"), "hello"), 0);
  {
    std::string why = repl::sync_and_wait(b.mnt, {a.mnt});
    ASSERT_EQ(why, "");
  }
  EXPECT_EQ(repl::diff_report(b.data, a.data, {}, "new master", "former master"), "");
  double secs = secs_since(t0);
  RecordProperty("seconds", static_cast<int>(secs));
  EXPECT_LT(secs, 40);
}

// =============================================================================================
// 4. A -> B (listens) -> C: B is promoted; C keeps streaming, adopts B's new lineage, and after
//    an absence re-attaches to B by stream.

TEST(FailoverChain, DownstreamSlaveFollowsPromotionByStream) {
  auto t0 = Clock::now();
  Cluster c("fo-chain");
  Node& a = c.add_master();
  ASSERT_TRUE(a.ok());
  Node& b = c.add_slave(a, {}, /*listen=*/true);
  ASSERT_TRUE(b.ok());
  Node& cc = c.add_slave(b);
  ASSERT_TRUE(cc.ok());
  ASSERT_EQ(mkdir(a.file("d").c_str(), 0755), 0);
  for (int i = 0; i < 6; i++) ASSERT_EQ(put_file(a.file("d/f" + std::to_string(i)), repl::random_bytes(i, 30000 + i)), 0);
  {
    std::string why = repl::sync_and_wait(a.mnt, {b.mnt, cc.mnt});
    ASSERT_EQ(why, "");
  }
  c.unmount(a);
  ASSERT_FALSE(is_mounted(a.mnt));

  Promoted p = promote(b);
  ASSERT_TRUE(p.ok);
  // Promoting again is refused.
  CommandResult again = run_blockrepl({"promote", b.mnt});
  EXPECT_EQ(again.exit_code, 1) << show(again);
  EXPECT_NE(again.err.find("this node is already a master"), std::string::npos) << show(again);
  EXPECT_TRUE(one_line(again.err)) << show(again);
  EXPECT_EQ(again.out, "");

  // C keeps streaming from B across the promotion.
  ASSERT_EQ(put_file(b.file("d/after-promote"), repl::random_bytes(77, 70000)), 0);
  ASSERT_EQ(put_file(b.file("d/f2"), "changed on b"), 0);
  {
    std::string why = repl::sync_and_wait(b.mnt, {cc.mnt});
    ASSERT_EQ(why, "");
  }
  EXPECT_EQ(repl::diff_report(b.data, cc.data, {}, b.name, cc.name), "");
  auto adopt0 = Clock::now();
  bool adopted = repl::wait_until(
      [&] {
        auto l = lineage_of(cc.mnt);
        return !l.empty() && l.back() == p.lineage;
      },
      5s);
  EXPECT_TRUE(adopted) << "C's lineage " << join(lineage_of(cc.mnt)) << " does not end with B's new lineage " << p.lineage;
  RecordProperty("adopt_ms", static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - adopt0).count()));
  EXPECT_EQ(lineage_of(cc.mnt), lineage_of(b.mnt));
  EXPECT_EQ(role_of(cc.mnt), "slave");

  // C away while B writes more; back by stream.
  c.unmount(cc);
  ASSERT_FALSE(is_mounted(cc.mnt));
  ASSERT_EQ(put_file(b.file("d/while-c-away"), repl::random_bytes(78, 200000)), 0);
  ASSERT_EQ(unlink(b.file("d/f0").c_str()), 0);
  ASSERT_EQ(rename(b.file("d/f1").c_str(), b.file("d/f1-renamed").c_str()), 0);
  ASSERT_EQ(repl::sync_point(b.mnt), "");
  ASSERT_TRUE(c.mount(cc));
  EXPECT_EQ(last_attach_method(cc), "stream");
  {
    std::string why = repl::sync_and_wait(b.mnt, {cc.mnt});
    ASSERT_EQ(why, "");
  }
  EXPECT_EQ(repl::diff_report(b.data, cc.data, {}, b.name, cc.name), "");
  EXPECT_EQ(lineage_of(cc.mnt), lineage_of(b.mnt));
  double secs = secs_since(t0);
  RecordProperty("seconds", static_cast<int>(secs));
  EXPECT_LT(secs, 40);
}

// =============================================================================================
// 5. `blockrepl pull` killed at random early moments leaves the directory at its previous state
//    (or a committed switch that the next pull finishes); a later pull completes.

namespace {

// Changes `blocks` scattered 4 KiB blocks of `path` and fsyncs.
void scatter_writes(const std::string& path, uint64_t file_size, int blocks, uint64_t seed) {
  int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0) << path << ": " << errtext(errno);
  std::mt19937_64 rng(seed);
  for (int i = 0; i < blocks; i++) {
    off_t off = static_cast<off_t>((rng() % (file_size / 4096)) * 4096);
    repl::pwrite_all(fd, repl::random_bytes(rng(), 4096), off);
  }
  ASSERT_EQ(fsync(fd), 0) << errtext(errno);
  close(fd);
}

void insert_rows(const std::string& path, int from, int n) {
  Db db(path);
  ASSERT_TRUE(db.ok()) << db.error();
  ASSERT_EQ(db.rows("PRAGMA journal_mode=WAL"), "wal");
  ASSERT_EQ(db.exec("PRAGMA synchronous=FULL"), SQLITE_OK) << db.error();
  ASSERT_EQ(db.exec("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)"), SQLITE_OK) << db.error();
  for (int i = from; i < from + n; i += 50) {
    std::string sql = "BEGIN;";
    for (int k = i; k < std::min(i + 50, from + n); k++)
      sql += "INSERT INTO t VALUES(" + std::to_string(k) + ", '" + std::string(100 + k % 300, 'a' + k % 26) + "');";
    sql += "COMMIT;";
    ASSERT_EQ(db.exec(sql), SQLITE_OK) << db.error();
  }
  ASSERT_EQ(db.close(), SQLITE_OK);  // checkpoints the WAL into the database and removes it
}

}  // namespace

TEST(FailoverPull, InterruptedPullLeavesOldStateSecondPullCompletes) {
  auto t0 = Clock::now();
  Cluster c("fo-pull");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  constexpr uint64_t kBig = 256ull << 20;
  {
    int fd = open(m.file("big.bin").c_str(), O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
    ASSERT_GE(fd, 0);
    for (uint64_t off = 0; off < kBig; off += 4 << 20) repl::pwrite_all(fd, repl::random_bytes(off, 4 << 20), static_cast<off_t>(off));
    ASSERT_EQ(fsync(fd), 0);
    close(fd);
  }
  insert_rows(m.file("app.db"), 0, 2000);
  if (HasFatalFailure()) return;
  ASSERT_EQ(repl::sync_point(m.mnt), "");

  const std::string dir = c.path() + "/pulled";
  ASSERT_EQ(mkdir(dir.c_str(), 0755), 0);
  const std::string dir_real = real(dir);
  CommandResult r = run_blockrepl({"pull", m.address(), dir}, 180);
  ASSERT_EQ(r.exit_code, 0) << show(r);
  {
    std::regex re("^" + dir_real + R"(: pulled from \S+ by full at lsn \d+ \(.*\)\n$)");
    EXPECT_TRUE(std::regex_match(r.out, re)) << show(r);
    EXPECT_EQ(r.err, "");
  }
  ASSERT_EQ(repl::diff_report(m.data, dir, {}, "master", "pulled"), "");
  auto old_state = repl::manifest(dir);
  const std::string pull_log = c.path() + "/pull-output.log";

  int killed_mid = 0, old_seen = 0, new_seen = 0, commits_seen = 0, finished_early = 0;
  std::mt19937_64 rng(12345);
  // Epochs 0 and 1 after a master restart (no journal: the pull goes by Merkle diff), epoch 2
  // with the master's journal covering the directory (by stream, staged as well).
  for (int epoch = 0; epoch < 3; epoch++) {
    SCOPED_TRACE("epoch " + std::to_string(epoch));
    const bool merkle = epoch < 2;
    write_file(pull_log, "");
    scatter_writes(m.file("big.bin"), kBig, 3000, 99 + epoch);
    if (HasFatalFailure()) return;
    insert_rows(m.file("app.db"), 2000 + epoch * 1000, 1000);
    if (HasFatalFailure()) return;
    ASSERT_EQ(put_file(m.file("new-" + std::to_string(epoch)), repl::random_bytes(epoch, 5000)), 0);
    ASSERT_EQ(mkdir(m.file("dir-" + std::to_string(epoch)).c_str(), 0750), 0);
    ASSERT_EQ(put_file(m.file("dir-" + std::to_string(epoch) + "/inner"), repl::random_bytes(epoch + 10, 7000)), 0);
    if (epoch > 0) {
      ASSERT_EQ(unlink(m.file("new-" + std::to_string(epoch - 1)).c_str()), 0);
    }
    ASSERT_EQ(repl::sync_point(m.mnt), "");
    if (merkle) {
      // A restarted master's journal starts at its restart: the directory is behind it.
      c.unmount(m);
      ASSERT_TRUE(c.mount(m));
    }
    const auto new_state = repl::manifest(m.data);
    ASSERT_NE(repl::manifest_diff(old_state, new_state), "");
    // Early kills, then later and later ones until a pull gets through.
    std::vector<int> delays = {5, 20, 60};
    for (int d = 60, k = 0; k < 9; k++) delays.push_back(d += static_cast<int>(25 + rng() % 80));
    bool is_new = false;
    for (size_t round = 0; round < delays.size() && !is_new; round++) {
      const int ms = delays[round];
      SCOPED_TRACE("round " + std::to_string(round) + ", killed after " + std::to_string(ms) + " ms");
      pid_t pid = spawn({blockrepl_binary(), "pull", "-v", m.address(), dir}, pull_log);
      ASSERT_GT(pid, 0);
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));
      kill(pid, SIGKILL);
      int code = reap(pid);
      if (code == 128 + SIGKILL) killed_mid++;
      else finished_early++;
      EXPECT_TRUE(code == 0 || code == 128 + SIGKILL) << "pull exited " << code << "; output:\n" << read_file(pull_log);
      if (exists(dir + "/.blockrepl/stage/commit")) {
        // The switch was committed: the next pull finishes it before anything else.
        commits_seen++;
        continue;
      }
      auto now = repl::manifest(dir);
      if (now == old_state) {
        old_seen++;
      } else if (now == new_state) {
        is_new = true;
        new_seen++;
      } else {
        ADD_FAILURE() << "after a pull killed at " << ms << " ms (exit " << code
                      << ") the directory is neither the old state nor the new one.\n"
                      << "versus old:\n"
                      << repl::manifest_diff(old_state, now) << "versus new (the master's):\n"
                      << repl::manifest_diff(new_state, now) << "pull output:\n"
                      << read_file(pull_log);
        return;
      }
    }
    // Now one pull completes; in epoch 0 quietly.
    if (epoch == 0) {
      r = run_blockrepl({"pull", "-q", m.address(), dir}, 180);
      EXPECT_EQ(r.exit_code, 0) << show(r);
      EXPECT_EQ(r.out, "") << "pull -q printed something on success";
      EXPECT_EQ(r.err, "") << "pull -q printed something on success";
    } else {
      r = run_blockrepl({"pull", m.address(), dir}, 180);
      EXPECT_EQ(r.exit_code, 0) << show(r);
      std::regex re("^" + dir_real + R"(: pulled from \S+ by (full|stream|merkle) at lsn \d+ \(.*\)\n$)");
      EXPECT_TRUE(std::regex_match(r.out, re)) << show(r);
    }
    {
      // The way this epoch's changes came (from the killed pulls' logs or the last pull).
      std::string seen = read_file(pull_log) + r.out;
      const char* want = merkle ? "Merkle diff with" : "by stream";
      if (epoch != 0 || seen.find("attached to") != std::string::npos) {  // pull -q says nothing
        EXPECT_NE(seen.find(want), std::string::npos) << "no pull of this epoch went by " << (merkle ? "merkle" : "stream") << ":\n" << seen;
      }
    }
    EXPECT_FALSE(exists(dir + "/.blockrepl/stage/commit")) << "a committed stage is left after a complete pull";
    EXPECT_EQ(repl::diff_report(m.data, dir, {}, "master", "pulled"), "");
    {
      // immutable: reading must not leave -wal/-shm files behind in the pulled directory.
      Db db("file:" + dir + "/app.db?immutable=1", SQLITE_OPEN_READONLY | SQLITE_OPEN_URI);
      ASSERT_TRUE(db.ok()) << db.error();
      EXPECT_EQ(db.rows("PRAGMA integrity_check"), "ok");
      EXPECT_EQ(db.rows("SELECT count(*) FROM t"), std::to_string(3000 + epoch * 1000));
      EXPECT_EQ(db.rows("SELECT max(id) FROM t"), std::to_string(2999 + epoch * 1000));
    }
    old_state = repl::manifest(dir);
  }
  RecordProperty("killed_mid", killed_mid);
  RecordProperty("finished_before_kill", finished_early);
  RecordProperty("old_seen", old_seen);
  RecordProperty("new_seen", new_seen);
  RecordProperty("committed_seen", commits_seen);
  EXPECT_GT(killed_mid, 0) << "no pull was ever interrupted: the test did not test anything";
  double secs = secs_since(t0);
  RecordProperty("seconds", static_cast<int>(secs));
  EXPECT_LT(secs, 60);
}

// =============================================================================================
// 6. Operator mistakes: each is refused with exit 1, one line on stderr, and nothing changed.

TEST(FailoverBadInput, PromoteOnAMaster) {
  Cluster c("fo-bad-pm");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(put_file(m.file("f"), "x"), 0);
  auto before = lineage_of(m.mnt);
  CommandResult r = run_blockrepl({"promote", m.mnt});
  EXPECT_EQ(r.exit_code, 1) << show(r);
  EXPECT_NE(r.err.find("this node is already a master"), std::string::npos) << show(r);
  EXPECT_TRUE(one_line(r.err)) << show(r);
  EXPECT_EQ(r.out, "");
  EXPECT_EQ(lineage_of(m.mnt), before) << "a refused promote changed the lineage";
  EXPECT_EQ(role_of(m.mnt), "master");
  EXPECT_EQ(put_file(m.file("g"), "still writable"), 0);
}

TEST(FailoverBadInput, PromoteOnAPathThatIsNoMount) {
  TempDir tmp("fo-bad-pu");
  std::string d = tmp.sub("plain");
  CommandResult r = run_blockrepl({"promote", d});
  EXPECT_EQ(r.exit_code, 1) << show(r);
  EXPECT_TRUE(one_line(r.err)) << show(r);
  EXPECT_EQ(r.out, "");
  EXPECT_TRUE(list_dir(d).empty()) << "promote wrote into a plain directory";
  r = run_blockrepl({"promote", tmp.path() + "/missing"});
  EXPECT_EQ(r.exit_code, 1) << show(r);
  EXPECT_TRUE(one_line(r.err)) << show(r);
}

TEST(FailoverBadInput, PullRefusals) {
  Cluster c("fo-bad-pull");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  ASSERT_EQ(put_file(m.file("data"), repl::random_bytes(1, 100000)), 0);
  ASSERT_EQ(repl::sync_point(m.mnt), "");

  auto refused = [&](const std::vector<std::string>& args, const std::string& target, const std::string& needle,
                     bool target_exists) {
    SCOPED_TRACE("blockrepl pull " + join(args));
    std::map<std::string, std::string> before;
    std::set<std::string> names_before;
    if (target_exists) {
      before = repl::manifest(target);
      names_before = list_dir(target);
    }
    CommandResult r = run_blockrepl(args, 60);
    EXPECT_EQ(r.exit_code, 1) << show(r);
    EXPECT_TRUE(one_line(r.err)) << "not exactly one line on stderr: " << show(r);
    EXPECT_EQ(r.out, "") << show(r);
    if (!needle.empty()) {
      EXPECT_NE(r.err.find(needle), std::string::npos) << show(r);
    }
    if (target_exists) {
      EXPECT_EQ(repl::manifest_diff(before, repl::manifest(target)), "") << "the refused pull changed " << target;
      EXPECT_EQ(join(std::vector<std::string>(names_before.begin(), names_before.end())),
                join([&] {
                  auto n = list_dir(target);
                  return std::vector<std::string>(n.begin(), n.end());
                }()))
          << "the refused pull added or removed entries in " << target;
    } else {
      EXPECT_FALSE(exists(target)) << "the refused pull created " << target;
    }
  };

  // A directory holding files that are no blockrepl volume.
  std::string foreign = c.path() + "/foreign";
  ASSERT_EQ(mkdir(foreign.c_str(), 0755), 0);
  write_file(foreign + "/precious.txt", "not a replica");
  ASSERT_EQ(mkdir((foreign + "/sub").c_str(), 0755), 0);
  write_file(foreign + "/sub/more", "more");
  refused({"pull", m.address(), foreign}, foreign, "holds files that are not a blockrepl volume", true);
  // The data directory of a running mount.
  refused({"pull", m.address(), m.data}, m.data, "already in use", true);
  // A mount point.
  refused({"pull", m.address(), m.mnt}, m.mnt, "is a mount point", true);
  // A missing directory.
  refused({"pull", m.address(), c.path() + "/missing"}, c.path() + "/missing", "", false);
  // An unreachable master, into an earlier pull: it stays as it was.
  std::string earlier = c.path() + "/earlier";
  ASSERT_EQ(mkdir(earlier.c_str(), 0755), 0);
  {
    CommandResult r = run_blockrepl({"pull", "-q", m.address(), earlier}, 60);
    ASSERT_EQ(r.exit_code, 0) << show(r);
    ASSERT_EQ(repl::diff_report(m.data, earlier), "");
  }
  const std::string nowhere = "127.0.0.1:" + std::to_string(free_port());
  auto t0 = Clock::now();
  refused({"pull", nowhere, earlier}, earlier, "", true);
  EXPECT_LT(secs_since(t0), 40) << "pull from an unreachable master took too long";
  // And into an empty directory: nothing but (at most) the metadata folder appears.
  std::string empty = c.path() + "/empty";
  ASSERT_EQ(mkdir(empty.c_str(), 0755), 0);
  {
    CommandResult r = run_blockrepl({"pull", nowhere, empty}, 60);
    EXPECT_EQ(r.exit_code, 1) << show(r);
    EXPECT_TRUE(one_line(r.err)) << show(r);
    EXPECT_EQ(r.out, "");
    for (auto& n : list_dir(empty)) EXPECT_EQ(n, ".blockrepl") << "a failed pull left " << n << " in " << empty;
  }
  // The earlier pull still updates normally afterwards.
  ASSERT_EQ(put_file(m.file("later"), "later"), 0);
  ASSERT_EQ(repl::sync_point(m.mnt), "");
  CommandResult r = run_blockrepl({"pull", m.address(), earlier}, 60);
  EXPECT_EQ(r.exit_code, 0) << show(r);
  EXPECT_EQ(repl::diff_report(m.data, earlier), "");
}

TEST(FailoverBadInput, DiscardMyDataOnASlaveThatHasNotDivergedIsHarmless) {
  Cluster c("fo-bad-discard");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(put_file(m.file("a"), repl::random_bytes(3, 200000)), 0);
  {
    std::string why = repl::sync_and_wait(m.mnt, {s.mnt});
    ASSERT_EQ(why, "");
  }
  c.unmount(s);
  ASSERT_EQ(put_file(m.file("b"), repl::random_bytes(4, 50000)), 0);
  ASSERT_EQ(repl::sync_point(m.mnt), "");
  s.extra = {"--discard-my-data"};
  ASSERT_TRUE(c.mount(s));
  {
    std::string why = repl::sync_and_wait(m.mnt, {s.mnt});
    ASSERT_EQ(why, "");
  }
  EXPECT_EQ(last_attach_method(s), "stream") << "nothing was to be discarded: the journal covers the slave";
  EXPECT_EQ(repl::diff_report(m.data, s.data, {}, "master", "slave"), "");
  bool logged = repl::wait_until([&] { return c.log_tail(s, 1 << 20).find("has not diverged") != std::string::npos; }, 5s);
  EXPECT_TRUE(logged) << "the slave's --log-file " << s.log << " does not say it has not diverged:\n"
                      << c.log_tail(s) << "\n(the mount command's stderr was: " << (s.mount ? s.mount->error() : "?") << ")";
}

}  // namespace blockrepl::test
