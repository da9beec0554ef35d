#include "replication_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <fstream>
#include <random>
#include <signal.h>
#include <sstream>
#include <stdexcept>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <thread>
#include <unistd.h>

namespace blockrepl::test::repl {

namespace {

constexpr const char kFidXattr[] = "trusted.blockrepl.fid";
constexpr const char kMetaDir[] = ".blockrepl";

std::string errno_text(int e) { return std::string(strerror(e)) + " (errno " + std::to_string(e) + ")"; }

std::chrono::milliseconds remaining(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() > 0 ? left : std::chrono::milliseconds(0);
}

std::string one_line(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  for (auto& c : s)
    if (c == '\n') c = ' ';
  return s;
}

std::string hex(const std::string& s, size_t max = 32) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < s.size() && i < max; i++) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    out += d[c >> 4];
    out += d[c & 15];
  }
  if (s.size() > max) out += "...";
  return out;
}

std::string type_of(mode_t m) {
  if (S_ISREG(m)) return "file";
  if (S_ISDIR(m)) return "dir";
  if (S_ISLNK(m)) return "symlink";
  if (S_ISFIFO(m)) return "fifo";
  if (S_ISCHR(m)) return "chr";
  if (S_ISBLK(m)) return "blk";
  if (S_ISSOCK(m)) return "sock";
  return "?";
}

std::string octal(mode_t m) {
  char buf[16];
  snprintf(buf, sizeof buf, "%o", static_cast<unsigned>(m));
  return buf;
}

// All xattrs of path (not following symlinks) whose name starts with prefix.
std::map<std::string, std::string> list_xattrs(const std::string& path, const std::string& prefix) {
  std::map<std::string, std::string> out;
  ssize_t n = llistxattr(path.c_str(), nullptr, 0);
  if (n <= 0) return out;
  std::string names(static_cast<size_t>(n) + 256, '\0');
  n = llistxattr(path.c_str(), names.data(), names.size());
  if (n <= 0) return out;
  names.resize(static_cast<size_t>(n));
  for (size_t pos = 0; pos < names.size();) {
    std::string name = names.c_str() + pos;
    pos += name.size() + 1;
    if (name.rfind(prefix, 0) != 0) continue;
    ssize_t v = lgetxattr(path.c_str(), name.c_str(), nullptr, 0);
    if (v < 0) continue;
    std::string value(static_cast<size_t>(v) + 1, '\0');
    v = lgetxattr(path.c_str(), name.c_str(), value.data(), value.size());
    if (v < 0) continue;
    value.resize(static_cast<size_t>(v));
    out[name] = value;
  }
  return out;
}

void scan_into(const std::string& root, const std::string& rel, bool with_fid, std::map<std::string, Entry>& out) {
  const std::string path = rel.empty() ? root : root + "/" + rel;
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) throw std::runtime_error("lstat " + path + ": " + errno_text(errno));
  Entry e;
  e.type = type_of(st.st_mode);
  e.mode = st.st_mode;
  e.uid = st.st_uid;
  e.gid = st.st_gid;
  e.size = (S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)) ? static_cast<uint64_t>(st.st_size) : 0;
  e.nlink = st.st_nlink;
  e.rdev = st.st_rdev;
  e.ino = st.st_ino;
  e.mtime = st.st_mtim;
  if (S_ISLNK(st.st_mode)) {
    std::string target(static_cast<size_t>(st.st_size) + 1, '\0');
    ssize_t n = readlink(path.c_str(), target.data(), target.size());
    if (n >= 0) target.resize(static_cast<size_t>(n));
    e.link_target = target;
  }
  e.xattrs = list_xattrs(path, "user.");
  if (with_fid) {
    ssize_t v = lgetxattr(path.c_str(), kFidXattr, nullptr, 0);
    if (v >= 0) {
      std::string value(static_cast<size_t>(v) + 1, '\0');
      v = lgetxattr(path.c_str(), kFidXattr, value.data(), value.size());
      if (v >= 0) {
        value.resize(static_cast<size_t>(v));
        e.has_fid = true;
        e.fid = value;
      }
    }
  }
  out[rel] = e;
  if (!S_ISDIR(st.st_mode)) return;
  DIR* d = opendir(path.c_str());
  if (!d) throw std::runtime_error("opendir " + path + ": " + errno_text(errno));
  std::vector<std::string> names;
  while (dirent* de = readdir(d)) {
    std::string n = de->d_name;
    if (n == "." || n == "..") continue;
    if (rel.empty() && (n == kMetaDir || (n == "lost+found" && de->d_type == DT_DIR))) continue;  // not the volume's
    names.push_back(n);
  }
  closedir(d);
  std::sort(names.begin(), names.end());
  for (auto& n : names) scan_into(root, rel.empty() ? n : rel + "/" + n, with_fid, out);
}

// "" if equal, else where and how the contents of two regular files differ.
std::string compare_contents(const std::string& a, const std::string& b, const std::string& an, const std::string& bn) {
  int fa = open(a.c_str(), O_RDONLY | O_CLOEXEC);
  if (fa < 0) return "cannot open " + a + ": " + errno_text(errno);
  int fb = open(b.c_str(), O_RDONLY | O_CLOEXEC);
  if (fb < 0) {
    int e = errno;
    close(fa);
    return "cannot open " + b + ": " + errno_text(e);
  }
  const size_t kChunk = 1 << 20;
  std::string ba(kChunk, '\0'), bb(kChunk, '\0');
  uint64_t off = 0, first_diff = UINT64_MAX, diff_bytes = 0, last_diff = 0;
  std::string result;
  unsigned char va = 0, vb = 0;
  for (;;) {
    ssize_t na = pread(fa, ba.data(), kChunk, static_cast<off_t>(off));
    ssize_t nb = pread(fb, bb.data(), kChunk, static_cast<off_t>(off));
    if (na < 0 || nb < 0) {
      result = std::string("read error: ") + errno_text(errno);
      break;
    }
    ssize_t n = std::min(na, nb);
    if (memcmp(ba.data(), bb.data(), static_cast<size_t>(n)) != 0) {
      for (ssize_t i = 0; i < n; i++) {
        if (ba[static_cast<size_t>(i)] != bb[static_cast<size_t>(i)]) {
          if (first_diff == UINT64_MAX) {
            first_diff = off + static_cast<uint64_t>(i);
            va = static_cast<unsigned char>(ba[static_cast<size_t>(i)]);
            vb = static_cast<unsigned char>(bb[static_cast<size_t>(i)]);
          }
          diff_bytes++;
          last_diff = off + static_cast<uint64_t>(i);
        }
      }
    }
    if (na != nb) {
      if (result.empty())
        result = "lengths read differ at offset " + std::to_string(off + static_cast<uint64_t>(n)) + " (" +
                 std::to_string(na) + " vs " + std::to_string(nb) + " bytes in this chunk)";
      break;
    }
    if (na == 0) break;
    off += static_cast<uint64_t>(na);
  }
  close(fa);
  close(fb);
  if (first_diff != UINT64_MAX) {
    char buf[256];
    snprintf(buf, sizeof buf,
             "contents differ: %llu bytes differ between offsets %llu and %llu (block %llu of 4 KiB); first: 0x%02x (%s) vs "
             "0x%02x (%s)",
             static_cast<unsigned long long>(diff_bytes), static_cast<unsigned long long>(first_diff),
             static_cast<unsigned long long>(last_diff), static_cast<unsigned long long>(first_diff / 4096), va, an.c_str(),
             vb, bn.c_str());
    return buf + (result.empty() ? "" : "; " + result);
  }
  return result;
}

// For every path, the sorted list of other paths that are the same inode (hard links).
std::map<std::string, std::string> link_groups(const std::map<std::string, Entry>& t) {
  std::map<ino_t, std::vector<std::string>> by_ino;
  for (auto& [p, e] : t)
    if (e.type != "dir") by_ino[e.ino].push_back(p);
  std::map<std::string, std::string> out;
  for (auto& [ino, paths] : by_ino) {
    if (paths.size() < 2) continue;
    std::string all;
    for (auto& p : paths) all += (all.empty() ? "" : ", ") + p;
    for (auto& p : paths) out[p] = all;
  }
  return out;
}

uint64_t fnv1a(uint64_t h, const char* p, size_t n) {
  for (size_t i = 0; i < n; i++) {
    h ^= static_cast<unsigned char>(p[i]);
    h *= 1099511628211ull;
  }
  return h;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Status and waiting

json status(const std::string& mnt, std::string* err, int timeout_sec) {
  CommandResult r = run_blockrepl({"status", mnt, "--json"}, timeout_sec);
  if (r.exit_code != 0) {
    if (err)
      *err = "blockrepl status " + mnt + " --json: exit " + std::to_string(r.exit_code) + ": " + one_line(r.err);
    return json();
  }
  json j = json::parse(r.out, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    if (err) *err = "blockrepl status " + mnt + " --json printed no JSON object: " + r.out;
    return json();
  }
  return j;
}

uint64_t lsn_of(const std::string& mnt) {
  std::string err;
  json j = status(mnt, &err);
  if (j.is_null()) throw std::runtime_error(err);
  if (!j.contains("lsn") || !j["lsn"].is_number_unsigned())
    throw std::runtime_error("status of " + mnt + " has no numeric lsn: " + j.dump());
  return j["lsn"].get<uint64_t>();
}

bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout, std::chrono::milliseconds every) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (Clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(every);
  }
}

std::string wait_durable(const std::string& slave_mnt, uint64_t lsn, std::chrono::milliseconds timeout) {
  std::string last = "no status yet";
  auto deadline = Clock::now() + timeout;
  for (;;) {
    std::string err;
    json j = status(slave_mnt, &err);
    if (j.is_null()) {
      last = err;
    } else {
      const json& up = j.contains("upstream") ? j["upstream"] : json();
      if (!up.is_object()) {
        last = "status has no upstream object: " + j.dump();
      } else {
        uint64_t durable = up.value("durable_lsn", uint64_t{0});
        std::string state = up.value("state", std::string("?"));
        if (state == "streaming" && durable >= lsn) return "";
        last = "upstream state " + state + ", durable_lsn " + std::to_string(durable) + ", received_lsn " +
               std::to_string(up.value("received_lsn", uint64_t{0})) + " (want durable >= " + std::to_string(lsn) + ")" +
               (up.contains("last_error") ? ", last_error: " + up["last_error"].dump() : "");
      }
    }
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return "slave " + slave_mnt + " not durable at lsn " + std::to_string(lsn) + " after " +
         std::to_string(timeout.count()) + " ms: " + last;
}

std::string sync_point(const std::string& mnt) {
  std::string errors;
  std::function<void(const std::string&)> walk = [&](const std::string& dir) {
    DIR* d = opendir(dir.c_str());
    if (!d) {
      errors += "opendir " + dir + ": " + errno_text(errno) + "; ";
      return;
    }
    std::vector<std::string> names;
    while (dirent* de = readdir(d)) {
      std::string n = de->d_name;
      if (n != "." && n != "..") names.push_back(n);
    }
    closedir(d);
    for (auto& n : names) {
      std::string p = dir + "/" + n;
      struct stat st;
      if (lstat(p.c_str(), &st) != 0) continue;  // raced with a change: the root fsync covers it
      if (S_ISDIR(st.st_mode)) {
        walk(p);
      } else if (S_ISREG(st.st_mode)) {
        int fd = open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0) continue;
        if (fsync(fd) != 0) errors += "fsync " + p + ": " + errno_text(errno) + "; ";
        close(fd);
      }
    }
    int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
      errors += "open " + dir + ": " + errno_text(errno) + "; ";
      return;
    }
    if (fsync(fd) != 0) errors += "fsync " + dir + ": " + errno_text(errno) + "; ";
    close(fd);
  };
  walk(mnt);
  return errors;
}

std::string sync_and_wait(const std::string& master_mnt, const std::vector<std::string>& slave_mnts,
                          std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  std::string last;
  for (int round = 0;; round++) {
    if (std::string e = sync_point(master_mnt); !e.empty()) return "sync point on " + master_mnt + " failed: " + e;
    uint64_t lsn;
    try {
      lsn = lsn_of(master_mnt);
    } catch (const std::exception& e) {
      return e.what();
    }
    for (auto& s : slave_mnts) {
      std::string e = wait_durable(s, lsn, remaining(deadline));
      if (!e.empty()) return e;
    }
    uint64_t again;
    try {
      again = lsn_of(master_mnt);
    } catch (const std::exception& e) {
      return e.what();
    }
    if (again == lsn) return "";
    last = "master lsn moved from " + std::to_string(lsn) + " to " + std::to_string(again) + " while waiting";
    if (Clock::now() >= deadline) return last + " (gave up after " + std::to_string(round + 1) + " rounds)";
  }
}

// ---------------------------------------------------------------------------------------------
// Processes

pid_t daemon_pid(const std::string& data) {
  std::ifstream in(data + "/" + kMetaDir + "/daemon.pid");
  pid_t pid = 0;
  if (!(in >> pid)) return 0;
  return pid;
}

bool process_alive(pid_t pid) {
  if (pid <= 0) return false;
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string s;
  if (!std::getline(in, s)) return false;
  auto rp = s.rfind(')');
  if (rp == std::string::npos || rp + 2 >= s.size()) return false;
  char state = s[rp + 2];
  return state != 'Z' && state != 'X';
}

bool wait_dead(pid_t pid, std::chrono::milliseconds timeout) {
  return wait_until([&] { return !process_alive(pid); }, timeout, std::chrono::milliseconds(20));
}

ContinueOnExit::~ContinueOnExit() { cont(); }

void ContinueOnExit::cont() {
  if (pid_ > 0) kill(pid_, SIGCONT);
  pid_ = 0;
}

// ---------------------------------------------------------------------------------------------
// Nodes and clusters

Cluster::Cluster(const std::string& tag) : tmp_(tag) {}

Cluster::~Cluster() {
  if (::testing::Test::HasFailure()) fprintf(stderr, "%s", all_logs().c_str());
  for (auto it = nodes_.rbegin(); it != nodes_.rend(); ++it) {
    Node& n = **it;
    if (n.mount) n.mount.reset();
    if (is_mounted(n.mnt)) detach(n);
  }
}

Node& Cluster::define(const std::string& name, const std::string& master_address, const std::vector<std::string>& extra,
                      bool listen) {
  auto n = std::make_unique<Node>();
  n->name = name;
  n->data = tmp_.sub(name + "-data");
  n->mnt = tmp_.sub(name + "-mnt");
  n->log = tmp_.path() + "/" + name + ".log";
  n->master_address = master_address;
  n->extra = extra;
  if (listen) n->port = free_port();
  nodes_.push_back(std::move(n));
  return *nodes_.back();
}

std::string Cluster::private_data_dir(const std::string& vault) const {
  const std::string p = tmp_.path() + "/" + vault, data = p + "/data";
  if (mkdir(p.c_str(), 0700) != 0 && errno != EEXIST) fail_sys("mkdir(" + p + ")");
  if (chmod(p.c_str(), 0700) != 0) fail_sys("chmod(" + p + ")");
  if (mkdir(data.c_str(), 0755) != 0 && errno != EEXIST) fail_sys("mkdir(" + data + ")");
  if (chmod(data.c_str(), 0755) != 0) fail_sys("chmod(" + data + ")");
  return data;
}

Node& Cluster::define_master(const std::vector<std::string>& extra) {
  return define("master" + std::to_string(nodes_.size()), "", extra, true);
}

Node& Cluster::define_slave(Node& upstream, const std::vector<std::string>& extra, bool listen) {
  return define("slave" + std::to_string(nodes_.size()), upstream.address(), extra, listen);
}

Node& Cluster::add_master(const std::vector<std::string>& extra) {
  Node& n = define_master(extra);
  mount(n);
  return n;
}

Node& Cluster::add_slave(Node& upstream, const std::vector<std::string>& extra, bool listen) {
  Node& n = define_slave(upstream, extra, listen);
  mount(n);
  return n;
}

bool Cluster::mount(Node& n) {
  std::vector<std::string> args = n.extra;
  args.insert(args.end(), {"-v", "--log-file", n.log});
  if (!n.master_address.empty()) args.insert(args.end(), {"--master", n.master_address});
  if (n.port) args.insert(args.end(), {"--listen", n.address()});
  n.mount.reset();
  n.mount = std::make_unique<Mount>(n.data, n.mnt, args);
  if (!n.mount->ok()) ADD_FAILURE() << n.name << " did not mount; its log:\n" << log_tail(n);
  return n.mount->ok();
}

void Cluster::unmount(Node& n) {
  if (n.mount) n.mount->unmount();
  n.mount.reset();
}

void Cluster::detach(Node& n) {
  run_command({"fusermount3", "-u", "-z", n.mnt}, 30);
  n.mount.reset();  // nothing mounted any more: its destructor does nothing
}

std::string Cluster::log_tail(const Node& n, size_t max_bytes) const {
  std::string s;
  try {
    s = read_file(n.log);
  } catch (const std::exception&) {
    return "(no log at " + n.log + ")\n";
  }
  if (s.size() > max_bytes) s = "[...]\n" + s.substr(s.size() - max_bytes);
  return s;
}

std::string Cluster::all_logs() const {
  std::string out;
  for (auto& n : nodes_)
    out += "----- log of " + n->name + " (" + n->data + ") -----\n" + log_tail(*n);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Tree comparison

std::map<std::string, Entry> scan_tree(const std::string& root, bool with_fid) {
  std::map<std::string, Entry> out;
  scan_into(root, "", with_fid, out);
  return out;
}

std::vector<std::string> compare_trees(const std::string& a, const std::string& b, const CompareOptions& o,
                                       const std::string& an, const std::string& bn) {
  std::vector<std::string> diffs;
  std::map<std::string, Entry> ta, tb;
  try {
    ta = scan_tree(a, o.fid);
    tb = scan_tree(b, o.fid);
  } catch (const std::exception& e) {
    return {std::string("cannot scan: ") + e.what()};
  }
  auto report = [&](const std::string& path, const std::string& what) {
    diffs.push_back((path.empty() ? "<root>" : path) + ": " + what);
  };
  auto versus = [&](const std::string& x, const std::string& y) { return x + " (" + an + ") vs " + y + " (" + bn + ")"; };
  auto ga = link_groups(ta), gb = link_groups(tb);
  for (auto& [p, ea] : ta) {
    auto it = tb.find(p);
    if (it == tb.end()) {
      report(p, "only in " + an + " (" + ea.type + ", size " + std::to_string(ea.size) + ")");
      continue;
    }
    const Entry& eb = it->second;
    if (ea.type != eb.type) {
      report(p, "type " + versus(ea.type, eb.type));
      continue;
    }
    if (ea.mode != eb.mode) report(p, "mode " + versus(octal(ea.mode), octal(eb.mode)));
    if (o.ownership && (ea.uid != eb.uid || ea.gid != eb.gid))
      report(p, "owner " + versus(std::to_string(ea.uid) + ":" + std::to_string(ea.gid),
                                  std::to_string(eb.uid) + ":" + std::to_string(eb.gid)));
    if (ea.type != "dir" && ea.size != eb.size) report(p, "size " + versus(std::to_string(ea.size), std::to_string(eb.size)));
    if (ea.type != "dir" && ea.nlink != eb.nlink)
      report(p, "link count " + versus(std::to_string(ea.nlink), std::to_string(eb.nlink)));
    if ((ea.type == "chr" || ea.type == "blk") && ea.rdev != eb.rdev)
      report(p, "rdev " + versus(std::to_string(major(ea.rdev)) + ":" + std::to_string(minor(ea.rdev)),
                                 std::to_string(major(eb.rdev)) + ":" + std::to_string(minor(eb.rdev))));
    if (ea.type == "symlink" && ea.link_target != eb.link_target)
      report(p, "symlink target " + versus("'" + ea.link_target + "'", "'" + eb.link_target + "'"));
    if (o.file_mtimes && ea.type == "file" &&
        (ea.mtime.tv_sec != eb.mtime.tv_sec || ea.mtime.tv_nsec != eb.mtime.tv_nsec))
      report(p, "mtime " + versus(std::to_string(ea.mtime.tv_sec) + "." + std::to_string(ea.mtime.tv_nsec),
                                  std::to_string(eb.mtime.tv_sec) + "." + std::to_string(eb.mtime.tv_nsec)));
    if (o.dir_mtimes && ea.type == "dir" && (ea.mtime.tv_sec != eb.mtime.tv_sec || ea.mtime.tv_nsec != eb.mtime.tv_nsec))
      report(p, "directory mtime " + versus(std::to_string(ea.mtime.tv_sec) + "." + std::to_string(ea.mtime.tv_nsec),
                                            std::to_string(eb.mtime.tv_sec) + "." + std::to_string(eb.mtime.tv_nsec)));
    if (ea.xattrs != eb.xattrs) {
      for (auto& [k, v] : ea.xattrs) {
        auto x = eb.xattrs.find(k);
        if (x == eb.xattrs.end()) report(p, "xattr " + k + " only in " + an);
        else if (x->second != v) report(p, "xattr " + k + " value " + versus(hex(v), hex(x->second)));
      }
      for (auto& [k, v] : eb.xattrs)
        if (!ea.xattrs.count(k)) report(p, "xattr " + k + " only in " + bn);
    }
    if (o.fid) {
      if (o.require_fid && ea.type == "file" && !ea.has_fid) report(p, std::string(kFidXattr) + " missing in " + an);
      if (o.require_fid && ea.type == "file" && !eb.has_fid) report(p, std::string(kFidXattr) + " missing in " + bn);
      if (ea.has_fid != eb.has_fid || ea.fid != eb.fid)
        report(p, std::string(kFidXattr) + " " +
                      versus(ea.has_fid ? hex(ea.fid) : "<none>", eb.has_fid ? hex(eb.fid) : "<none>"));
    }
    auto la = ga.count(p) ? ga[p] : "", lb = gb.count(p) ? gb[p] : "";
    if (la != lb) report(p, "hard-link group " + versus("{" + la + "}", "{" + lb + "}"));
    if (o.contents && ea.type == "file") {
      std::string c = compare_contents(a + "/" + p, b + "/" + p, an, bn);
      if (!c.empty()) report(p, c);
    }
  }
  for (auto& [p, eb] : tb)
    if (!ta.count(p)) report(p, "only in " + bn + " (" + eb.type + ", size " + std::to_string(eb.size) + ")");
  return diffs;
}

std::string diff_report(const std::string& a, const std::string& b, const CompareOptions& opts, const std::string& an,
                        const std::string& bn) {
  auto d = compare_trees(a, b, opts, an, bn);
  if (d.empty()) return "";
  std::string out = std::to_string(d.size()) + " difference(s) between " + an + " (" + a + ") and " + bn + " (" + b + "):\n";
  for (size_t i = 0; i < d.size() && i < opts.max_reports; i++) out += "  " + d[i] + "\n";
  if (d.size() > opts.max_reports) out += "  ... and " + std::to_string(d.size() - opts.max_reports) + " more\n";
  return out;
}

std::map<std::string, std::string> manifest(const std::string& root, bool with_fid) {
  std::map<std::string, std::string> out;
  for (auto& [p, e] : scan_tree(root, with_fid)) {
    std::string d = e.type + " mode=" + octal(e.mode) + " owner=" + std::to_string(e.uid) + ":" + std::to_string(e.gid) +
                    " size=" + std::to_string(e.size) + " target=" + e.link_target + " fid=" + hex(e.fid);
    for (auto& [k, v] : e.xattrs) d += " " + k + "=" + hex(v);
    if (e.type == "file") {
      try {
        std::string c = read_file(root + "/" + p);
        char buf[32];
        snprintf(buf, sizeof buf, " fnv=%016llx", static_cast<unsigned long long>(fnv1a(14695981039346656037ull, c.data(), c.size())));
        d += buf;
      } catch (const std::exception& ex) {
        d += std::string(" unreadable: ") + ex.what();
      }
    }
    out[p.empty() ? "<root>" : p] = d;
  }
  return out;
}

std::string manifest_diff(const std::map<std::string, std::string>& before, const std::map<std::string, std::string>& after) {
  std::string out;
  for (auto& [p, d] : before) {
    auto it = after.find(p);
    if (it == after.end()) out += "  " + p + ": disappeared (was " + d + ")\n";
    else if (it->second != d) out += "  " + p + ": changed from [" + d + "] to [" + it->second + "]\n";
  }
  for (auto& [p, d] : after)
    if (!before.count(p)) out += "  " + p + ": appeared (" + d + ")\n";
  return out;
}

// ---------------------------------------------------------------------------------------------
// Small file utilities

std::string random_bytes(uint64_t seed, size_t n) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v = rng();
    memcpy(s.data() + i, &v, std::min<size_t>(8, n - i));
  }
  return s;
}

void pwrite_all(int fd, const std::string& data, off_t offset) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t w = pwrite(fd, data.data() + done, data.size() - done, offset + static_cast<off_t>(done));
    if (w < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("pwrite at " + std::to_string(offset + static_cast<off_t>(done)) + ": " + errno_text(errno));
    }
    done += static_cast<size_t>(w);
  }
}

std::string pread_all(int fd, size_t n, off_t offset) {
  std::string s(n, '\0');
  size_t done = 0;
  while (done < n) {
    ssize_t r = pread(fd, s.data() + done, n - done, offset + static_cast<off_t>(done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error("pread at " + std::to_string(offset + static_cast<off_t>(done)) + ": " + errno_text(errno));
    }
    if (r == 0) break;
    done += static_cast<size_t>(r);
  }
  s.resize(done);
  return s;
}

}  // namespace blockrepl::test::repl
