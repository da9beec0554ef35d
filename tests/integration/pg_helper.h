// Runs a throw-away PostgreSQL server on a directory (usually on a blockrepl mount) for
// integration tests: initdb, start, psql, pgbench, pg_amcheck, stop.
//
// The server runs as the `postgres` user (Debian's packages create it). It listens on a unix
// socket only, in a private temporary directory that also holds the server log, so parallel
// test runs never collide. The destructor always stops a server this object started
// (pg_ctl stop -m immediate, then SIGKILL of every process still working in the data
// directory), so declare a PgServer AFTER the Mount that holds its data directory: it is then
// destroyed first, and the mount can be unmounted.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "harness.h"

namespace blockrepl::test {

// Directory with PostgreSQL's server binaries (initdb, pg_ctl, postgres, pgbench, ...):
// $BLOCKREPL_PG_BINDIR if set, else the highest version under /usr/lib/postgresql/*/bin.
// Empty if none is installed (or the `postgres` user does not exist): tests should GTEST_SKIP.
std::string find_postgres_bindir();
// Why find_postgres_bindir() found nothing, for the skip message.
std::string postgres_missing_reason();

// Makes `path` owned by the postgres user (recursively) and every directory above it
// traversable (o+x) up to `/`, but only for directories under `within` (never touches others).
void give_to_postgres(const std::string& path, const std::string& within);

class PgServer {
 public:
  // datadir: the cluster's directory (created by initdb(); its parent must exist).
  // port: any free number (names the unix socket; no TCP listener is opened).
  PgServer(std::string bindir, std::string datadir, int port);
  ~PgServer();
  PgServer(const PgServer&) = delete;
  PgServer& operator=(const PgServer&) = delete;

  // initdb -D datadir -A trust -U postgres (fsync left on). Creates datadir owned by postgres.
  CommandResult initdb(int timeout_sec = 120);
  // pg_ctl start -w; the server log goes to log_path().
  CommandResult start(int timeout_sec = 60);
  // pg_ctl stop -m MODE -w (fast, smart or immediate).
  CommandResult stop(const std::string& mode = "fast", int timeout_sec = 60);
  // Stops whatever is left (immediate, then SIGKILL); safe to call repeatedly.
  void kill_all();
  bool started() const { return started_; }

  // psql -X -A -t -v ON_ERROR_STOP=1 -c SQL on database `db`; stdout holds the rows.
  CommandResult psql(const std::string& sql, const std::string& db = "postgres", int timeout_sec = 60);
  // The single value returned by `sql` (trimmed); empty string and a test failure on error.
  std::string query_value(const std::string& sql, const std::string& db = "postgres");
  // pgbench with connection options filled in; `args` are the workload options.
  CommandResult pgbench(const std::vector<std::string>& args, const std::string& db = "postgres",
                        int timeout_sec = 120);
  // pg_amcheck on `db` (installs the amcheck extension if missing) with `extra` options.
  // Exit 0 and empty stdout mean no corruption was found.
  CommandResult pg_amcheck(const std::vector<std::string>& extra = {}, const std::string& db = "postgres",
                           int timeout_sec = 120);
  bool has_pg_amcheck() const;

  // Runs argv as the postgres user (from `/`, so an unreadable cwd does not matter).
  CommandResult run_as_postgres(const std::vector<std::string>& argv, int timeout_sec = 60) const;

  const std::string& datadir() const { return datadir_; }
  const std::string& socket_dir() const { return sockdir_->path(); }
  int port() const { return port_; }
  std::string bin(const std::string& name) const { return bindir_ + "/" + name; }
  std::string log_path() const { return sockdir_->path() + "/server.log"; }
  // The last `max_bytes` of the server log, for failure messages.
  std::string log_tail(size_t max_bytes = 4000) const;

 private:
  std::vector<std::string> conn_args() const;
  std::vector<int> processes_in_datadir() const;

  std::string bindir_, datadir_;
  int port_;
  std::unique_ptr<TempDir> sockdir_;  // unix socket + server log, owned by postgres
  bool started_ = false;
  int postmaster_pid_ = 0;
};

}  // namespace blockrepl::test
