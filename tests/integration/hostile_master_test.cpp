// A hostile master against a real slave (`blockrepl mount --master`), replayed with the fake
// master of fake_peer.h over the real wire and handshake code.
//  - Without the cluster's secret a fake master is refused by a slave that has --secret-file,
//    whatever it tries (no authentication, a forged proof, the real handshake without the
//    secret): the mount fails with one line and nothing reaches the data directory.
//  - With the secret (stolen), everything nobody may send (names that are not one component,
//    paths into the metadata folder or through a symlink, mode bits outside 07777, unknown types
//    and operations, oversized fields, new entries with the root's id) is refused, and what the
//    record policy lets a trusted master send (device nodes, set-id files with file
//    capabilities, trusted.* xattrs, the volume root's mode, symlinks to /etc) is harmless: the
//    slave's backing directory is below a root-only directory and its mount is nosuid,nodev.
//    The slave keeps serving its mount (and following its master) throughout.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <grp.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "blockrepl/file_id.h"
#include "fake_peer.h"
#include "harness.h"
#include "replication_util.h"

namespace blockrepl::test {
namespace {

using namespace std::chrono_literals;

constexpr uid_t kNobody = 65534;
constexpr FileId kFidBase = 0x7e57000000000000ull;

// Unmounts `mnt` when the test ends if a mount that should have been refused succeeded.
struct UnmountOnExit {
  std::string mnt;
  ~UnmountOnExit() {
    if (!is_mounted(mnt)) return;
    run_blockrepl({"umount", mnt}, 30);
    if (is_mounted(mnt)) run_command({"fusermount3", "-u", "-z", mnt}, 30);
  }
};

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(line);
  return out;
}

size_t count_lines_with_all(const std::string& text, const std::vector<std::string>& needles) {
  size_t n = 0;
  for (const std::string& line : lines_of(text)) {
    bool all = true;
    for (const auto& s : needles) all = all && line.find(s) != std::string::npos;
    n += all;
  }
  return n;
}


// What /etc looks like: each name with its type, mode, owner, size and mtime, /etc's own mode and
// xattrs, and the contents of a few files a write through a symlink would aim at.
std::string etc_fingerprint() {
  std::string out;
  struct stat st;
  if (lstat("/etc", &st) == 0)
    out += "/etc mode " + std::to_string(st.st_mode) + " owner " + std::to_string(st.st_uid) + " mtime " +
           std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec) + "\n";
  char names[4096];
  ssize_t n = llistxattr("/etc", names, sizeof names);
  if (n > 0) out += "/etc xattrs " + std::string(names, static_cast<size_t>(n)) + "\n";
  for (const std::string& name : list_dir("/etc")) {
    if (lstat(("/etc/" + name).c_str(), &st) != 0) continue;
    out += name + " " + std::to_string(st.st_mode) + " " + std::to_string(st.st_uid) + " " + std::to_string(st.st_size) + " " +
           std::to_string(st.st_mtim.tv_sec) + "\n";
  }
  for (const char* f : {"/etc/passwd", "/etc/hostname", "/etc/shadow"}) {
    try {
      out += std::string(f) + ": " + read_file(f) + "\n";
    } catch (const std::exception&) {
    }
  }
  return out;
}

// A name that no test run shares, which must never appear in /etc.
std::string etc_probe_name() { return "blockrepl-hostile-" + std::to_string(getpid()); }

std::string security_capability_setuid() {
  // struct vfs_cap_data, revision 2, effective: permitted = CAP_SETUID (7).
  const uint32_t words[5] = {0x02000000u | 0x1u, 1u << 7, 0, 0, 0};
  return std::string(reinterpret_cast<const char*>(words), sizeof words);
}

kj::ArrayPtr<const kj::byte> bytes_of(const std::string& s) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}

// A copy entry of a regular file with all of its data in one chunk.
void file_entry(wire::CopyEntry::Builder e, const std::string& path, FileId fid, uint32_t mode, const std::string& data,
                uint32_t uid = 0, uint32_t gid = 0) {
  e.setPath(bytes_of(path));
  e.setFid(fid);
  e.setMode(mode);
  e.setUid(uid);
  e.setGid(gid);
  e.setSize(data.size());
  e.setMtimeSec(1700000000);
  e.setAtimeSec(1700000000);
  e.setChunk(bytes_of(data));
}

// The files of the tests' fake volume.
struct Volume {
  std::string good = "good data, served throughout\n";
  std::string cat;  // /usr/bin/cat's bytes: a program to make set-uid root
  FileId good_fid = kFidBase + 1, cat_fid = kFidBase + 2, blk_fid = kFidBase + 3;
};

// The result of one `blockrepl mount` of a slave that should be refused.
struct RefusedMount {
  CommandResult r;
  std::string log;
  bool mounted = false;
};

RefusedMount mount_slave_expecting_refusal(const std::string& data, const std::string& mnt, const std::string& master,
                                          const std::string& secret_file, const std::string& log) {
  RefusedMount out;
  UnmountOnExit guard{mnt};
  out.r = run_blockrepl({"mount", "--data", data, "--master", master, "--secret-file", secret_file, "--log-file", log, mnt}, 60);
  out.mounted = is_mounted(mnt);
  try {
    out.log = read_file(log);
  } catch (const std::exception&) {
  }
  return out;
}

// The line of `mount`'s stderr that is its refusal (not a warning logged on the way; the order of
// the two is not fixed), "" if none.
std::string refusal_line(const std::string& err) {
  for (const std::string& l : lines_of(err))
    if (l.find("warning:") == std::string::npos) return l;
  return "";
}

// Refused: non-zero exit, not mounted, and a line on stderr says why. With `strict`, that
// line is the only one and names the peer (what proto/blockrepl.capnp asks of a receiver).
void expect_refusal(const RefusedMount& m, const std::string& what, const std::string& peer, bool strict) {
  SCOPED_TRACE(what);
  EXPECT_NE(m.r.exit_code, 0) << "the slave mounted: " << m.r.err;
  EXPECT_NE(m.r.exit_code, -1) << "the slave hung";
  EXPECT_FALSE(m.mounted);
  const std::string line = refusal_line(m.r.err);
  EXPECT_FALSE(line.empty()) << "no error message: " << m.r.err;
  if (!strict) return;
  EXPECT_EQ(lines_of(m.r.err).size(), 1u) << "more than one line on stderr:\n" << m.r.err;
  EXPECT_NE(line.find(peer), std::string::npos) << "the line does not name the peer " << peer << ": " << m.r.err;
}

// ---------------------------------------------------------------------------------------------
// 1. Without the secret

// A fake master scripted to attach the slave by a full copy of one file, as it would if the
// slave let it.
void full_copy_of_one_file(FakeMasterSession& s) {
  s.send_welcome({});
  s.send_copy_entry([](wire::CopyEntry::Builder e) { file_entry(e, "planted", kFidBase + 9, S_IFREG | 0644, "planted\n"); });
  s.send_copy_done(0);
  s.wait_closed(5000);
}

TEST(HostileMaster, WithoutTheSecretAFakeMasterIsRefused) {
  TempDir tmp("hm-nosecret");
  const std::string secret_file = write_secret(tmp.path() + "/secret", random_secret());
  const auto wrong = secret_of(random_secret());
  struct Case {
    const char* name;
    FakeMasterOptions opts;
    std::string says;  // what the slave's one line says
  };
  std::vector<Case> cases = {
      {"no authentication: the fake master answers the authHello with a welcome", {nullptr, FakeAuth::skip},
       "something other than authChallenge"},
      {"a forged proof made with another secret", {wrong, FakeAuth::forge_proof}, "did not prove the cluster's secret"},
      {"the real handshake code without a secret", {nullptr, FakeAuth::responder}, "does not authenticate peers"},
      {"the real handshake code with another secret", {wrong, FakeAuth::responder}, "authentication failed"},
  };
  int i = 0;
  for (Case& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string data = tmp.sub("data" + std::to_string(i)), mnt = tmp.sub("mnt" + std::to_string(i));
    const std::string log = tmp.path() + "/slave" + std::to_string(i) + ".log";
    i++;
    const auto before = repl::manifest(data, false);
    FakeMaster fake(c.opts, full_copy_of_one_file);
    RefusedMount m = mount_slave_expecting_refusal(data, mnt, fake.address(), secret_file, log);
    expect_refusal(m, c.name, fake.address(), /*strict=*/true);
    EXPECT_NE(m.r.err.find(c.says), std::string::npos) << m.r.err;
    EXPECT_EQ(repl::manifest_diff(before, repl::manifest(data, false)), "") << "the refused master's bytes reached " << data;
    for (const std::string& name : list_dir(data)) EXPECT_EQ(name, ".blockrepl") << "in " << data;
    printf("[ info ] %s: %s", c.name, m.r.err.c_str());
    if (c.opts.auth == FakeAuth::skip) {
      EXPECT_EQ(fake.sessions(), 1) << "the fake master never got to send its copy: the case proves nothing";
      EXPECT_TRUE(fake.wait_sessions_ended(10000)) << "the fake master's session did not end after the slave hung up";
      EXPECT_GT(fake.bytes_sent(), 0u);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 2a. A stolen secret: what nobody may send, in a full copy

TEST(HostileMaster, StolenSecretFullCopyRefusesWhatNobodyMaySend) {
  TempDir tmp("hm-copy");
  const std::string secret = random_secret();
  const std::string secret_file = write_secret(tmp.path() + "/secret", secret);
  const std::string etc_before = etc_fingerprint();
  const std::string probe = etc_probe_name();
  using Fill = std::function<void(FakeMasterSession&)>;
  auto entry = [](const std::string& path, uint32_t mode, FileId fid = kFidBase + 20) -> Fill {
    return [=](FakeMasterSession& s) {
      s.send_copy_entry([&](wire::CopyEntry::Builder e) { file_entry(e, path, fid, mode, S_ISREG(mode) ? "x" : ""); });
    };
  };
  auto symlink_to_etc = [](FakeMasterSession& s) {
    s.send_copy_entry([](wire::CopyEntry::Builder e) {
      e.setPath(bytes_of("etc-link"));
      e.setFid(kFidBase + 21);
      e.setMode(S_IFLNK | 0777);
      e.setLinkTarget(bytes_of("/etc"));
    });
  };
  struct Case {
    std::string name;
    Fill send;
    std::string says;                  // in the slave's line (stderr or log)
    std::set<std::string> may_remain = {};  // entries of the data directory the case may leave
  };
  const std::string long_name(256, 'n');
  std::vector<Case> cases = {
      {"a '..' path", entry("../escape", S_IFREG | 0644), "bad path"},
      {"a '..' inside a path", entry("a/../../escape", S_IFREG | 0644), "bad path"},
      {"an absolute path", entry("/tmp/escape", S_IFREG | 0644), "bad path"},
      {"an empty path", entry("", S_IFREG | 0644), "bad path"},
      {"an empty component", entry("a//b", S_IFREG | 0644), "bad path"},
      {"a 256-byte name", entry(long_name, S_IFREG | 0644), "bad path"},
      {"a path into the metadata folder", entry(".blockrepl/state", S_IFREG | 0644), "metadata folder"},
      {"the metadata folder itself", entry(".blockrepl", S_IFDIR | 0755), "metadata folder"},
      {"mode bits outside 07777", entry("mode-bits", S_IFREG | 0644 | 0200000), "Invalid argument"},
      {"an unknown file type", entry("unknown-type", 0030644), "Invalid argument"},
      {"no file type", entry("no-type", 0644), "Invalid argument"},
      {"a new entry with the volume root's file id", entry("root-id", S_IFREG | 0644, kRootFileId), "Invalid argument"},
      {"a new entry without a file id", entry("no-id", S_IFREG | 0644, 0), "Invalid argument"},
      {"a device number on a regular file",
       [](FakeMasterSession& s) {
         s.send_copy_entry([](wire::CopyEntry::Builder e) {
           file_entry(e, "rdev-file", kFidBase + 22, S_IFREG | 0644, "");
           e.setRdev(makedev(254, 0));
         });
       },
       "Invalid argument"},
      {"owner -1", [](FakeMasterSession& s) {
         s.send_copy_entry([](wire::CopyEntry::Builder e) { file_entry(e, "owner", kFidBase + 23, S_IFREG | 0644, "", UINT32_MAX, 0); });
       }, "Invalid argument"},
      {"an oversized path (5000 bytes)", entry(std::string(5000, 'p'), S_IFREG | 0644), "path is 5000 bytes"},
      {"an oversized link target (5000 bytes)",
       [](FakeMasterSession& s) {
         s.send_copy_entry([](wire::CopyEntry::Builder e) {
           e.setPath(bytes_of("long-link"));
           e.setFid(kFidBase + 24);
           e.setMode(S_IFLNK | 0777);
           e.setLinkTarget(bytes_of(std::string(5000, 't')));
         });
       },
       "link target is 5000 bytes"},
      {"an oversized xattr value (70000 bytes)",
       [](FakeMasterSession& s) {
         s.send_copy_entry([](wire::CopyEntry::Builder e) {
           file_entry(e, "big-xattr", kFidBase + 25, S_IFREG | 0644, "");
           auto x = e.initXattrs(1);
           x[0].setName("user.big");
           x[0].setValue(bytes_of(std::string(70000, 'v')));
         });
       },
       "xattr value is 70000 bytes"},
      {"an xattr outside every namespace",
       [](FakeMasterSession& s) {
         s.send_copy_entry([](wire::CopyEntry::Builder e) {
           file_entry(e, "odd-xattr", kFidBase + 26, S_IFREG | 0644, "");
           auto x = e.initXattrs(1);
           x[0].setName("os2.evil");
           x[0].setValue(bytes_of("v"));
         });
       },
       "Operation not supported", {"odd-xattr"}},
      {"a file through a symlink to /etc",
       [&](FakeMasterSession& s) {
         symlink_to_etc(s);
         s.send_copy_entry([&](wire::CopyEntry::Builder e) { file_entry(e, "etc-link/" + probe, kFidBase + 27, S_IFREG | 0644, "pwned\n"); });
       },
       "etc-link/" + probe, {"etc-link"}},
      {"a hard link to a file through a symlink to /etc",
       [&](FakeMasterSession& s) {
         symlink_to_etc(s);
         s.send_copy_entry([](wire::CopyEntry::Builder e) {
           file_entry(e, "passwd-link", kFidBase + 28, S_IFREG | 0644, "");
           e.setHardLinkOf(bytes_of("etc-link/passwd"));
         });
       },
       "etc-link/passwd", {"etc-link"}},
  };
  std::atomic<const Case*> current{nullptr};
  FakeMaster fake({secret_of(secret), FakeAuth::responder}, [&](FakeMasterSession& s) {
    s.send_welcome({});
    current.load()->send(s);
    s.send_copy_done(0);
    s.wait_closed(5000);
  });
  int i = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    current = &c;
    const std::string data = tmp.sub("data" + std::to_string(i)), mnt = tmp.sub("mnt" + std::to_string(i));
    const std::string log = tmp.path() + "/slave" + std::to_string(i) + ".log";
    i++;
    const int sessions_before = fake.sessions();
    RefusedMount m = mount_slave_expecting_refusal(data, mnt, fake.address(), secret_file, log);
    EXPECT_EQ(fake.sessions(), sessions_before + 1) << "the slave never attached: the case proves nothing";
    expect_refusal(m, c.name, fake.address(), /*strict=*/true);
    EXPECT_NE(refusal_line(m.r.err).find(c.says), std::string::npos) << "the refusal does not say '" << c.says << "':\n"
                                                                          << m.r.err;
    std::set<std::string> left;
    for (const std::string& name : list_dir(data))
      if (name != ".blockrepl" && !c.may_remain.count(name)) left.insert(name);
    EXPECT_TRUE(left.empty()) << "the refused entry left " << *left.begin() << " in " << data;
    if (c.may_remain.count("odd-xattr")) {
      char v[16];
      EXPECT_LT(lgetxattr((data + "/odd-xattr").c_str(), "os2.evil", v, sizeof v), 0);
    }
    printf("[ info ] %-50s -> %s", c.name.c_str(), m.r.err.c_str());
  }
  EXPECT_EQ(etc_fingerprint(), etc_before) << "/etc changed";
  EXPECT_FALSE(std::filesystem::exists("/etc/" + probe));
  EXPECT_FALSE(std::filesystem::exists("/etc/passwd-link"));
}



// A full copy's refusal is one line naming the master and what was wrong, as
// proto/blockrepl.capnp promises (found by this harness: the copy's errors named no peer, and the
// Store's own warning reached `mount`'s stderr as a second line).
TEST(HostileMaster, StolenSecretFullCopyRefusalIsOneLineNamingThePeer) {
  TempDir tmp("hm-oneline");
  const std::string secret = random_secret();
  const std::string secret_file = write_secret(tmp.path() + "/secret", secret);
  std::atomic<int> which{0};
  FakeMaster fake({secret_of(secret), FakeAuth::responder}, [&](FakeMasterSession& s) {
    s.send_welcome({});
    s.send_copy_entry([&](wire::CopyEntry::Builder e) {
      if (which == 0) file_entry(e, "../escape", kFidBase + 60, S_IFREG | 0644, "x");
      else file_entry(e, "mode-bits", kFidBase + 61, S_IFREG | 0644 | 0200000, "x");
    });
    s.send_copy_done(0);
    s.wait_closed(5000);
  });
  for (int i = 0; i < 2; i++) {
    which = i;
    const std::string data = tmp.sub("data" + std::to_string(i)), mnt = tmp.sub("mnt" + std::to_string(i));
    RefusedMount m = mount_slave_expecting_refusal(data, mnt, fake.address(), secret_file, tmp.path() + "/log" + std::to_string(i));
    expect_refusal(m, i == 0 ? "a '..' path" : "mode bits outside 07777", fake.address(), /*strict=*/true);
  }
}

// ---------------------------------------------------------------------------------------------
// 2b. A stolen secret: a slave that attached (its mount serves) is sent the attacks as records

Record rec_of(Op op) {
  Record r;
  r.op = op;
  return r;
}

// The records of one attack, their LSNs assigned from `first` on; a barrier follows them.
struct StreamStep {
  std::string name;
  bool expect_applied;  // harmless (the policy lets a trusted master send it) or refused
  std::function<std::vector<Record>()> records;
};

std::string status_line(const std::map<std::string, std::string>& outcomes) {
  std::string out;
  for (auto& [k, v] : outcomes) out += "  " + k + ": " + v + "\n";
  return out;
}

TEST(HostileMaster, StolenSecretStreamAttacksAreRefusedOrHarmless) {
  if (access("/usr/bin/cat", R_OK) != 0 || access("/usr/bin/setpriv", X_OK) != 0) GTEST_SKIP() << "needs cat and setpriv";
  TempDir tmp("hm-stream");
  // The mount is for everyone; the backing directory below a root-only vault, as blockrepl
  // requires of a replica's data directory.
  ASSERT_EQ(chmod(tmp.path().c_str(), 0711), 0);
  const std::string vault = tmp.sub("vault");
  ASSERT_EQ(chmod(vault.c_str(), 0700), 0);
  const std::string data = vault + "/data";
  ASSERT_EQ(mkdir(data.c_str(), 0755), 0);
  const std::string mnt = tmp.sub("mnt");
  const std::string log = vault + "/slave.log";
  const std::string secret = random_secret();
  const std::string secret_file = write_secret(vault + "/secret", secret);
  const std::string etc_before = etc_fingerprint();
  const std::string probe = etc_probe_name();

  Volume v;
  v.cat = read_file("/usr/bin/cat");
  const FileId link_fid = kFidBase + 40, chr_fid = kFidBase + 41, after_fid = kFidBase + 42;
  auto setxattr_rec = [](FileId fid, const std::string& name, const std::string& value) {
    Record r = rec_of(Op::setxattr);
    r.fid = fid;
    r.name = name;
    r.owned = value;
    r.data = r.owned;
    return r;
  };
  const std::string cap = security_capability_setuid();
  std::vector<StreamStep> steps = {
      // Harmless: a trusted master may send them (record_policy.h).
      {"chmod of the volume root to 0777", true, [] {
         Record r = rec_of(Op::setattr);
         r.fid = kRootFileId;
         r.attr_valid = kAttrMode;
         r.mode = S_IFDIR | 0777;
         return std::vector<Record>{r};
       }},
      {"a symlink to /etc", true, [=] {
         Record r = rec_of(Op::symlink);
         r.parent = kRootFileId;
         r.name = "etc-link";
         r.fid = link_fid;
         r.mode = S_IFLNK | 0777;
         r.owned = "/etc";
         r.data = r.owned;
         return std::vector<Record>{r};
       }},
      {"a trusted.* xattr and new times on the symlink to /etc (they land on the link)", true, [=] {
         Record t = rec_of(Op::setattr);
         t.fid = link_fid;
         t.attr_valid = kAttrAtime | kAttrMtime;
         t.atime = t.mtime = {1000000000, 0};
         return std::vector<Record>{setxattr_rec(link_fid, "trusted.hostile", "through-the-link"), t};
       }},
      {"a character device 254:1, mode 0666, owned by uid 1000", true, [=] {
         Record r = rec_of(Op::create);
         r.parent = kRootFileId;
         r.name = "chr-254";
         r.fid = chr_fid;
         r.mode = S_IFCHR | 0666;
         r.rdev = makedev(254, 1);
         r.uid = r.gid = 1000;
         return std::vector<Record>{r};
       }},
      {"security.capability (cap_setuid) on the set-uid-root program", true,
       [=] { return std::vector<Record>{setxattr_rec(v.cat_fid, "security.capability", cap)}; }},
      {"a trusted.* xattr on a file", true, [=] { return std::vector<Record>{setxattr_rec(v.good_fid, "trusted.hostile", "x")}; }},
      // Refused: each ends the session (the slave reconnects).
      {"a create named '..'", false, [=] {
         Record r = rec_of(Op::create);
         r.parent = kRootFileId;
         r.name = "..";
         r.fid = kFidBase + 50;
         r.mode = S_IFREG | 0644;
         return std::vector<Record>{r};
       }},
      {"a rename of the slave's .blockrepl folder to a visible name", false, [] {
         Record r = rec_of(Op::rename);
         r.parent = r.parent2 = kRootFileId;
         r.name = ".blockrepl";
         r.name2 = "visible-meta";
         return std::vector<Record>{r};
       }},
      {"a write to the symlink's file id (into /etc)", false, [=] {
         Record r = rec_of(Op::write);
         r.fid = link_fid;
         r.owned = "pwned\n";
         r.data = r.owned;
         return std::vector<Record>{r};
       }},
      {"a create in the symlink's directory (/etc/" + probe + ")", false, [=] {
         Record r = rec_of(Op::create);
         r.parent = link_fid;
         r.name = probe;
         r.fid = kFidBase + 51;
         r.mode = S_IFREG | 0644;
         return std::vector<Record>{r};
       }},
      {"a chmod 0777 of the symlink's file id (of /etc)", false, [=] {
         Record r = rec_of(Op::setattr);
         r.fid = link_fid;
         r.attr_valid = kAttrMode;
         r.mode = S_IFLNK | 0777;
         return std::vector<Record>{r};
       }},
      // And the slave still follows its master.
      {"a good file after the attacks", true, [=] {
         Record c = rec_of(Op::create);
         c.parent = kRootFileId;
         c.name = "after";
         c.fid = after_fid;
         c.mode = S_IFREG | 0644;
         Record w = rec_of(Op::write);
         w.fid = after_fid;
         w.owned = "still following\n";
         w.data = w.owned;
         return std::vector<Record>{c, w};
       }},
  };

  std::mutex mu;
  std::map<std::string, std::string> outcomes;  // step name -> "applied" / "refused (...)"
  std::map<std::string, Lsn> step_lsn;          // step name -> its first record's LSN
  size_t next_step = 0;
  std::atomic<bool> all_done{false};
  FakeMaster fake({secret_of(secret), FakeAuth::responder}, [&](FakeMasterSession& s) {
    Lsn lsn = 0;
    if (s.index() == 0) {
      // The first attach: a full copy with a good file, a set-uid-root program (with a file
      // capability in its entry), a block device anyone may open, owned by uid 1000.
      s.send_welcome({});
      s.send_copy_entry([&](wire::CopyEntry::Builder e) {
        file_entry(e, "good", v.good_fid, S_IFREG | 0644, v.good);
        auto x = e.initXattrs(1);
        x[0].setName("trusted.planted");
        x[0].setValue(bytes_of("in the copy"));
      });
      s.send_copy_entry([&](wire::CopyEntry::Builder e) {
        file_entry(e, "suid-cat", v.cat_fid, S_IFREG | 04755, v.cat);
        auto x = e.initXattrs(1);
        x[0].setName("security.capability");
        x[0].setValue(bytes_of(cap));
      });
      s.send_copy_entry([&](wire::CopyEntry::Builder e) {
        file_entry(e, "blk-254", v.blk_fid, S_IFBLK | 0666, "", 1000, 1000);
        e.setRdev(makedev(254, 0));
      });
      s.send_copy_done(0);
    } else {
      lsn = s.hello().getDurableLsn();
      s.send_welcome({wire::AttachMethod::STREAM, lsn, lsn});
    }
    for (;;) {
      size_t k;
      {
        std::lock_guard lk(mu);
        k = next_step;
      }
      if (k >= steps.size()) break;
      std::vector<Record> recs = steps[k].records();
      for (Record& r : recs) r.lsn = ++lsn;
      Record barrier = rec_of(Op::fsync);
      barrier.lsn = ++lsn;
      recs.push_back(barrier);
      s.send_batch(recs);
      std::string why;
      const bool applied = s.wait_durable_ack(barrier.lsn, 10000, &why);
      {
        std::lock_guard lk(mu);
        outcomes[steps[k].name] = applied ? "applied" : "refused (" + why + ")";
        step_lsn[steps[k].name] = recs.front().lsn;
        next_step++;
      }
      if (!applied) return;  // the slave hung up; it comes back with a new session
    }
    all_done = true;
    // Idle, as a master is: heartbeats until the test ends.
    while (!s.wait_closed(500)) s.send_heartbeat(lsn);
  });

  Mount slave(data, mnt, {"--master", fake.address(), "--secret-file", secret_file, "-v", "--log-file", log});
  ASSERT_TRUE(slave.ok()) << slave.error();
  // The slave serves its mount while it is attacked.
  size_t reads = 0, good_reads = 0;
  const bool done = repl::wait_until(
      [&] {
        reads++;
        try {
          good_reads += read_file(slave.file("good")) == v.good;
        } catch (const std::exception&) {
        }
        return all_done.load();
      },
      60s, 100ms);
  std::map<std::string, std::string> got;
  std::map<std::string, Lsn> lsns;
  {
    std::lock_guard lk(mu);
    got = outcomes;
    lsns = step_lsn;
  }
  const std::string slave_log = read_file(log);
  ASSERT_TRUE(done) << "the fake master did not get through its steps:\n" << status_line(got) << slave_log;
  EXPECT_EQ(good_reads, reads) << "reads of the mount failed while the slave was attacked";
  printf("[ info ] outcomes:\n%s", status_line(got).c_str());

  for (const StreamStep& st : steps) {
    SCOPED_TRACE(st.name);
    ASSERT_TRUE(got.count(st.name));
    if (st.expect_applied) {
      EXPECT_EQ(got[st.name], "applied");
    } else {
      EXPECT_EQ(got[st.name].rfind("refused", 0), 0u) << got[st.name];
      // One line names the peer and the record (its LSN).
      const std::vector<std::string> needles = {"master " + fake.address(), "lsn " + std::to_string(lsns[st.name]) + " "};
      EXPECT_GE(count_lines_with_all(slave_log, needles), 1u) << "no line names " << needles[0] << " and " << needles[1] << ":\n"
                                                               << slave_log;
    }
  }
  // Served and followed throughout.
  EXPECT_EQ(read_file(slave.file("good")), v.good);
  EXPECT_EQ(read_file(slave.file("after")), "still following\n");

  // Nothing of the refused records is in the data directory; the metadata folder is where it was.
  struct stat st;
  EXPECT_EQ(lstat((data + "/.blockrepl").c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  EXPECT_EQ(list_dir(data), (std::set<std::string>{".blockrepl", "after", "blk-254", "chr-254", "etc-link", "good", "suid-cat"}));
  // /etc never changed, through the symlink or otherwise.
  EXPECT_EQ(etc_fingerprint(), etc_before) << "/etc changed";
  EXPECT_FALSE(std::filesystem::exists("/etc/" + probe));
  char buf[256];
  EXPECT_LT(lgetxattr("/etc", "trusted.hostile", buf, sizeof buf), 0) << "the link's xattr reached /etc";
  ASSERT_EQ(lstat((data + "/etc-link").c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
  EXPECT_EQ(st.st_mtim.tv_sec, 1000000000) << "the times went elsewhere than the link";

  // What was applied, as applied: a trusted master's records are kept faithfully...
  ASSERT_EQ(lstat(data.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0777u) << "the volume root's mode";
  ASSERT_EQ(lstat((data + "/blk-254").c_str(), &st), 0);
  EXPECT_TRUE(S_ISBLK(st.st_mode));
  EXPECT_EQ(st.st_rdev, makedev(254, 0));
  EXPECT_EQ(st.st_uid, 1000u);
  ASSERT_EQ(lstat((data + "/chr-254").c_str(), &st), 0);
  EXPECT_TRUE(S_ISCHR(st.st_mode));
  ASSERT_EQ(lstat((data + "/suid-cat").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 04755u);
  EXPECT_EQ(st.st_uid, 0u);
  const bool has_cap = lgetxattr((data + "/suid-cat").c_str(), "security.capability", buf, sizeof buf) > 0;
  const bool has_trusted = lgetxattr((data + "/good").c_str(), "trusted.hostile", buf, sizeof buf) > 0;
  const bool has_planted = lgetxattr((data + "/good").c_str(), "trusted.planted", buf, sizeof buf) > 0;
  EXPECT_TRUE(has_cap) << "security.capability was acknowledged but is not on the file";
  EXPECT_TRUE(has_trusted);
  printf("[ info ] applied: root 0777, blk 254:0 and chr 254:1 0666 uid 1000, suid-cat 04755 root (capability %s), trusted.* "
         "(stream %s, copy %s)\n",
         has_cap ? "kept" : "gone", has_trusted ? "kept" : "gone", has_planted ? "kept" : "gone");

  // ... and unreachable for unprivileged users: through the backing directory (its vault is
  // root-only) neither nobody nor uid 1000 (the devices' owner) opens or runs anything...
  for (uid_t uid : {kNobody, uid_t{1000}}) {
    SCOPED_TRACE("as uid " + std::to_string(uid));
    EXPECT_EQ(as_user(uid, uid, [&] { return open_errno(data + "/blk-254", O_RDWR); }), EACCES);
    EXPECT_EQ(as_user(uid, uid, [&] { return open_errno(data + "/chr-254", O_RDWR); }), EACCES);
    EXPECT_EQ(as_user(uid, uid, [&] { return exec_errno(data + "/suid-cat", "/dev/null"); }), EACCES);
    EXPECT_EQ(as_user(uid, uid, [&] { return open_errno(data + "/planted-by-nobody", O_WRONLY | O_CREAT); }), EACCES)
        << "the 0777 root let an unprivileged user write into the backing directory";
    // ... and through the mount (nosuid,nodev, read-only): no device opens, root's included,
    EXPECT_EQ(as_user(uid, uid, [&] { return open_errno(slave.file("blk-254"), O_RDONLY); }), EACCES);
    EXPECT_EQ(as_user(uid, uid, [&] { return open_errno(slave.file("chr-254"), O_RDONLY); }), EACCES);
    const int create = as_user(uid, uid, [&] { return open_errno(slave.file("planted-by-nobody"), O_WRONLY | O_CREAT); });
    EXPECT_TRUE(create == EROFS || create == EACCES) << "creating in the 0777 root of the mount: " << errname(create);
    // trusted.* is for CAP_SYS_ADMIN only.
    EXPECT_NE(as_user(uid, uid, [&] { return lgetxattr(slave.file("good").c_str(), "trusted.hostile", buf, sizeof buf) < 0 ? errno : 0; }), 0);
  }
  EXPECT_EQ(open_errno(slave.file("blk-254"), O_RDONLY), EACCES) << "root opened a device node through the nodev mount";
  EXPECT_EQ(open_errno(slave.file("chr-254"), O_RDONLY), EACCES) << "root opened a device node through the nodev mount";
  EXPECT_FALSE(std::filesystem::exists(data + "/planted-by-nobody"));
  // the set-uid bit and the capability give nothing: the program runs with nobody's rights.
  CommandResult r = run_command({"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", slave.file("suid-cat"),
                                 "/proc/self/status"}, 30);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("Uid:\t65534\t65534\t65534\t65534"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("CapPrm:\t0000000000000000"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("CapEff:\t0000000000000000"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace blockrepl::test
