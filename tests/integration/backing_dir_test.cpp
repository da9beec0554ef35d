// A slave's backing directory is no way into its host (DESIGN.md section 10). A replica holds
// set-id files and device nodes as root on its master made them; its mount is nosuid,nodev but
// its backing file system is not. So a slave (and pull) refuses a data directory unprivileged
// users can reach (no root-only ancestor), with one line and nothing written; and an
// unprivileged user can neither run a replicated set-uid-root program with root's rights nor
// open a replicated device node, through the backing directory or through the mount.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <grp.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

namespace fs = std::filesystem;
using repl::Cluster;
using repl::Node;

constexpr uid_t kNobody = 65534;
constexpr gid_t kNogroup = 65534;

std::vector<std::string> mount_args(const Node& n) {
  std::vector<std::string> args = {"mount", "--data", n.data, "-v", "--log-file", n.log};
  if (!n.master_address.empty()) args.insert(args.end(), {"--master", n.master_address});
  args.push_back(n.mnt);
  return args;
}

// Non-zero exit, nothing on stdout, one line on stderr naming every string of `mentions`.
void expect_refused(const std::vector<std::string>& args, const std::vector<std::string>& mentions) {
  CommandResult r = run_blockrepl(args, 60);
  EXPECT_NE(r.exit_code, 0) << "succeeded but should have been refused: " << r.err;
  EXPECT_NE(r.exit_code, -1) << "hung";
  EXPECT_EQ(r.out, "");
  std::string line = r.err;
  if (!line.empty() && line.back() == '\n') line.pop_back();
  EXPECT_FALSE(line.empty()) << "no error message";
  EXPECT_EQ(line.find('\n'), std::string::npos) << "more than one line on stderr:\n" << r.err;
  for (const auto& m : mentions) EXPECT_NE(r.err.find(m), std::string::npos) << "does not mention '" << m << "': " << r.err;
}

// Whether some ancestor of `path` is root-only as blockrepl judges it (then a test that needs a
// world-reachable chain cannot make one here: $TMPDIR itself is private).
bool has_root_only_ancestor(const std::string& path) {
  for (fs::path p = fs::path(path).parent_path();; p = p.parent_path()) {
    struct stat st;
    if (lstat(p.c_str(), &st) == 0 && st.st_uid == 0 && !(st.st_mode & S_IXOTH) &&
        (!(st.st_mode & S_IXGRP) || st.st_gid == 0) && lgetxattr(p.c_str(), "system.posix_acl_access", nullptr, 0) < 0)
      return true;
    if (p == p.parent_path()) return false;
  }
}

// Runs fn in a child process as nobody:nogroup (harness.h as_user).
int as_nobody(const std::function<int()>& fn) { return as_user(kNobody, kNogroup, fn); }

int errno_of(int rc) { return rc < 0 ? errno : 0; }


// The master, as root through its mount: a set-uid-root copy of id(1) and a /dev/null-like
// device node anyone may open (what the fake master left on its slave).
void make_set_id_file_and_device(const Node& m, const std::string& suffix) {
  const std::string id = m.file("id" + suffix), dev = m.file("null" + suffix);
  std::error_code ec;
  ASSERT_TRUE(fs::copy_file("/usr/bin/id", id, ec)) << ec.message();
  ASSERT_EQ(chmod(id.c_str(), 04755), 0) << errname(errno);
  ASSERT_EQ(mknod(dev.c_str(), S_IFCHR | 0666, makedev(1, 3)), 0) << errname(errno);
  ASSERT_EQ(chmod(dev.c_str(), 0666), 0) << errname(errno);
}

// What reached the slave's backing directory is what the master made.
void expect_replicated(const Node& s, const std::string& suffix) {
  struct stat st;
  ASSERT_EQ(lstat(s.backing("id" + suffix).c_str(), &st), 0) << errname(errno);
  EXPECT_EQ(st.st_mode & 07777, 04755u);
  EXPECT_EQ(st.st_uid, 0u);
  ASSERT_EQ(lstat(s.backing("null" + suffix).c_str(), &st), 0) << errname(errno);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  EXPECT_EQ(st.st_rdev, makedev(1, 3));
  EXPECT_EQ(st.st_mode & 07777, 0666u);
}

void expect_unreachable_for_nobody(const Node& s, const std::string& suffix) {
  const std::string id = s.backing("id" + suffix), dev = s.backing("null" + suffix);
  SCOPED_TRACE("backing directory " + s.data + ", suffix '" + suffix + "'");
  struct stat st;
  EXPECT_EQ(as_nobody([&] { return errno_of(lstat(id.c_str(), &st)); }), EACCES) << "nobody can see the set-id file";
  EXPECT_EQ(as_nobody([&] { return exec_errno(id, "-u"); }), EACCES) << "nobody ran the set-uid-root file";
  EXPECT_EQ(as_nobody([&] { return open_errno(dev, O_RDWR); }), EACCES) << "nobody opened the device node";
}

void expect_mount_neither_suid_nor_dev(const Node& s, const std::string& suffix) {
  SCOPED_TRACE("mount " + s.mnt + ", suffix '" + suffix + "'");
  const std::string id = s.file("id" + suffix), dev = s.file("null" + suffix);
  struct stat st;
  ASSERT_EQ(stat(id.c_str(), &st), 0) << errname(errno);
  EXPECT_EQ(st.st_mode & 07777, 04755u) << "the set-uid bit is shown as the master has it";
  // nosuid: the program runs, with nobody's rights.
  CommandResult r = run_command({"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", id, "-u"}, 30);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "65534\n") << "the set-uid-root program ran with euid " << r.out;
  // nodev: no one opens a device node there, root included.
  EXPECT_EQ(as_nobody([&] { return open_errno(dev, O_RDWR); }), EACCES);
  EXPECT_EQ(open_errno(dev, O_RDWR), EACCES);
}

// A POSIX access ACL granting nobody traversal ("u:nobody:x"), the mask --x: the mode reads 0710.
std::string acl_letting_nobody_through() {
  auto entry = [](uint16_t tag, uint16_t perm, uint32_t id) {
    std::string e(8, '\0');
    memcpy(&e[0], &tag, 2);
    memcpy(&e[2], &perm, 2);
    memcpy(&e[4], &id, 4);
    return e;
  };
  const uint32_t version = 2;
  std::string acl(reinterpret_cast<const char*>(&version), 4);
  acl += entry(0x01, 7, UINT32_MAX);   // user::rwx
  acl += entry(0x02, 1, kNobody);      // user:nobody:--x
  acl += entry(0x04, 0, UINT32_MAX);   // group::---
  acl += entry(0x10, 1, UINT32_MAX);   // mask::--x
  acl += entry(0x20, 0, UINT32_MAX);   // other::---
  return acl;
}

}  // namespace

// (a) A slave, and a pull, whose data directory lies under world-traversable directories only
// is refused with one line and nothing written; a master there is not (it is the original).
// Under a root-only directory (0710 with group root counts) the same slave mounts.
TEST(BackingDir, ReplicaUnderWorldTraversableParentsIsRefused) {
  Cluster c("bd-open");
  if (has_root_only_ancestor(c.path())) GTEST_SKIP() << c.path() << " has a root-only ancestor: set TMPDIR elsewhere";
  ASSERT_EQ(chmod(c.path().c_str(), 0755), 0);
  Node& m = c.add_master();
  ASSERT_TRUE(m.ok()) << "a master is not checked";
  write_file(m.file("f"), "replicated");
  ASSERT_EQ(repl::sync_point(m.mnt), "");

  Node& s = c.define_slave(m);
  const auto before = repl::manifest(s.data, false);
  const std::vector<std::string> mentions = {s.data, "reachable by unprivileged users", c.path() + " is 0755",
                                             "root-only", "mkdir -m 0700"};
  expect_refused(mount_args(s), mentions);
  EXPECT_EQ(repl::manifest_diff(before, repl::manifest(s.data, false)), "") << "the refused slave wrote";
  EXPECT_FALSE(fs::exists(s.data + "/.blockrepl")) << "the refused slave created its metadata folder";
  EXPECT_FALSE(is_mounted(s.mnt));
  const std::string pulled = c.path() + "/pulled";
  ASSERT_TRUE(fs::create_directory(pulled));
  std::vector<std::string> pull_mentions = mentions;
  pull_mentions[0] = pulled;
  expect_refused({"pull", m.address(), pulled}, pull_mentions);
  EXPECT_TRUE(fs::is_empty(pulled)) << "the refused pull wrote";

  // An ACL that lets nobody through makes a 0710 root:root directory public again.
  ASSERT_EQ(chown(c.path().c_str(), 0, 0), 0);
  ASSERT_EQ(chmod(c.path().c_str(), 0710), 0);
  const std::string acl = acl_letting_nobody_through();
  if (setxattr(c.path().c_str(), "system.posix_acl_access", acl.data(), acl.size(), 0) == 0) {
    expect_refused(mount_args(s), {s.data, c.path() + " has a POSIX ACL"});
    ASSERT_EQ(removexattr(c.path().c_str(), "system.posix_acl_access"), 0);
  } else {
    ADD_FAILURE() << "cannot set an ACL on " << c.path() << ": " << errname(errno);
  }
  ASSERT_EQ(chmod(c.path().c_str(), 0710), 0);
  ASSERT_TRUE(c.mount(s)) << "a slave under a root-only (0710, group root) directory";
  EXPECT_EQ(read_file(s.file("f")), "replicated");
}

// (b) A real master and slave: root on the master makes a set-uid-root program and a device node
// anyone may open, before the slave's first copy and again while it streams. An unprivileged
// user reaches neither through the slave's backing directory (EACCES: its parent is root-only)
// nor through its mount (nosuid: the program runs as nobody; nodev: EACCES).
TEST(BackingDir, UnprivilegedUserCannotUseReplicatedSetIdFilesOrDevices) {
  if (access("/usr/bin/id", X_OK) != 0 || access("/usr/bin/setpriv", X_OK) != 0) GTEST_SKIP() << "needs id and setpriv";
  Cluster c("bd-nobody");
  // The mounts are for everyone; the backing directories below root-only directories.
  ASSERT_EQ(chmod(c.path().c_str(), 0711), 0);
  Node& m = c.define_master();
  m.data = c.private_data_dir("master-vault");  // 0755: the volume root everyone may enter
  ASSERT_TRUE(c.mount(m));
  ASSERT_NO_FATAL_FAILURE(make_set_id_file_and_device(m, ""));
  ASSERT_EQ(repl::sync_point(m.mnt), "");

  Node& s = c.define_slave(m);
  s.data = c.private_data_dir("slave-vault");
  ASSERT_TRUE(c.mount(s));  // the full copy
  ASSERT_NO_FATAL_FAILURE(make_set_id_file_and_device(m, "-streamed"));
  ASSERT_EQ(repl::sync_and_wait(m.mnt, {s.mnt}), "");

  for (const std::string suffix : {"", "-streamed"}) {
    ASSERT_NO_FATAL_FAILURE(expect_replicated(s, suffix));
    expect_unreachable_for_nobody(s, suffix);
    expect_mount_neither_suid_nor_dev(s, suffix);
  }
  // The data directory itself is open to all (a volume root's mode), yet out of reach.
  struct stat st;
  ASSERT_EQ(stat(s.data.c_str(), &st), 0);
  EXPECT_NE(st.st_mode & S_IXOTH, 0u);
  EXPECT_EQ(as_nobody([&] { return open_errno(s.data, O_RDONLY | O_DIRECTORY); }), EACCES);
}

}  // namespace blockrepl::test
