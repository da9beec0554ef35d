// The metadata folder <data>/.blockrepl and the node identity file in it.
#include <gtest/gtest.h>

#include <fstream>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>

#include "blockrepl/error.h"
#include "blockrepl/metadata.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

void spit(const std::string& path, const std::string& content) {
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0) << path;
  ASSERT_EQ(write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
  close(fd);
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::set<std::string> list_dir(const std::string& path) {
  std::set<std::string> out;
  DIR* d = opendir(path.c_str());
  if (!d) return out;
  while (dirent* de = readdir(d))
    if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) out.insert(de->d_name);
  closedir(d);
  return out;
}

int count_fds() {
  int n = 0;
  for (auto& e : std::filesystem::directory_iterator("/proc/self/fd")) (void)e, n++;
  return n;
}

class MetadataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    data_ = tmp_.path + "/data";
    ASSERT_EQ(mkdir(data_.c_str(), 0755), 0);
    data_fd_ = open(data_.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    ASSERT_GE(data_fd_, 0);
  }
  void TearDown() override {
    if (meta_fd_ >= 0) close(meta_fd_);
    if (data_fd_ >= 0) close(data_fd_);
  }
  std::string meta() const { return data_ + "/" + kMetadataDirName; }
  std::string identity_path() const { return meta() + "/identity"; }
  void open_meta() {
    meta_fd_ = open_metadata_dir(data_fd_, data_);
    ASSERT_GE(meta_fd_, 0);
  }
  // Writes `content` as the identity file and expects loading it to throw an Error that names
  // the identity file's full path.
  void expect_damaged(const std::string& content, const char* why) {
    SCOPED_TRACE(why);
    spit(identity_path(), content);
    try {
      Identity id = load_or_create_identity(meta_fd_, data_);
      ADD_FAILURE() << "accepted a damaged identity file (" << why << "): node_id=" << id.node_id
                    << " block_size=" << id.block_size << " lsn_reserved=" << id.lsn_reserved;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(identity_path()), std::string::npos)
          << "message does not name " << identity_path() << ": " << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "threw a non-blockrepl exception: " << e.what();
    }
  }

  TempDir tmp_;
  std::string data_;
  int data_fd_ = -1;
  int meta_fd_ = -1;
};

TEST_F(MetadataTest, OpenMetadataDirCreatesPrivateFolder) {
  ASSERT_FALSE(std::filesystem::exists(meta()));
  open_meta();
  struct stat st;
  ASSERT_EQ(lstat(meta().c_str(), &st), 0);
  EXPECT_TRUE(S_ISDIR(st.st_mode));
  EXPECT_EQ(st.st_mode & 0077, 0u) << "metadata folder is readable by others";
  // The fd names that folder.
  struct stat fst;
  ASSERT_EQ(fstat(meta_fd_, &fst), 0);
  EXPECT_EQ(fst.st_ino, st.st_ino);
  EXPECT_EQ(fst.st_dev, st.st_dev);
}

TEST_F(MetadataTest, OpenMetadataDirReopensExistingFolderAndKeepsContent) {
  open_meta();
  spit(meta() + "/keep", "x");
  close(meta_fd_);
  meta_fd_ = -1;
  open_meta();
  EXPECT_TRUE(list_dir(meta()).count("keep"));
}

TEST_F(MetadataTest, OpenMetadataDirThrowsNamingPathWhenItIsAFile) {
  spit(meta(), "not a dir");
  try {
    int fd = open_metadata_dir(data_fd_, data_);
    close(fd);
    FAIL() << "accepted a regular file as metadata folder";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(meta()), std::string::npos) << e.what();
    EXPECT_EQ(e.errno_value(), ENOTDIR);
  }
}

TEST_F(MetadataTest, OpenMetadataDirRefusesSymlinkOutOfDataDir) {
  TempDir elsewhere;
  ASSERT_EQ(symlink(elsewhere.path.c_str(), meta().c_str()), 0);
  EXPECT_THROW(
      {
        int fd = open_metadata_dir(data_fd_, data_);
        close(fd);
      },
      Error);
  EXPECT_TRUE(list_dir(elsewhere.path).empty());
}

TEST_F(MetadataTest, OpenMetadataDirThrowsNamingPathWhenDataDirIsGone) {
  int gone = data_fd_;
  data_fd_ = -1;
  ASSERT_EQ(rmdir(data_.c_str()), 0);
  try {
    int fd = open_metadata_dir(gone, data_);
    close(fd);
    ADD_FAILURE() << "created a metadata folder in a removed directory";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(data_), std::string::npos) << e.what();
  }
  close(gone);
}

TEST_F(MetadataTest, LoadOrCreateIdentityCreatesThenReadsTheSameBack) {
  open_meta();
  Identity a = load_or_create_identity(meta_fd_, data_);
  EXPECT_FALSE(a.node_id.empty());
  for (char c : a.node_id) EXPECT_TRUE(isxdigit(static_cast<unsigned char>(c))) << a.node_id;
  EXPECT_EQ(a.block_size, 4096u);
  EXPECT_EQ(a.lsn_reserved, 0u);
  EXPECT_TRUE(std::filesystem::is_regular_file(identity_path()));
  struct stat st;
  ASSERT_EQ(stat(identity_path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0077, 0u);

  Identity b = load_or_create_identity(meta_fd_, data_);
  EXPECT_EQ(b.node_id, a.node_id);
  EXPECT_EQ(b.cluster_id, a.cluster_id);
  EXPECT_EQ(b.block_size, a.block_size);
  EXPECT_EQ(b.lsn_reserved, a.lsn_reserved);

  // Another data directory gets another node id.
  std::string other = tmp_.path + "/other";
  ASSERT_EQ(mkdir(other.c_str(), 0755), 0);
  int ofd = open(other.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  int omfd = open_metadata_dir(ofd, other);
  Identity c = load_or_create_identity(omfd, other);
  EXPECT_NE(c.node_id, a.node_id);
  close(omfd);
  close(ofd);
}

TEST_F(MetadataTest, StoreIdentityRoundTripsEveryField) {
  open_meta();
  Identity id;
  id.node_id = "0011223344556677";
  id.cluster_id = "cluster-abc";
  id.block_size = 65536;
  id.lsn_reserved = 18446744073709551000ull;
  store_identity(meta_fd_, id, data_);
  Identity back = load_or_create_identity(meta_fd_, data_);
  EXPECT_EQ(back.node_id, id.node_id);
  EXPECT_EQ(back.cluster_id, id.cluster_id);
  EXPECT_EQ(back.block_size, id.block_size);
  EXPECT_EQ(back.lsn_reserved, id.lsn_reserved);
}

TEST_F(MetadataTest, StoreIdentityReplacesAtomicallyAndLeavesNoTempFile) {
  open_meta();
  Identity id = load_or_create_identity(meta_fd_, data_);
  struct stat before;
  ASSERT_EQ(stat(identity_path().c_str(), &before), 0);
  // A reader holding the old file keeps seeing a complete old version.
  int old_fd = open(identity_path().c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(old_fd, 0);

  id.lsn_reserved = 12345;
  store_identity(meta_fd_, id, data_);
  EXPECT_EQ(list_dir(meta()), std::set<std::string>{"identity"});
  struct stat after;
  ASSERT_EQ(stat(identity_path().c_str(), &after), 0);
  EXPECT_NE(after.st_ino, before.st_ino) << "identity was rewritten in place, not replaced by rename";
  char buf[512];
  ssize_t n = pread(old_fd, buf, sizeof buf, 0);
  ASSERT_GT(n, 0);
  EXPECT_NE(std::string(buf, n).find("lsn_reserved=0\n"), std::string::npos);
  close(old_fd);

  // A stale temp file from a crash mid-write is harmless and gets replaced.
  spit(meta() + "/identity.tmp", "node_id=garbage-from-crash\n");
  id.lsn_reserved = 777;
  store_identity(meta_fd_, id, data_);
  EXPECT_EQ(list_dir(meta()), std::set<std::string>{"identity"});
  EXPECT_EQ(load_or_create_identity(meta_fd_, data_).lsn_reserved, 777u);
  EXPECT_EQ(load_or_create_identity(meta_fd_, data_).node_id, id.node_id);
}

TEST_F(MetadataTest, StoreIdentityRoundTripsRoleAndLineage) {
  open_meta();
  Identity id = load_or_create_identity(meta_fd_, data_);
  EXPECT_TRUE(id.lineage.empty());
  EXPECT_EQ(id.role, "");
  id.role = "master";
  id.lineage = {{"aaaa", 1}, {"bbbb", 5000}, {"cccc", 18446744073709551615ull}};
  store_identity(meta_fd_, id, data_);
  Identity back = load_or_create_identity(meta_fd_, data_);
  EXPECT_EQ(back.role, "master");
  EXPECT_EQ(back.lineage, id.lineage);
  EXPECT_EQ(back.node_id, id.node_id);
  id.lineage.clear();
  id.role = "slave";
  store_identity(meta_fd_, id, data_);
  back = load_or_create_identity(meta_fd_, data_);
  EXPECT_TRUE(back.lineage.empty());
  EXPECT_EQ(back.role, "slave");
}

TEST_F(MetadataTest, IdentityWithMalformedLineageThrowsErrorNamingPath) {
  open_meta();
  expect_damaged("node_id=abcd\nlineage=no-at-sign\n", "lineage entry without @");
  expect_damaged("node_id=abcd\nlineage=aaaa@\n", "lineage entry without LSN");
  expect_damaged("node_id=abcd\nlineage=aaaa@1,bbbb\n", "second lineage entry without @");
}

TEST_F(MetadataTest, IdentityRefusesUnknownKeysAndToleratesMissingOptionalFields) {
  open_meta();
  // A key of a newer version: refused (rewriting the file without it would lose it), and the
  // message says which key.
  spit(identity_path(), "node_id=abcd\nfuture_key=1\n");
  try {
    load_or_create_identity(meta_fd_, data_);
    ADD_FAILURE() << "accepted an identity file with an unknown key";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(identity_path()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("future_key"), std::string::npos) << e.what();
  }
  EXPECT_EQ(slurp(identity_path()), "node_id=abcd\nfuture_key=1\n") << "the refused file was changed";
  spit(identity_path(), "# comment\nnode_id=abcd\n");
  Identity id = load_or_create_identity(meta_fd_, data_);
  EXPECT_EQ(id.node_id, "abcd");
  EXPECT_EQ(id.cluster_id, "");
  EXPECT_EQ(id.block_size, 4096u);
  EXPECT_EQ(id.lsn_reserved, 0u);
}

TEST_F(MetadataTest, GarbageIdentityThrowsErrorNamingPath) {
  open_meta();
  expect_damaged("\x7f\x45\x4c\x46 this is not an identity file \x01\x02\n", "binary garbage");
}

TEST_F(MetadataTest, EmptyIdentityThrowsErrorNamingPath) {
  open_meta();
  expect_damaged("", "empty file");
}

TEST_F(MetadataTest, IdentityWithoutNodeIdThrowsErrorNamingPath) {
  open_meta();
  expect_damaged("cluster_id=abc\nblock_size=4096\nlsn_reserved=5\n", "no node_id");
  expect_damaged("node_id=\ncluster_id=abc\n", "empty node_id");
}

TEST_F(MetadataTest, IdentityWithNonNumericNumbersThrowsErrorNamingPath) {
  open_meta();
  expect_damaged("node_id=abcd\nlsn_reserved=lots\n", "lsn_reserved not a number");
  expect_damaged("node_id=abcd\nblock_size=big\n", "block_size not a number");
  expect_damaged("node_id=abcd\nlsn_reserved=99999999999999999999999999\n", "lsn_reserved out of range");
}

// std::stoull accepts "-1" (wrapping to 2^64-1) and stops at the first non-digit: a damaged
// lsn_reserved must not be taken as a huge or truncated number (a Node adds to it and wraps).
TEST_F(MetadataTest, IdentityWithNegativeLsnReservedIsDamaged) {
  open_meta();
  expect_damaged("node_id=abcd\nlsn_reserved=-1\n", "negative lsn_reserved");
}

TEST_F(MetadataTest, IdentityWithTrailingGarbageInNumberIsDamaged) {
  open_meta();
  expect_damaged("node_id=abcd\nlsn_reserved=12abc\n", "lsn_reserved with trailing garbage");
  expect_damaged("node_id=abcd\nlineage=aaaa@12abc\n", "lineage LSN with trailing garbage");
}

TEST_F(MetadataTest, IdentityWithOutOfRangeBlockSizeIsDamaged) {
  open_meta();
  expect_damaged("node_id=abcd\nblock_size=8589934592\n", "block_size beyond 32 bits (would be truncated to 0)");
}

TEST_F(MetadataTest, UnreadableIdentityThrowsErrorNamingPath) {
  open_meta();
  // An identity that is a directory: open works, read fails with EISDIR.
  ASSERT_EQ(mkdir(identity_path().c_str(), 0700), 0);
  try {
    load_or_create_identity(meta_fd_, data_);
    ADD_FAILURE() << "accepted a directory as identity file";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(identity_path()), std::string::npos)
        << "message does not name " << identity_path() << ": " << e.what();
  }
}

TEST_F(MetadataTest, FailedLoadLeaksNoDescriptor) {
  open_meta();
  ASSERT_EQ(mkdir(identity_path().c_str(), 0700), 0);
  int before = count_fds();
  EXPECT_THROW(load_or_create_identity(meta_fd_, data_), Error);
  EXPECT_EQ(count_fds(), before);
}

TEST(RandomHexId, HasRequestedLengthAndVaries) {
  std::string a = random_hex_id(8), b = random_hex_id(8);
  EXPECT_EQ(a.size(), 16u);
  EXPECT_EQ(random_hex_id(0), "");
  EXPECT_EQ(random_hex_id(32).size(), 64u);
  for (char c : a) EXPECT_TRUE(isdigit(static_cast<unsigned char>(c)) || (c >= 'a' && c <= 'f')) << a;
  EXPECT_NE(a, b);
}

}  // namespace
}  // namespace blockrepl
