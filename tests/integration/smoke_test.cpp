#include <gtest/gtest.h>

#include "harness.h"

namespace blockrepl::test {

TEST(Smoke, MountWriteReadUnmount) {
  TempDir tmp("smoke");
  std::string data = tmp.sub("data"), mnt = tmp.sub("mnt");
  {
    Mount m(data, mnt);
    ASSERT_TRUE(m.ok());
    write_file(m.file("hello"), "hello world");
    EXPECT_EQ(read_file(m.file("hello")), "hello world");
    m.unmount();
    EXPECT_FALSE(is_mounted(mnt));
  }
  EXPECT_EQ(read_file(data + "/hello"), "hello world");
}

}  // namespace blockrepl::test
