// Records that own their payload (Record::own_data) must keep owning it when copied or moved,
// e.g. into a sink's queue: the copy's data view must not point into the source record.
// (Checked without touching freed memory: the source stays alive and its bytes are overwritten.)
#include <gtest/gtest.h>

#include <string>
#include <utility>

#include "blockrepl/record.h"

namespace blockrepl {
namespace {

TEST(RecordOwnership, CopyOfOwningRecordOwnsItsBytes) {
  Record a;
  std::string src = "payload";  // short: lives inside the std::string object (SSO)
  a.data = src;
  a.own_data();
  Record b = a;
  a.owned.assign("XXXXXXX");  // same length, same buffer: overwrite the source's bytes
  EXPECT_EQ(b.data, "payload") << "the copy still points into the source record";
}

TEST(RecordOwnership, MovedOwningRecordOwnsItsBytes) {
  Record a;
  std::string src = "payload";
  a.data = src;
  a.own_data();
  Record b = std::move(a);
  a.owned.assign("zzzzzzz");  // reuse of the moved-from record
  EXPECT_EQ(b.data, "payload") << "the moved record still points into the moved-from record";
}

}  // namespace
}  // namespace blockrepl
