// The shared file-system helpers: the name check, directory listing, atomic small-file writes
// and opening peer paths beneath a directory.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "blockrepl/fsutil.h"
#include "blockrepl/metadata.h"
#include "blockrepl/namespace.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

namespace fs = std::filesystem;

void spit(const std::string& path, const std::string& content) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0) << path << ": " << strerror(errno);
  ASSERT_EQ(write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
  close(fd);
}

std::string slurp(const std::string& path) {
  std::string out;
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "<missing>";
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  close(fd);
  return out;
}

size_t count_open_fds() {
  size_t n = 0;
  for (auto& e : fs::directory_iterator("/proc/self/fd")) n += !e.path().empty();
  return n;  // includes the iterator's own descriptor, the same each time
}

std::vector<std::string> sorted_names(const DirListing& l) {
  std::vector<std::string> names;
  for (const auto& e : l.entries) names.push_back(e.name);
  std::sort(names.begin(), names.end());
  return names;
}

// Same device and inode: the descriptor names that file.
bool same_file(int fd, const std::string& path) {
  struct stat a, b;
  return fstat(fd, &a) == 0 && stat(path.c_str(), &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

struct Dir {
  TempDir tmp;
  int fd = -1;
  Dir() { fd = open(tmp.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); }
  ~Dir() { close(fd); }
  std::string at(const std::string& rel) const { return tmp.path + "/" + rel; }
};

// ---------------------------------------------------------------------------------------------
// valid_path_component

TEST(ValidPathComponent, AcceptsOneComponent) {
  const std::string good_names[] = {"a",          "file.txt",   "...",          ".hidden", "..x",
                                    "x..",        "with space", "lost+found",   ".blockrepl", "\xc3\xbcnicode",
                                    "-dash",      std::string(kMaxNameBytes, 'n')};
  for (const std::string& good : good_names)
    EXPECT_TRUE(valid_path_component(good)) << "'" << good << "'";
}

TEST(ValidPathComponent, RefusesWhatIsNotOneComponent) {
  const std::string bad[] = {"",  ".",   "..", "a/b", "/", "/a", "a/", "../x", std::string("a\0b", 3),
                             std::string(1, '\0'), std::string(kMaxNameBytes + 1, 'n')};
  for (const std::string& b : bad) EXPECT_FALSE(valid_path_component(b)) << "'" << b << "' (" << b.size() << " bytes)";
}

TEST(ValidRelativePath, BuiltOnTheComponentCheck) {
  EXPECT_TRUE(valid_relative_path(""));  // the root
  EXPECT_TRUE(valid_relative_path("a/b/c"));
  EXPECT_TRUE(valid_relative_path("a/.blockrepl"));  // only the root's is the metadata folder
  for (const char* bad : {"/a", "a//b", "a/", "a/../b", "..", "./a", ".blockrepl", ".blockrepl/x"})
    EXPECT_FALSE(valid_relative_path(bad)) << bad;
  EXPECT_FALSE(valid_relative_path(std::string("a/b\0c", 5)));
}

// ---------------------------------------------------------------------------------------------
// list_dir

TEST(ListDir, AtTheRootSkipsTheMetadataFolderAndLostFoundDirectory) {
  Dir d;
  ASSERT_EQ(mkdir(d.at(kMetadataDirName).c_str(), 0700), 0);
  ASSERT_EQ(mkdir(d.at("lost+found").c_str(), 0700), 0);
  ASSERT_EQ(mkdir(d.at("sub").c_str(), 0700), 0);
  ASSERT_EQ(mkdir(d.at("sub/lost+found").c_str(), 0700), 0);
  ASSERT_EQ(mkdir(d.at("sub/" + std::string(kMetadataDirName)).c_str(), 0700), 0);
  spit(d.at("file"), "x");

  const DirListing root = list_dir(d.fd, /*at_volume_root=*/true);
  EXPECT_EQ(root.error, 0);
  EXPECT_EQ(sorted_names(root), (std::vector<std::string>{"file", "sub"}));
  for (const auto& e : root.entries) EXPECT_EQ(e.is_dir(), e.name == "sub") << e.name;

  // Below the root both are ordinary names of the volume.
  int sub = open(d.at("sub").c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);  // O_PATH is enough
  ASSERT_GE(sub, 0);
  EXPECT_EQ(sorted_names(list_dir(sub, false)), (std::vector<std::string>{".blockrepl", "lost+found"}));
  close(sub);

  // Not at the root, nothing is hidden.
  EXPECT_EQ(sorted_names(list_dir(d.fd, false)), (std::vector<std::string>{".blockrepl", "file", "lost+found", "sub"}));
}

TEST(ListDir, KeepsALostFoundFileAtTheRoot) {
  Dir d;
  spit(d.at("lost+found"), "a file, not fsck's directory");
  EXPECT_EQ(sorted_names(list_dir(d.fd, true)), (std::vector<std::string>{"lost+found"}));
}

TEST(ListDir, ClosesItsStreamBeforeReturning) {
  Dir d;
  for (int i = 0; i < 100; i++) spit(d.at("f" + std::to_string(i)), "");
  const size_t before = count_open_fds();
  const DirListing l = list_dir(d.fd, true);
  EXPECT_EQ(l.entries.size(), 100u);
  EXPECT_EQ(count_open_fds(), before);
  (void)list_dir(d.fd, true, /*max_entries=*/3);  // stopping early closes it too
  EXPECT_EQ(count_open_fds(), before);
}

TEST(ListDir, StopsAtMaxEntries) {
  Dir d;
  for (int i = 0; i < 10; i++) spit(d.at("f" + std::to_string(i)), "");
  EXPECT_EQ(list_dir(d.fd, true, 4).entries.size(), 4u);
  EXPECT_EQ(list_dir(d.fd, true, 0).entries.size(), 0u);
}

TEST(ListDir, ReportsWhyItCannotList) {
  Dir d;
  spit(d.at("file"), "x");
  int f = open(d.at("file").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(f, 0);
  const DirListing l = list_dir(f, false);
  EXPECT_EQ(l.error, ENOTDIR);
  EXPECT_TRUE(l.entries.empty());
  close(f);
}

// ---------------------------------------------------------------------------------------------
// write_file_atomically

TEST(WriteFileAtomically, ReplacesTheContentAndLeavesNoTemporary) {
  for (bool durable : {true, false}) {
    Dir d;
    ASSERT_EQ(write_file_atomically(d.fd, "state", "first\n", durable), 0);
    EXPECT_EQ(slurp(d.at("state")), "first\n");
    ASSERT_EQ(write_file_atomically(d.fd, "state", "second, longer\n", durable), 0);
    EXPECT_EQ(slurp(d.at("state")), "second, longer\n");
    ASSERT_EQ(write_file_atomically(d.fd, "state", "", durable), 0);
    EXPECT_EQ(slurp(d.at("state")), "");
    EXPECT_FALSE(fs::exists(d.at("state.tmp")));
    struct stat st;
    ASSERT_EQ(stat(d.at("state").c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0600u);
  }
}

TEST(WriteFileAtomically, WritesPiecesInOrder) {
  Dir d;
  const std::string big(100000, 'b');
  const std::string_view pieces[] = {"head|", big, "", "|tail"};
  ASSERT_EQ(write_file_atomically(d.fd, "pieces", pieces, true), 0);
  EXPECT_EQ(slurp(d.at("pieces")), "head|" + big + "|tail");
}

TEST(WriteFileAtomically, AFailedWriteLeavesTheOldFileAndNoTemporary) {
  Dir d;
  ASSERT_EQ(write_file_atomically(d.fd, "state", "old\n", true), 0);
  // Files may not grow past 4 bytes for a moment: the write of the new content fails (EFBIG).
  rlimit saved;
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto old_handler = signal(SIGXFSZ, SIG_IGN);
  rlimit small = saved;
  small.rlim_cur = 4;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  const int err = write_file_atomically(d.fd, "state", "new and longer\n", true);
  setrlimit(RLIMIT_FSIZE, &saved);
  signal(SIGXFSZ, old_handler);
  EXPECT_EQ(err, EFBIG);
  EXPECT_EQ(slurp(d.at("state")), "old\n");
  EXPECT_FALSE(fs::exists(d.at("state.tmp")));
}

TEST(WriteFileAtomically, AFailedRenameRemovesTheTemporary) {
  Dir d;
  ASSERT_EQ(mkdir(d.at("state").c_str(), 0700), 0);  // a file cannot replace a directory
  spit(d.at("state/keep"), "x");
  EXPECT_NE(write_file_atomically(d.fd, "state", "new\n", false), 0);
  EXPECT_FALSE(fs::exists(d.at("state.tmp")));
  EXPECT_EQ(slurp(d.at("state/keep")), "x");
}

// ---------------------------------------------------------------------------------------------
// open_beneath, its fallback, and open_dir_path built on it

using OpenFn = std::function<int(int, const char*, int)>;

struct Beneath : Dir {
  TempDir outside;
  Beneath() {
    fs::create_directories(at("a/b"));
    spit(outside.path + "/secret", "outside");
    fs::create_directory_symlink(outside.path, at("a/out"));   // absolute, leads out
    fs::create_directory_symlink("..", at("a/up"));             // relative, stays inside
    fs::create_directory_symlink("../..", at("a/b/escape"));    // relative, leads out
    fs::create_directory_symlink("b", at("a/sideways"));        // relative, stays inside
  }
};

void expect_opens_beneath(const OpenFn& open_fn, const char* label) {
  SCOPED_TRACE(label);
  Beneath t;
  const int dir_flags = O_PATH | O_DIRECTORY | O_CLOEXEC;
  int fd = open_fn(t.fd, "a/b", dir_flags);
  ASSERT_GE(fd, 0) << strerror(errno);
  EXPECT_TRUE(same_file(fd, t.at("a/b")));
  close(fd);
  fd = open_fn(t.fd, ".", dir_flags);
  ASSERT_GE(fd, 0) << strerror(errno);
  EXPECT_TRUE(same_file(fd, t.tmp.path));
  close(fd);

  // Any symlink component fails, wherever it leads: none may lead a peer out.
  for (const char* p : {"a/out", "a/out/secret", "a/up", "a/up/a", "a/b/escape", "a/sideways", "a/sideways/."}) {
    errno = 0;
    fd = open_fn(t.fd, p, dir_flags);
    EXPECT_LT(fd, 0) << p << " opened";
    if (fd >= 0) {
      EXPECT_FALSE(same_file(fd, t.outside.path)) << p << " escaped";
      close(fd);
    }
    EXPECT_TRUE(errno == ELOOP || errno == ENOTDIR || errno == EXDEV) << p << ": " << strerror(errno);
  }
  fd = open_fn(t.fd, "a/out/secret", O_RDONLY | O_CLOEXEC);
  EXPECT_LT(fd, 0) << "a file behind a symlink opened";
  if (fd >= 0) close(fd);

  // Leaving the directory by "..", or by an absolute path, fails.
  for (const char* p : {"..", "../x", "a/../..", "/", "/etc"}) {
    errno = 0;
    fd = open_fn(t.fd, p, dir_flags);
    EXPECT_LT(fd, 0) << p << " opened";
    if (fd >= 0) close(fd);
    EXPECT_EQ(errno, EXDEV) << p << ": " << strerror(errno);
  }
  errno = 0;
  EXPECT_LT(open_fn(t.fd, "a/missing", dir_flags), 0);
  EXPECT_EQ(errno, ENOENT);
}

TEST(OpenBeneath, OpensBeneathAndRefusesSymlinksAndEscapes) {
  expect_opens_beneath([](int d, const char* p, int f) { return open_beneath(d, p, f); }, "openat2");
}

TEST(OpenBeneath, TheFallbackWithoutOpenat2RefusesTheSame) {
  expect_opens_beneath([](int d, const char* p, int f) { return open_beneath_by_components(d, p, f); }, "by components");
}

TEST(OpenBeneath, CreatesAFileWithTheModeGiven) {
  Dir d;
  int fd = open_beneath(d.fd, "new", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
  ASSERT_GE(fd, 0) << strerror(errno);
  close(fd);
  struct stat st;
  ASSERT_EQ(stat(d.at("new").c_str(), &st), 0);
  const mode_t mask = umask(0);
  umask(mask);
  EXPECT_EQ(st.st_mode & 0777, 0640u & ~mask);  // the umask applies, as for openat
}

TEST(OpenDirPath, RefusesWhatAPeerMayNotName) {
  Beneath t;
  ASSERT_EQ(mkdir(t.at(kMetadataDirName).c_str(), 0700), 0);
  for (const char* p : {"..", "a/..", "/a", "a//b", "a/", ".blockrepl", ".blockrepl/x", "./a"}) {
    errno = 0;
    EXPECT_EQ(open_dir_path(t.fd, p), -1) << p;
    EXPECT_EQ(errno, EINVAL) << p;
  }
  errno = 0;
  EXPECT_EQ(open_dir_path(t.fd, "a/out"), -1);  // a symlink: refused, whatever the kernel's errno
  EXPECT_NE(errno, 0);
  errno = 0;
  EXPECT_EQ(open_dir_path(t.fd, "a/b/escape"), -1);
  EXPECT_NE(errno, 0);

  int fd = open_dir_path(t.fd, "a/b");
  ASSERT_GE(fd, 0) << strerror(errno);
  EXPECT_TRUE(same_file(fd, t.at("a/b")));
  close(fd);
  fd = open_dir_path(t.fd, "");
  ASSERT_GE(fd, 0) << strerror(errno);
  EXPECT_TRUE(same_file(fd, t.tmp.path));
  close(fd);
  // A nested folder of that name is the volume's own.
  fs::create_directories(t.at("a/.blockrepl"));
  fd = open_dir_path(t.fd, "a/.blockrepl");
  EXPECT_GE(fd, 0) << strerror(errno);
  if (fd >= 0) close(fd);
}

}  // namespace
}  // namespace blockrepl
