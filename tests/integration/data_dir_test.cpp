// What a data directory may hold and who else may use it (issue 11, "nothing lost, nothing
// stuck"): a new slave or a pull never deletes files it did not put there unless told to; a
// file system's lost+found survives replication; no two daemons share a data directory or
// mount inside each other's; and after a daemon is killed, the same mount command mounts again.
// Every refusal is one line on stderr, a non-zero exit, and nothing written.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <filesystem>
#include <string>
#include <vector>

#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using repl::Cluster;
using repl::Node;

std::string show(const std::vector<std::string>& args) {
  std::string s = "blockrepl";
  for (auto& a : args) s += " " + a;
  return s;
}

// Runs `blockrepl args...` in the directory `cwd` (for relative paths).
CommandResult run_blockrepl_in(const std::string& cwd, const std::vector<std::string>& args) {
  std::vector<std::string> argv = {"sh", "-c", "cd \"$0\" && exec \"$@\"", cwd, blockrepl_binary()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, 60);
}

// The error contract: non-zero exit, nothing on stdout, exactly one line on stderr that
// mentions every string of `mentions`.
void expect_refused(const std::vector<std::string>& args, const std::vector<std::string>& mentions,
                    const std::string& cwd = "") {
  CommandResult r = cwd.empty() ? run_blockrepl(args, 60) : run_blockrepl_in(cwd, args);
  const std::string cmd = show(args);
  EXPECT_NE(r.exit_code, 0) << cmd << ": succeeded but should have been refused; stderr: " << r.err;
  EXPECT_NE(r.exit_code, -1) << cmd << ": hung";
  EXPECT_EQ(r.out, "") << cmd;
  std::string line = r.err;
  if (!line.empty() && line.back() == '\n') line.pop_back();
  EXPECT_FALSE(line.empty()) << cmd << ": no error message";
  EXPECT_EQ(line.find('\n'), std::string::npos) << cmd << ": more than one line on stderr:\n" << r.err;
  for (const auto& m : mentions) EXPECT_NE(r.err.find(m), std::string::npos) << cmd << ": does not mention '" << m << "': " << r.err;
}

bool exists(const std::string& p) {
  struct stat st;
  return lstat(p.c_str(), &st) == 0;
}

// The options Cluster::mount gives a node: the command an operator would run again.
std::vector<std::string> mount_args(const Node& n) {
  std::vector<std::string> args = {"mount", "--data", n.data};
  args.insert(args.end(), n.extra.begin(), n.extra.end());
  args.insert(args.end(), {"-v", "--log-file", n.log});
  if (!n.master_address.empty()) args.insert(args.end(), {"--master", n.master_address});
  if (n.port) args.insert(args.end(), {"--listen", n.address()});
  args.push_back(n.mnt);
  return args;
}

// Kills a node's daemon with SIGKILL, leaving its mount dead (ENOTCONN).
void kill_daemon(const Node& n) {
  const pid_t pid = n.pid();
  ASSERT_TRUE(repl::process_alive(pid)) << n.name << " has no live daemon";
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  ASSERT_TRUE(repl::wait_dead(pid, 10s)) << n.name << "'s daemon survived SIGKILL";
  struct stat st;
  ASSERT_NE(stat(n.mnt.c_str(), &st), 0);
  const int e = errno;
  ASSERT_TRUE(e == ENOTCONN || e == ECONNABORTED) << n.mnt << " is not a dead mount: " << errname(e);
}

void expect_verified(const Node& slave) {
  CommandResult v = run_blockrepl({"verify", slave.mnt}, 120);
  EXPECT_EQ(v.exit_code, 0) << "verify " << slave.mnt << ": " << v.out << v.err;
}

}  // namespace

// A directory with someone's files is not a replica: the slave refuses it, deleting and
// creating nothing, until the operator gives the files up with --discard-my-data.
TEST(DataDir, NewSlaveRefusesDirectoryWithForeignFiles) {
  Cluster c("dd-foreign");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  write_file(m.file("from-master"), "replicated");
  ASSERT_EQ(repl::sync_point(m.mnt), "");

  Node& s = c.define_slave(m);
  write_file(s.data + "/t.txt", "thesis");
  fs::create_directories(s.data + "/chapters");
  write_file(s.data + "/chapters/one", "chapter one");
  const auto before = repl::manifest(s.data, false);
  expect_refused(mount_args(s), {s.data, "t.txt", "chapters", "not a blockrepl volume", "--discard-my-data"});
  EXPECT_EQ(repl::manifest_diff(before, repl::manifest(s.data, false)), "") << "the refused slave changed its data directory";
  EXPECT_FALSE(exists(s.data + "/.blockrepl")) << "the refused slave created its metadata folder";
  EXPECT_FALSE(is_mounted(s.mnt));

  // Given up explicitly: the first copy replaces them.
  s.extra = {"--discard-my-data"};
  ASSERT_TRUE(c.mount(s));
  EXPECT_FALSE(exists(s.data + "/t.txt"));
  EXPECT_FALSE(exists(s.data + "/chapters"));
  EXPECT_EQ(read_file(s.file("from-master")), "replicated");
  expect_verified(s);
}

// A slave on a freshly made file system (only lost+found at its root) counts as empty and keeps
// lost+found, through the full copy and a later Merkle re-attach; it still verifies identical
// to a master that has no lost+found.
TEST(DataDir, SlaveOnFreshFileSystemKeepsLostFound) {
  TempDir disk("dd-ext4");
  SmallExt4 ext4(disk.path() + "/fs", "64M");
  ASSERT_TRUE(ext4.ok()) << ext4.error();
  ASSERT_TRUE(fs::is_directory(ext4.path() + "/lost+found"));
  Cluster c("dd-lostfound");
  // No journal: every re-attach is a Merkle diff, which removes names the master lacks.
  Node& m = c.add_master({"--journal-size", "0"});
  ASSERT_TRUE(m.ok());
  ASSERT_FALSE(exists(m.data + "/lost+found"));
  write_file(m.file("a"), "first");
  ASSERT_EQ(repl::sync_point(m.mnt), "");

  Node& s = c.define_slave(m);
  s.data = ext4.path();
  ASSERT_TRUE(c.mount(s));
  EXPECT_TRUE(fs::is_directory(s.data + "/lost+found")) << "the full copy removed lost+found";
  EXPECT_EQ(read_file(s.file("a")), "first");
  expect_verified(s);

  c.unmount(s);
  write_file(m.file("b"), "second");
  ASSERT_EQ(repl::sync_point(m.mnt), "");
  ASSERT_TRUE(c.mount(s));
  EXPECT_EQ(read_file(s.file("b")), "second");
  EXPECT_TRUE(fs::is_directory(s.data + "/lost+found")) << "the Merkle re-attach removed lost+found";
  EXPECT_EQ(repl::status(s.mnt)["last_attach"]["method"], "merkle");
  expect_verified(s);
}

// A master on a fresh file system: its lost+found is not part of the volume, so the mount
// neither shows it nor lets anything be made there, and its slaves stay identical.
TEST(DataDir, MastersLostFoundIsNeitherShownNorReplicated) {
  TempDir disk("dd-m-ext4");
  SmallExt4 ext4(disk.path() + "/fs", "64M");
  ASSERT_TRUE(ext4.ok()) << ext4.error();
  Cluster c("dd-m-lostfound");
  Node& m = c.define_master();
  m.data = ext4.path();
  ASSERT_TRUE(c.mount(m));
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(list_dir(m.mnt).count("lost+found"), 0u) << "the mount shows the file system's lost+found";
  struct stat st;
  EXPECT_EQ(lstat(m.file("lost+found").c_str(), &st), -1);
  EXPECT_EQ(errno, ENOENT);
  EXPECT_EQ(mkdir(m.file("lost+found/x").c_str(), 0755), -1);
  EXPECT_EQ(mkdir(m.file("lost+found").c_str(), 0755), -1);
  EXPECT_EQ(errno, EPERM);
  write_file(m.file("a"), "data");
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");
  EXPECT_FALSE(exists(s.data + "/lost+found"));
  expect_verified(s);
}

// `pull` follows the same rule as a slave: foreign files are refused unless given up, and a
// fresh file system's lost+found stays.
TEST(DataDir, PullRefusesForeignFilesAndKeepsLostFound) {
  TempDir disk("dd-pull-ext4");
  SmallExt4 ext4(disk.path() + "/fs", "64M");
  ASSERT_TRUE(ext4.ok()) << ext4.error();
  Cluster c("dd-pull");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  write_file(m.file("f"), "pulled");
  ASSERT_EQ(repl::sync_point(m.mnt), "");

  const std::string foreign = c.path() + "/foreign";
  fs::create_directories(foreign);
  write_file(foreign + "/notes", "mine");
  expect_refused({"pull", m.address(), foreign}, {foreign, "notes", "not a blockrepl volume", "--discard-my-data"});
  EXPECT_EQ(read_file(foreign + "/notes"), "mine");
  EXPECT_FALSE(exists(foreign + "/.blockrepl"));

  CommandResult r = run_blockrepl({"pull", "-q", "--discard-my-data", m.address(), foreign}, 60);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(exists(foreign + "/notes"));
  EXPECT_EQ(read_file(foreign + "/f"), "pulled");

  r = run_blockrepl({"pull", "-q", m.address(), ext4.path()}, 60);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(read_file(ext4.path() + "/f"), "pulled");
  EXPECT_TRUE(fs::is_directory(ext4.path() + "/lost+found"));
}

// No data directory or mount point may be, contain, or lie inside another running daemon's
// data directory or mount point, however the path is spelled.
TEST(DataDir, OverlapsWithARunningDaemonAreRefused) {
  Cluster c("dd-overlap");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  write_file(m.file("kept"), "kept");
  fs::create_directories(m.file("inside"));
  fs::create_directories(m.file("sub"));
  ASSERT_EQ(repl::sync_point(m.mnt), "");
  const auto master_before = repl::manifest(m.data);
  TempDir outside("dd-outside");  // apart from the cluster's directory, which holds the master's
  const std::string other_data = outside.sub("other-data"), other_mnt = outside.sub("other-mnt");
  const std::string link = c.path() + "/link-to-master-data";
  fs::create_directory_symlink(m.data, link);
  const std::string master = "127.0.0.1:" + std::to_string(m.port);

  // The master's data directory as a slave's, spelled four ways.
  for (const std::string& data : {m.data, m.data + "/", link, m.data + "/../" + fs::path(m.data).filename().string()})
    expect_refused({"mount", "--data", data, "--master", master, other_mnt}, {m.data, "already in use"});
  // As a master's, too.
  expect_refused({"mount", "--data", m.data, other_mnt}, {m.data, "already in use"});
  // A data directory inside it, or one that contains it.
  expect_refused({"mount", "--data", m.data + "/inside", other_mnt}, {m.data, "lies inside"});
  expect_refused({"mount", "--data", fs::path(m.data).filename().string() + "/inside/", other_mnt}, {m.data, "lies inside"},
                 c.path());
  expect_refused({"mount", "--data", c.path(), other_mnt}, {m.data, "contains"});
  // A data directory inside the master's mount point.
  expect_refused({"mount", "--data", m.mnt + "/sub", other_mnt}, {m.mnt, "lies inside"});
  // A mount point inside the master's data directory, or inside its mount.
  expect_refused({"mount", "--data", other_data, m.data + "/inside/"}, {m.data, "lies inside"});
  expect_refused({"mount", "--data", other_data, m.mnt + "/sub"}, {m.mnt, "lies inside"});
  // pull writes too: not inside a running daemon's data directory.
  expect_refused({"pull", master, m.data + "/inside"}, {m.data, "lies inside"});

  EXPECT_FALSE(exists(other_data + "/.blockrepl"));
  EXPECT_FALSE(exists(m.data + "/inside/.blockrepl"));
  EXPECT_FALSE(is_mounted(other_mnt));
  EXPECT_FALSE(is_mounted(m.data + "/inside"));
  EXPECT_TRUE(fs::is_empty(other_mnt));
  // The master is undisturbed.
  EXPECT_EQ(repl::manifest_diff(master_before, repl::manifest(m.data)), "");
  write_file(m.file("after"), "after");
  EXPECT_EQ(read_file(m.file("kept")), "kept");
  EXPECT_EQ(read_file(m.file("after")), "after");
}

// After SIGKILL, the very command that mounted a node mounts it again: the dead mount it left
// is removed, the data is intact, and a slave re-attaches.
TEST(DataDir, RemountAfterKillIsTheSameCommand) {
  Cluster c("dd-remount");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  Node& s = c.add_slave(m);
  ASSERT_TRUE(s.ok());
  write_file(m.file("before"), "written before the crash");
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");

  ASSERT_NO_FATAL_FAILURE(kill_daemon(m));
  CommandResult r = run_blockrepl(mount_args(m), 120);
  ASSERT_EQ(r.exit_code, 0) << show(mount_args(m)) << ": " << r.err;
  EXPECT_NE(r.err.find("dead mount"), std::string::npos) << "no line about the dead mount it removed: " << r.err;
  EXPECT_EQ(read_file(m.file("before")), "written before the crash");
  write_file(m.file("after-master"), "written after the master's crash");
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}, 60s), "");  // the slave re-attached by itself

  ASSERT_NO_FATAL_FAILURE(kill_daemon(s));
  write_file(m.file("while-slave-dead"), "missed by the slave");
  r = run_blockrepl(mount_args(s), 120);
  ASSERT_EQ(r.exit_code, 0) << show(mount_args(s)) << ": " << r.err;
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}, 60s), "");
  EXPECT_EQ(read_file(s.file("before")), "written before the crash");
  EXPECT_EQ(read_file(s.file("after-master")), "written after the master's crash");
  EXPECT_EQ(read_file(s.file("while-slave-dead")), "missed by the slave");
  expect_verified(s);
}

// A dead mount of something else on the mount point is not ours to remove: refused with one
// line, also when that other data directory is gone. Its own data directory, however spelled
// (relative, trailing slashes), mounts there again.
TEST(DataDir, DeadMountOfAnotherDataDirectoryIsRefused) {
  Cluster c("dd-dead-other");
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok());
  write_file(m.file("kept"), "kept");
  ASSERT_EQ(repl::sync_point(m.mnt), "");
  ASSERT_NO_FATAL_FAILURE(kill_daemon(m));
  const std::string other = c.path() + "/other-data";
  fs::create_directories(other);
  expect_refused({"mount", "--data", other, m.mnt}, {m.mnt, "dead mount", m.data});
  expect_refused({"mount", "--data", other, m.mnt + "/"}, {m.mnt, "dead mount", m.data});
  EXPECT_FALSE(exists(other + "/.blockrepl"));

  // Its data directory removed: still a dead mount of something else for `other`; and the
  // removed directory itself simply does not exist.
  fs::rename(m.data, c.path() + "/moved-away");
  expect_refused({"mount", "--data", other, m.mnt}, {m.mnt, "dead mount"});
  expect_refused({"mount", "--data", m.data, m.mnt}, {m.data, "does not exist"});
  EXPECT_FALSE(exists(other + "/.blockrepl"));
  struct stat st;
  EXPECT_NE(stat(m.mnt.c_str(), &st), 0) << "the dead mount was removed by a refused mount";

  // Back in place, its own data directory mounts again, with the paths spelled relatively.
  fs::rename(c.path() + "/moved-away", m.data);
  const std::string data_rel = "./" + fs::path(m.data).filename().string() + "/";
  const std::string mnt_rel = fs::path(m.mnt).filename().string() + "//";
  CommandResult r = run_blockrepl_in(c.path(), {"mount", "--data", data_rel, "--listen", m.address(), mnt_rel});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(read_file(m.file("kept")), "kept");
}

// A daemon leaves a pid file that is not its own in place when it exits.
TEST(DataDir, ExitingDaemonKeepsAnotherDaemonsPidFile) {
  TempDir tmp("dd-pid");
  const std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  Mount mount(data, mnt);
  ASSERT_TRUE(mount.ok()) << mount.error();
  const pid_t daemon = repl::daemon_pid(data);
  ASSERT_GT(daemon, 0);
  // As a newer daemon would have written it.
  const std::string newer = std::to_string(getpid()) + "\n";
  write_file(data + "/.blockrepl/daemon.pid", newer);
  ASSERT_EQ(run_command({"fusermount3", "-u", mnt}).exit_code, 0);
  ASSERT_TRUE(repl::wait_dead(daemon, 30s));
  ASSERT_TRUE(exists(data + "/.blockrepl/daemon.pid")) << "the exiting daemon removed a pid file that was not its own";
  EXPECT_EQ(read_file(data + "/.blockrepl/daemon.pid"), newer);
}

}  // namespace blockrepl::test
