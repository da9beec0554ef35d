// Real database engines on a blockrepl mount: SQLite (WAL and rollback journal, threads and
// processes, POSIX locks, shared-memory mmap) and PostgreSQL (pgbench) where installed. Each
// test checks the engine's own integrity check and exact contents on the mount, then again on
// the backing directory after unmounting.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <regex>
#include <string>
#include <sys/stat.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "harness.h"
#include "pg_helper.h"

namespace blockrepl::test {
namespace {

// ---------------------------------------------------------------------------------------------
// SQLite helpers

// A connection that is always closed; every failure is reported with SQLite's message.
class Db {
 public:
  explicit Db(const std::string& path, int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE) {
    rc_ = sqlite3_open_v2(path.c_str(), &db_, flags | SQLITE_OPEN_NOMUTEX, nullptr);
    if (rc_ != SQLITE_OK) error_ = (db_ ? sqlite3_errmsg(db_) : sqlite3_errstr(rc_)) + sys_error() + " opening " + path;
  }
  ~Db() { close(); }
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  bool ok() const { return rc_ == SQLITE_OK; }
  const std::string& error() const { return error_; }
  sqlite3* get() { return db_; }
  int close() {
    int rc = SQLITE_OK;
    if (db_) rc = sqlite3_close(db_);
    db_ = nullptr;
    return rc;
  }
  // The errno behind the last failure, if any (e.g. why a file could not be opened).
  std::string sys_error() const {
    int e = db_ ? sqlite3_system_errno(db_) : 0;
    return e ? " (errno " + std::to_string(e) + ": " + strerror(e) + ")" : "";
  }
  // Runs SQL, returns the SQLite result code (error message in error()).
  int exec(const std::string& sql) {
    char* msg = nullptr;
    int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &msg);
    if (rc != SQLITE_OK) error_ = std::string(msg ? msg : sqlite3_errstr(rc)) + sys_error() + " [" + sql + "]";
    sqlite3_free(msg);
    return rc;
  }
  // First column of the first row as text ("" if no row); rc receives the result code.
  std::string value(const std::string& sql, int* rc_out = nullptr) {
    sqlite3_stmt* st = nullptr;
    int rc = sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr);
    std::string v;
    if (rc == SQLITE_OK) {
      rc = sqlite3_step(st);
      if (rc == SQLITE_ROW) {
        const unsigned char* t = sqlite3_column_text(st, 0);
        v = t ? reinterpret_cast<const char*>(t) : "";
        rc = SQLITE_OK;
      } else if (rc == SQLITE_DONE) {
        rc = SQLITE_OK;
      }
    }
    if (rc != SQLITE_OK) error_ = std::string(sqlite3_errmsg(db_)) + sys_error() + " [" + sql + "]";
    sqlite3_finalize(st);
    if (rc_out) *rc_out = rc;
    return v;
  }
  // All rows of the first column, joined by '\n' (integrity_check may return many).
  std::string rows(const std::string& sql) {
    sqlite3_stmt* st = nullptr;
    std::string out;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) != SQLITE_OK) return "prepare failed: " + std::string(sqlite3_errmsg(db_));
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
      if (!out.empty()) out += "\n";
      const unsigned char* t = sqlite3_column_text(st, 0);
      out += t ? reinterpret_cast<const char*>(t) : "NULL";
    }
    if (rc != SQLITE_DONE) out += "\nstep failed: " + std::string(sqlite3_errmsg(db_));
    sqlite3_finalize(st);
    return out;
  }

 private:
  sqlite3* db_ = nullptr;
  int rc_ = SQLITE_OK;
  std::string error_;
};

bool is_busy(int rc) { return (rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED; }

// Sets the journal mode and synchronous=FULL on `db` and checks they really took effect.
void configure(Db& db, const std::string& journal_mode, int busy_ms) {
  ASSERT_EQ(sqlite3_busy_timeout(db.get(), busy_ms), SQLITE_OK);
  int rc = SQLITE_OK;
  std::string mode;
  // Switching the journal mode needs an exclusive lock: retry while another connection holds one.
  for (int i = 0; i < 200; i++) {
    mode = db.value("PRAGMA journal_mode=" + journal_mode, &rc);
    if (!is_busy(rc)) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(rc, SQLITE_OK) << db.error();
  std::string want = journal_mode;
  for (auto& c : want) c = static_cast<char>(tolower(c));
  ASSERT_EQ(mode, want) << "journal_mode did not take effect";
  ASSERT_EQ(db.exec("PRAGMA synchronous=FULL"), SQLITE_OK) << db.error();
  ASSERT_EQ(db.value("PRAGMA synchronous"), "2") << "synchronous=FULL did not take effect";
  ASSERT_EQ(db.value("PRAGMA journal_mode"), want);
}

// One single-insert transaction (BEGIN IMMEDIATE; INSERT; COMMIT), retried while busy.
// Returns "" on success, else the error.
std::string insert_row(Db& db, int writer, int seq, int* busy_retries) {
  const std::string payload(200, static_cast<char>('a' + writer % 26));
  for (int attempt = 0; attempt < 1000; attempt++) {
    int rc = db.exec("BEGIN IMMEDIATE");
    if (is_busy(rc)) {
      (*busy_retries)++;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    if (rc != SQLITE_OK) return db.error();
    rc = db.exec("INSERT INTO t(writer, seq, payload) VALUES(" + std::to_string(writer) + "," +
                 std::to_string(seq) + ",'" + payload + "')");
    if (rc != SQLITE_OK) {
      std::string e = db.error();
      db.exec("ROLLBACK");
      return e;
    }
    // COMMIT can be busy in rollback-journal mode (readers hold SHARED): retry the COMMIT itself.
    for (int c = 0; c < 1000; c++) {
      rc = db.exec("COMMIT");
      if (!is_busy(rc)) break;
      (*busy_retries)++;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    if (rc != SQLITE_OK) {
      std::string e = db.error();
      db.exec("ROLLBACK");
      return e;
    }
    return "";
  }
  return "still busy after 1000 attempts";
}

// Checks, through `db`, integrity and that writer w holds exactly rows seq 0..per_writer-1.
void check_contents(Db& db, int writers, int per_writer, const std::string& where) {
  SCOPED_TRACE(where);
  EXPECT_EQ(db.rows("PRAGMA integrity_check"), "ok");
  EXPECT_EQ(db.value("SELECT count(*) FROM t"), std::to_string(writers * per_writer)) << db.error();
  for (int w = 0; w < writers; w++) {
    std::string q = "SELECT count(*) || ',' || count(DISTINCT seq) || ',' || min(seq) || ',' || max(seq) FROM t WHERE writer=" +
                    std::to_string(w);
    EXPECT_EQ(db.value(q), std::to_string(per_writer) + "," + std::to_string(per_writer) + ",0," +
                               std::to_string(per_writer - 1))
        << "writer " << w << " (count, distinct, min, max) " << db.error();
  }
}

// Reader loop: while `stop` is false, counts rows per writer and checks that every writer's
// rows form a prefix 0..n-1 (commits are never seen out of order or partially) and that the
// total never goes down. Returns "" or the first problem seen.
std::string reader_loop(const std::string& path, const std::string& journal_mode, int writers, int per_writer,
                        const std::atomic<bool>& stop, std::atomic<long>& reads) {
  Db db(path, SQLITE_OPEN_READWRITE);
  if (!db.ok()) return "reader open: " + db.error();
  sqlite3_busy_timeout(db.get(), 30000);
  db.exec("PRAGMA mmap_size=67108864");  // also read the main database through a shared mapping
  long last_total = 0;
  while (!stop.load()) {
    sqlite3_stmt* st = nullptr;
    int rc = sqlite3_prepare_v2(db.get(), "SELECT writer, count(*), max(seq) FROM t GROUP BY writer", -1, &st, nullptr);
    if (rc != SQLITE_OK) {
      if (is_busy(rc)) continue;
      return "reader prepare: " + std::string(sqlite3_errmsg(db.get()));
    }
    long total = 0;
    std::string problem;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
      long w = sqlite3_column_int64(st, 0), n = sqlite3_column_int64(st, 1), mx = sqlite3_column_int64(st, 2);
      total += n;
      if (w < 0 || w >= writers || n != mx + 1 || n > per_writer)
        problem = "writer " + std::to_string(w) + ": " + std::to_string(n) + " rows but max seq " + std::to_string(mx);
    }
    sqlite3_finalize(st);
    if (is_busy(rc)) continue;  // rollback-journal mode: a writer held the lock past the timeout
    if (rc != SQLITE_DONE) return "reader step: " + std::string(sqlite3_errmsg(db.get())) + " (" + journal_mode + ")";
    if (!problem.empty()) return problem;
    if (total < last_total)
      return "row count went down from " + std::to_string(last_total) + " to " + std::to_string(total);
    last_total = total;
    reads++;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return "";
}

void create_table(Db& db) {
  ASSERT_EQ(db.exec("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, writer INTEGER NOT NULL, "
                    "seq INTEGER NOT NULL, payload TEXT, UNIQUE(writer, seq))"),
            SQLITE_OK)
      << db.error();
}

// Threads, each with its own connection, write concurrently while a reader counts; then the
// database is checked on the mount and, after unmounting, in the backing directory.
void run_sqlite_threads(const std::string& journal_mode, int writers, int per_writer) {
  TempDir tmp("sqlite");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  Mount m(data, mnt);
  ASSERT_TRUE(m.ok()) << m.error();
  const std::string path = m.file("test.db");
  {
    Db setup(path);
    ASSERT_TRUE(setup.ok()) << setup.error();
    configure(setup, journal_mode, 30000);
    if (::testing::Test::HasFatalFailure()) return;
    create_table(setup);
    if (::testing::Test::HasFatalFailure()) return;

    std::atomic<bool> stop{false};
    std::atomic<long> reads{0};
    std::vector<std::string> errors(writers);
    std::vector<int> busy(writers, 0);
    std::string reader_error;
    std::thread reader([&] { reader_error = reader_loop(path, journal_mode, writers, per_writer, stop, reads); });
    std::vector<std::thread> threads;
    for (int w = 0; w < writers; w++) {
      threads.emplace_back([&, w] {
        Db db(path, SQLITE_OPEN_READWRITE);
        if (!db.ok()) {
          errors[w] = "open: " + db.error();
          return;
        }
        sqlite3_busy_timeout(db.get(), 30000);
        if (db.exec("PRAGMA synchronous=FULL") != SQLITE_OK || db.value("PRAGMA synchronous") != "2" ||
            db.value("PRAGMA journal_mode") != journal_mode) {
          errors[w] = "pragmas did not take effect on writer connection: " + db.error();
          return;
        }
        for (int i = 0; i < per_writer; i++) {
          std::string e = insert_row(db, w, i, &busy[w]);
          if (!e.empty()) {
            errors[w] = "insert " + std::to_string(i) + ": " + e;
            return;
          }
        }
        if (db.close() != SQLITE_OK) errors[w] = "close failed";
      });
    }
    // While they run: WAL mode must use the -wal file and the -shm shared memory on the mount.
    if (journal_mode == "wal") {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      struct stat st;
      EXPECT_EQ(stat((path + "-wal").c_str(), &st), 0) << "no -wal file on the mount";
      EXPECT_EQ(stat((path + "-shm").c_str(), &st), 0) << "no -shm file on the mount";
    }
    for (auto& t : threads) t.join();
    stop = true;
    reader.join();
    for (int w = 0; w < writers; w++) EXPECT_EQ(errors[w], "") << "writer " << w;
    EXPECT_EQ(reader_error, "");
    EXPECT_GT(reads.load(), 0) << "the reader never completed a query";
    int total_busy = 0;
    for (int b : busy) total_busy += b;
    ::testing::Test::RecordProperty("busy_retries", total_busy);
    ::testing::Test::RecordProperty("reads", static_cast<int>(reads.load()));
    check_contents(setup, writers, per_writer, "on the mount, before closing");
    ASSERT_EQ(setup.close(), SQLITE_OK);
  }
  // Reopened on the mount: still all there (and still in the same journal mode).
  {
    Db db(path, SQLITE_OPEN_READWRITE);
    ASSERT_TRUE(db.ok()) << db.error();
    EXPECT_EQ(db.value("PRAGMA journal_mode"), journal_mode);
    check_contents(db, writers, per_writer, "on the mount, reopened");
  }
  struct stat st;
  EXPECT_NE(stat((path + "-journal").c_str(), &st), 0) << "a -journal file was left behind (hot journal)";
  m.unmount();
  ASSERT_FALSE(is_mounted(mnt));
  // The backing directory holds the same database, intact.
  {
    Db db(data + "/test.db", SQLITE_OPEN_READWRITE);
    ASSERT_TRUE(db.ok()) << db.error();
    EXPECT_EQ(db.value("PRAGMA journal_mode"), journal_mode);
    check_contents(db, writers, per_writer, "in the backing directory after unmount");
  }
}

// Waits for a child process; returns its exit status or -1.
int wait_child(pid_t pid, int timeout_sec) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_sec);
  for (;;) {
    int status = 0;
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (r < 0) return -1;
    if (std::chrono::steady_clock::now() > deadline) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

// Kills and reaps child processes if the test bails out early.
struct Children {
  std::vector<pid_t> pids;
  ~Children() {
    for (pid_t p : pids) {
      kill(p, SIGKILL);
      int s;
      waitpid(p, &s, 0);
    }
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------

TEST(DatabaseSqlite, WalThreadsConcurrentWritersAndReader) {
  run_sqlite_threads("wal", 2, 2000);
}

TEST(DatabaseSqlite, RollbackJournalThreadsConcurrentWritersAndReader) {
  run_sqlite_threads("delete", 2, 300);
}

// Separate processes share the WAL index (-shm) only through the kernel: a shared mmap of a
// file on the mount, and POSIX locks on it. Threads of one process would share one mapping.
TEST(DatabaseSqlite, WalProcessesConcurrentWritersAndReader) {
  constexpr int kWriters = 2, kPerWriter = 1000;
  TempDir tmp("sqlite-proc");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  Mount m(data, mnt);
  ASSERT_TRUE(m.ok()) << m.error();
  const std::string path = m.file("test.db");
  {
    // Created and configured in a child, so this process holds no SQLite state for the file
    // when it forks (SQLite connections must not cross fork()).
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      Db db(path);
      if (!db.ok() || db.value("PRAGMA journal_mode=WAL") != "wal") {
        fprintf(stderr, "creator: %s\n", db.error().c_str());
        _exit(2);
      }
      if (db.exec("CREATE TABLE t(id INTEGER PRIMARY KEY, writer INTEGER NOT NULL, seq INTEGER NOT NULL, payload TEXT, "
                  "UNIQUE(writer, seq))") != SQLITE_OK)
        _exit(3);
      _exit(db.close() == SQLITE_OK ? 0 : 4);
    }
    ASSERT_EQ(wait_child(pid, 60), 0) << "creating the database failed";
  }
  Children children;
  int go[2];
  ASSERT_EQ(pipe(go), 0);
  for (int w = 0; w < kWriters; w++) {
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      close(go[1]);
      char c;
      if (read(go[0], &c, 1) < 0) _exit(10);  // start together (EOF when the parent closes)
      Db db(path, SQLITE_OPEN_READWRITE);
      if (!db.ok()) {
        fprintf(stderr, "writer %d: %s\n", w, db.error().c_str());
        _exit(11);
      }
      sqlite3_busy_timeout(db.get(), 30000);
      if (db.exec("PRAGMA synchronous=FULL") != SQLITE_OK || db.value("PRAGMA synchronous") != "2" ||
          db.value("PRAGMA journal_mode") != "wal")
        _exit(12);
      int busy = 0;
      for (int i = 0; i < kPerWriter; i++) {
        std::string e = insert_row(db, w, i, &busy);
        if (!e.empty()) {
          fprintf(stderr, "writer %d insert %d: %s\n", w, i, e.c_str());
          _exit(13);
        }
      }
      _exit(db.close() == SQLITE_OK ? 0 : 14);
    }
    children.pids.push_back(pid);
  }
  close(go[0]);
  close(go[1]);
  std::atomic<bool> stop{false};
  std::atomic<long> reads{0};
  std::string reader_error;
  std::thread reader([&] { reader_error = reader_loop(path, "wal", kWriters, kPerWriter, stop, reads); });
  for (size_t i = 0; i < children.pids.size(); i++) {
    EXPECT_EQ(wait_child(children.pids[i], 300), 0) << "writer process " << i << " failed (exit codes: 11 open, 12 "
                                                       "pragmas, 13 insert, 14 close, -1 timeout)";
  }
  children.pids.clear();
  stop = true;
  reader.join();
  EXPECT_EQ(reader_error, "");
  EXPECT_GT(reads.load(), 0);
  {
    Db db(path, SQLITE_OPEN_READWRITE);
    ASSERT_TRUE(db.ok()) << db.error();
    check_contents(db, kWriters, kPerWriter, "on the mount");
  }
  m.unmount();
  ASSERT_FALSE(is_mounted(mnt));
  Db db(data + "/test.db", SQLITE_OPEN_READWRITE);
  ASSERT_TRUE(db.ok()) << db.error();
  EXPECT_EQ(db.value("PRAGMA journal_mode"), "wal");
  check_contents(db, kWriters, kPerWriter, "in the backing directory after unmount");
}

// POSIX record locks on the mount are seen by other processes (SQLite's locking relies on it).
TEST(DatabaseSqlite, PosixLocksWorkAcrossProcesses) {
  TempDir tmp("sqlite-lock");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  Mount m(data, mnt);
  ASSERT_TRUE(m.ok()) << m.error();
  const std::string path = m.file("locked.db");
  {
    Db db(path);
    ASSERT_TRUE(db.ok()) << db.error();
    ASSERT_EQ(db.exec("PRAGMA journal_mode=DELETE; CREATE TABLE t(x); INSERT INTO t VALUES(1)"), SQLITE_OK) << db.error();
  }
  int ready[2], release[2];
  ASSERT_EQ(pipe(ready), 0);
  ASSERT_EQ(pipe(release), 0);
  Children children;
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(ready[0]);
    close(release[1]);
    Db db(path, SQLITE_OPEN_READWRITE);
    if (!db.ok() || db.exec("BEGIN EXCLUSIVE") != SQLITE_OK || db.exec("INSERT INTO t VALUES(2)") != SQLITE_OK) {
      fprintf(stderr, "lock holder: %s\n", db.error().c_str());
      _exit(2);
    }
    // Also a plain fcntl lock on a separate file, to check F_GETLK reports the holder.
    int fd = open((path + ".lck").c_str(), O_RDWR | O_CREAT, 0644);
    struct flock fl{};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 0;
    fl.l_len = 100;
    if (fd < 0 || fcntl(fd, F_SETLK, &fl) != 0) _exit(3);
    if (write(ready[1], "r", 1) != 1) _exit(4);
    char c;
    if (read(release[0], &c, 1) < 0) _exit(5);
    _exit(db.exec("COMMIT") == SQLITE_OK ? 0 : 6);
  }
  children.pids.push_back(pid);
  close(ready[1]);
  close(release[0]);
  char c;
  if (read(ready[0], &c, 1) != 1) {
    int code = wait_child(pid, 30);
    children.pids.clear();
    FAIL() << "the child process could not take its locks (exit " << code
           << "; 2: open/BEGIN EXCLUSIVE/INSERT failed, 3: fcntl F_SETLK failed)";
  }
  {
    int fd = open((path + ".lck").c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    struct flock fl{};
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 10;
    fl.l_len = 1;
    EXPECT_EQ(fcntl(fd, F_GETLK, &fl), 0) << strerror(errno);
    EXPECT_EQ(fl.l_type, F_WRLCK) << "F_GETLK does not see the other process's write lock";
    EXPECT_EQ(fl.l_pid, pid) << "F_GETLK reports the wrong holder";
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = 10;
    fl.l_len = 1;
    EXPECT_EQ(fcntl(fd, F_SETLK, &fl), -1) << "a conflicting lock was granted";
    EXPECT_TRUE(errno == EAGAIN || errno == EACCES) << strerror(errno);
    close(fd);
  }
  {
    Db db(path, SQLITE_OPEN_READWRITE);
    ASSERT_TRUE(db.ok());
    sqlite3_busy_timeout(db.get(), 0);
    int rc = SQLITE_OK;
    db.value("SELECT count(*) FROM t", &rc);
    EXPECT_TRUE(is_busy(rc)) << "read while another process holds an EXCLUSIVE lock returned " << rc
                             << " (locks on the mount are not seen across processes)";
  }
  ASSERT_EQ(write(release[1], "g", 1), 1);
  close(release[1]);
  close(ready[0]);
  EXPECT_EQ(wait_child(pid, 60), 0);
  children.pids.clear();
  Db db(path, SQLITE_OPEN_READWRITE);
  ASSERT_TRUE(db.ok());
  sqlite3_busy_timeout(db.get(), 5000);
  EXPECT_EQ(db.value("SELECT group_concat(x) FROM (SELECT x FROM t ORDER BY x)"), "1,2");
  EXPECT_EQ(db.rows("PRAGMA integrity_check"), "ok");
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

namespace {

long parse_long_after(const std::string& text, const std::string& label) {
  std::smatch mt;
  std::regex re(label + R"(:\s*(\d+))");
  if (std::regex_search(text, mt, re)) return std::stol(mt[1]);
  return -1;
}

// pgbench's invariants: every transaction adds delta to one account, teller and branch and
// logs it once in history.
void check_pgbench_consistency(PgServer& pg, long expected_history_rows, const std::string& where) {
  SCOPED_TRACE(where);
  std::string sums = pg.query_value(
      "SELECT (SELECT coalesce(sum(abalance),0) FROM pgbench_accounts) || '|' || "
      "(SELECT coalesce(sum(bbalance),0) FROM pgbench_branches) || '|' || "
      "(SELECT coalesce(sum(tbalance),0) FROM pgbench_tellers) || '|' || "
      "(SELECT coalesce(sum(delta),0) FROM pgbench_history)");
  ASSERT_FALSE(sums.empty());
  std::string h = sums.substr(sums.rfind('|') + 1);
  EXPECT_EQ(sums, h + "|" + h + "|" + h + "|" + h) << "sum(abalance)|sum(bbalance)|sum(tbalance)|sum(delta) differ";
  EXPECT_EQ(pg.query_value("SELECT count(*) FROM pgbench_accounts"), "200000");
  EXPECT_EQ(pg.query_value("SELECT count(*) FROM pgbench_branches"), "2");
  if (expected_history_rows >= 0) {
    EXPECT_EQ(pg.query_value("SELECT count(*) FROM pgbench_history"), std::to_string(expected_history_rows))
        << "history rows != transactions pgbench reported as processed";
  }
  if (pg.has_pg_amcheck()) {
    CommandResult r = pg.pg_amcheck({"--heapallindexed", "--rootdescend"});
    EXPECT_EQ(r.exit_code, 0) << "pg_amcheck found problems:\n" << r.out << r.err;
    EXPECT_EQ(r.out, "") << "pg_amcheck reported:\n" << r.out;
  } else {
    ASSERT_EQ(pg.psql("CREATE EXTENSION IF NOT EXISTS amcheck").exit_code, 0);
    EXPECT_EQ(pg.query_value("SELECT count(*) FROM (SELECT bt_index_check(c.oid, true) FROM pg_index i JOIN pg_class c "
                             "ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' "
                             "AND c.relpersistence <> 't') s"),
              pg.query_value("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a "
                             "ON a.oid = c.relam WHERE a.amname = 'btree' AND c.relpersistence <> 't'"));
  }
}

}  // namespace

TEST(DatabasePostgres, PgbenchOnMountIsConsistent) {
  const std::string bindir = find_postgres_bindir();
  if (bindir.empty()) GTEST_SKIP() << postgres_missing_reason();
  auto t0 = std::chrono::steady_clock::now();
  TempDir tmp("pg");
  chmod(tmp.path().c_str(), 0755);  // the postgres user must reach the mount inside
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  Mount m(data, mnt);
  ASSERT_TRUE(m.ok()) << m.error();
  long processed = -1;
  {
    // Declared after the Mount: destroyed (server stopped) before the mount goes away.
    PgServer pg(bindir, m.file("pgdata"), free_port());
    CommandResult r = pg.initdb();
    ASSERT_EQ(r.exit_code, 0) << "initdb on the mount failed:\n" << r.out << r.err;
    r = pg.start();
    ASSERT_EQ(r.exit_code, 0) << "pg_ctl start failed:\n" << r.err << "\nserver log:\n" << pg.log_tail();
    r = pg.pgbench({"-i", "-s", "2", "-q"});
    ASSERT_EQ(r.exit_code, 0) << "pgbench -i failed:\n" << r.err << "\nserver log:\n" << pg.log_tail();
    r = pg.pgbench({"-c", "2", "-j", "2", "-T", "8"}, "postgres", 120);
    ASSERT_EQ(r.exit_code, 0) << "pgbench failed:\n" << r.out << r.err << "\nserver log:\n" << pg.log_tail();
    processed = parse_long_after(r.out, "number of transactions actually processed");
    ASSERT_GT(processed, 0) << r.out;
    long failed = parse_long_after(r.out, "number of failed transactions");
    if (failed >= 0) {
      EXPECT_EQ(failed, 0) << r.out;
    }
    ::testing::Test::RecordProperty("pgbench_transactions", static_cast<int>(processed));
    check_pgbench_consistency(pg, processed, "on the mount, after pgbench");
    r = pg.stop("fast");
    ASSERT_EQ(r.exit_code, 0) << "pg_ctl stop -m fast failed:\n" << r.err << "\nserver log:\n" << pg.log_tail();
    // A restart on the mount finds everything (clean shutdown checkpoint readable).
    r = pg.start();
    ASSERT_EQ(r.exit_code, 0) << "restart failed:\n" << r.err << "\nserver log:\n" << pg.log_tail();
    check_pgbench_consistency(pg, processed, "on the mount, after a restart");
    r = pg.stop("fast");
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  m.unmount();
  ASSERT_FALSE(is_mounted(mnt));
  {
    // The backing directory is a valid cluster by itself.
    PgServer pg(bindir, data + "/pgdata", free_port());
    CommandResult r = pg.start();
    ASSERT_EQ(r.exit_code, 0) << "start on the backing directory failed:\n" << r.err << "\nserver log:\n" << pg.log_tail();
    check_pgbench_consistency(pg, processed, "in the backing directory after unmount");
    r = pg.stop("fast");
    EXPECT_EQ(r.exit_code, 0) << r.err;
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  RecordProperty("seconds", static_cast<int>(secs));
  EXPECT_LT(secs, 90) << "the PostgreSQL test should stay around a minute";
}

}  // namespace blockrepl::test
