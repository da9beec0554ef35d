// Every error a user can make on the command line ends quickly in exactly one clear line on
// stderr and a non-zero exit, and writes nothing: no metadata in the data directory, no mount,
// and a mount that is already running is not disturbed.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

#include "harness.h"

namespace blockrepl::test {
namespace {

namespace fs = std::filesystem;

constexpr int kTimeoutSec = 20;

std::string show(const std::vector<std::string>& args) {
  std::string s = "blockrepl";
  for (auto& a : args) s += " " + a;
  return s;
}

// Runs blockrepl with args and checks the error contract: no hang, non-zero exit, nothing on
// stdout, exactly one non-empty line on stderr that contains every string of `mentions`.
CommandResult expect_error(const std::vector<std::string>& args, const std::vector<std::string>& mentions) {
  auto t0 = std::chrono::steady_clock::now();
  CommandResult r = run_blockrepl(args, kTimeoutSec);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string cmd = show(args);
  EXPECT_NE(r.exit_code, -1) << cmd << ": hung, killed after " << kTimeoutSec << " s; stderr so far: " << r.err;
  EXPECT_NE(r.exit_code, 0) << cmd << ": succeeded but should have failed; stderr: " << r.err;
  EXPECT_EQ(r.out, "") << cmd << ": printed on stdout";
  std::string line = r.err;
  if (!line.empty() && line.back() == '\n') line.pop_back();
  EXPECT_FALSE(line.empty()) << cmd << ": no error message on stderr";
  EXPECT_EQ(line.find('\n'), std::string::npos) << cmd << ": error message spans several lines:\n" << r.err;
  for (const auto& m : mentions)
    EXPECT_NE(r.err.find(m), std::string::npos) << cmd << ": error message does not mention '" << m << "': " << r.err;
  EXPECT_LT(secs, kTimeoutSec) << cmd;
  return r;
}

// A listing of everything under dir (path, type, size, mode, mtime) to compare before/after.
std::vector<std::string> snapshot(const std::string& dir) {
  std::vector<std::string> out;
  std::error_code ec;
  struct stat st;
  if (lstat(dir.c_str(), &st) != 0) return {"<missing>"};
  auto entry = [&](const std::string& p, const std::string& rel) {
    struct stat s;
    if (lstat(p.c_str(), &s) != 0) return;
    out.push_back(rel + " mode=" + std::to_string(s.st_mode) + " size=" + std::to_string(S_ISREG(s.st_mode) ? s.st_size : 0) +
                  " mtime=" + std::to_string(s.st_mtim.tv_sec) + "." + std::to_string(s.st_mtim.tv_nsec));
  };
  entry(dir, ".");
  if (S_ISDIR(st.st_mode))
    for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::recursive_directory_iterator(); it.increment(ec))
      entry(it->path().string(), it->path().string().substr(dir.size()));
  std::sort(out.begin(), out.end());
  return out;
}

void expect_untouched_data(const std::string& data, const std::vector<std::string>& before) {
  EXPECT_FALSE(fs::exists(data + "/.blockrepl")) << "a failed mount created " << data << "/.blockrepl";
  EXPECT_EQ(snapshot(data), before) << "a failed mount changed " << data;
}

void expect_not_mounted(const std::string& mnt) {
  EXPECT_FALSE(is_mounted(mnt)) << mnt << " is mounted after a failed mount";
}

}  // namespace

TEST(CliErrors, MissingDataDirectory) {
  TempDir tmp("cli");
  std::string mnt = tmp.sub("mnt"), data = tmp.path() + "/no-such-data";
  expect_error({"mount", "--data", data, mnt}, {data});
  EXPECT_FALSE(fs::exists(data)) << "the missing data directory was created";
  expect_not_mounted(mnt);
}

TEST(CliErrors, DataPathIsAFile) {
  TempDir tmp("cli");
  std::string mnt = tmp.sub("mnt"), data = tmp.path() + "/data-file";
  write_file(data, "not a directory");
  auto before = snapshot(tmp.path());
  expect_error({"mount", "--data", data, mnt}, {data});
  EXPECT_EQ(read_file(data), "not a directory");
  EXPECT_EQ(snapshot(tmp.path()), before);
  expect_not_mounted(mnt);
}

TEST(CliErrors, MissingMountPoint) {
  TempDir tmp("cli");
  std::string data = tmp.sub("data"), mnt = tmp.path() + "/no-such-mnt";
  write_file(data + "/keep", "keep");
  auto before = snapshot(data);
  expect_error({"mount", "--data", data, mnt}, {mnt});
  expect_untouched_data(data, before);
  EXPECT_FALSE(fs::exists(mnt)) << "the missing mount point was created";
}

TEST(CliErrors, MountPointIsAFile) {
  TempDir tmp("cli");
  std::string data = tmp.sub("data"), mnt = tmp.path() + "/mnt-file";
  write_file(mnt, "a file");
  auto before = snapshot(data);
  expect_error({"mount", "--data", data, mnt}, {mnt});
  expect_untouched_data(data, before);
  EXPECT_EQ(read_file(mnt), "a file");
  expect_not_mounted(mnt);
}

TEST(CliErrors, BusyMountPoint) {
  TempDir tmp("cli");
  std::string data1 = tmp.sub("data1"), data2 = tmp.sub("data2"), mnt = tmp.sub("mnt");
  Mount m(data1, mnt);
  ASSERT_TRUE(m.ok()) << m.error();
  write_file(m.file("first"), "first mount");
  auto before = snapshot(data2);
  expect_error({"mount", "--data", data2, mnt}, {mnt, "busy"});
  expect_untouched_data(data2, before);
  // The first mount is still the one there, and works.
  EXPECT_TRUE(is_mounted(mnt));
  EXPECT_EQ(read_file(m.file("first")), "first mount");
  write_file(m.file("second"), "still writable");
  EXPECT_EQ(read_file(m.file("second")), "still writable");
  EXPECT_FALSE(fs::exists(data2 + "/second"));
}

TEST(CliErrors, DataDirectoryAlreadyInUse) {
  TempDir tmp("cli");
  std::string data = tmp.sub("data"), mnt1 = tmp.sub("mnt1"), mnt2 = tmp.sub("mnt2");
  Mount m(data, mnt1);
  ASSERT_TRUE(m.ok()) << m.error();
  write_file(m.file("file"), "written before");
  expect_error({"mount", "--data", data, mnt2}, {data, "already in use"});
  expect_not_mounted(mnt2);
  EXPECT_TRUE(fs::is_empty(mnt2));
  EXPECT_TRUE(is_mounted(mnt1));
  EXPECT_EQ(read_file(m.file("file")), "written before");
  write_file(m.file("after"), "written after");
  m.unmount();
  EXPECT_EQ(read_file(data + "/file"), "written before");
  EXPECT_EQ(read_file(data + "/after"), "written after");
}

TEST(CliErrors, DataDirectoryInsideMountPoint) {
  TempDir tmp("cli");
  std::string mnt = tmp.sub("mnt"), data = tmp.sub("mnt/data");
  auto before = snapshot(mnt);
  expect_error({"mount", "--data", data, mnt}, {data});
  EXPECT_EQ(snapshot(mnt), before);
  EXPECT_FALSE(fs::exists(data + "/.blockrepl"));
  expect_not_mounted(mnt);
}

TEST(CliErrors, MountPointInsideDataDirectory) {
  TempDir tmp("cli");
  std::string data = tmp.sub("data"), mnt = tmp.sub("data/mnt");
  auto before = snapshot(data);
  expect_error({"mount", "--data", data, mnt}, {mnt});
  expect_untouched_data(data, before);
  expect_not_mounted(mnt);
}

TEST(CliErrors, SameDirectoryForDataAndMountPoint) {
  TempDir tmp("cli");
  std::string dir = tmp.sub("dir");
  auto before = snapshot(dir);
  expect_error({"mount", "--data", dir, dir}, {dir});
  expect_untouched_data(dir, before);
  expect_not_mounted(dir);
  // The same directory spelled differently (a symlink) is the same directory.
  std::string link = tmp.path() + "/link";
  fs::create_directory_symlink(dir, link);
  expect_error({"mount", "--data", dir, link}, {dir});
  expect_untouched_data(dir, before);
  expect_not_mounted(dir);
}

TEST(CliErrors, UnknownFlag) {
  TempDir tmp("cli");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  auto before = snapshot(data);
  expect_error({"mount", "--bogus", "--data", data, mnt}, {"--bogus"});
  expect_untouched_data(data, before);
  expect_not_mounted(mnt);
}

// 0 is no block size: refused like any other bad size, not taken for "not given".
TEST(CliErrors, BlockSizeZero) {
  TempDir tmp("cli");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  auto before = snapshot(data);
  for (const char* bad : {"0", "1000", "512k"}) {
    expect_error({"mount", "--block-size", bad, "--data", data, mnt}, {"--block-size"});
    expect_untouched_data(data, before);
    expect_not_mounted(mnt);
  }
}

TEST(CliErrors, MissingDataFlag) {
  TempDir tmp("cli");
  std::string mnt = tmp.sub("mnt");
  expect_error({"mount", mnt}, {"--data"});
  expect_not_mounted(mnt);
}

TEST(CliErrors, NoSubcommand) { expect_error({}, {"subcommand"}); }

TEST(CliErrors, UnknownSubcommand) { expect_error({"frobnicate", "/tmp"}, {"frobnicate"}); }

TEST(CliErrors, UmountOfDirectoryThatIsNotMounted) {
  TempDir tmp("cli");
  std::string dir = tmp.sub("plain");
  write_file(dir + "/f", "x");
  auto before = snapshot(dir);
  expect_error({"umount", dir}, {dir});
  EXPECT_EQ(snapshot(dir), before);
  std::string missing = tmp.path() + "/missing";
  expect_error({"umount", missing}, {missing});
}

// All the failed attempts above, made around one live mount: it keeps working, and the data
// written before them is intact, on the mount and in the backing directory.
TEST(CliErrors, FirstMountIntactAfterFailedAttempts) {
  TempDir tmp("cli");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  std::string other_data = tmp.sub("other-data"), other_mnt = tmp.sub("other-mnt");
  Mount m(data, mnt);
  ASSERT_TRUE(m.ok()) << m.error();
  std::string payload(1 << 20, '\0');
  for (size_t i = 0; i < payload.size(); i++) payload[i] = static_cast<char>((i * 131 + 7) % 251);
  write_file(m.file("before.bin"), payload);
  fs::create_directories(m.file("dir/sub"));
  write_file(m.file("dir/sub/small"), "small");

  expect_error({"mount", "--data", other_data, mnt}, {mnt});                  // busy mount point
  expect_error({"mount", "--data", data, other_mnt}, {data, "already in use"});  // data dir in use
  expect_error({"mount", "--data", m.file("dir"), mnt}, {mnt});               // data inside the mount point
  expect_error({"mount", "--data", data, data + "/dir"}, {});                 // mount point inside the data dir
  expect_error({"mount", "--data", data, data}, {});                          // same directory
  expect_error({"mount", "--data", mnt, mnt}, {});                            // same, and a live mount
  expect_error({"mount", "--data", tmp.path() + "/none", other_mnt}, {tmp.path() + "/none"});
  expect_error({"mount", "--bogus", "--data", data, other_mnt}, {"--bogus"});
  expect_error({"umount", other_mnt}, {other_mnt});
  expect_error({"mount", other_mnt}, {"--data"});
  expect_error({}, {});
  EXPECT_FALSE(is_mounted(other_mnt));
  EXPECT_TRUE(fs::is_empty(other_mnt));
  EXPECT_FALSE(fs::exists(other_data + "/.blockrepl"));

  ASSERT_TRUE(is_mounted(mnt));
  EXPECT_EQ(read_file(m.file("before.bin")), payload);
  EXPECT_EQ(read_file(m.file("dir/sub/small")), "small");
  write_file(m.file("after"), "after the failed attempts");
  EXPECT_EQ(read_file(m.file("after")), "after the failed attempts");
  m.unmount();
  ASSERT_FALSE(is_mounted(mnt));
  EXPECT_EQ(read_file(data + "/before.bin"), payload);
  EXPECT_EQ(read_file(data + "/dir/sub/small"), "small");
  EXPECT_EQ(read_file(data + "/after"), "after the failed attempts");
  // And it mounts again cleanly.
  Mount again(data, mnt);
  ASSERT_TRUE(again.ok()) << again.error();
  EXPECT_EQ(read_file(again.file("before.bin")), payload);
}

}  // namespace blockrepl::test
