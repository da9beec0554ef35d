#include <gtest/gtest.h>

#include "blockrepl/record.h"

namespace blockrepl {

TEST(Record, OwnDataKeepsBytesAfterSourceIsGone) {
  Record r;
  {
    std::string src = "payload";
    r.data = src;
    r.own_data();
  }
  EXPECT_EQ(r.data, "payload");
}

TEST(Record, DescribeNamesOpAndLsn) {
  Record r;
  r.lsn = 42;
  r.op = Op::write;
  r.offset = 4096;
  r.data = "abcd";
  EXPECT_NE(r.describe().find("lsn 42 write"), std::string::npos);
  EXPECT_NE(r.describe().find("offset 4096 length 4"), std::string::npos);
}

}  // namespace blockrepl
