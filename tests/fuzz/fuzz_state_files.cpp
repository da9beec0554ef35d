// fuzz_state_files: the small text files of the metadata folder: the node's identity
// (<meta>/identity, metadata.cpp) and a slave's replica state (<meta>/replica, replica_state.cpp).
//
// Input: byte 0 even: the rest is the identity file, read by load_or_create_identity and
// read_identity (the same parser). An identity that loads is written again (store_identity) and
// loads as the same identity.
// Byte 0 odd: the rest is the replica state file, read by ReplicaState's constructor. Whatever
// it holds, applied is never below durable; the values set afterwards read back the same.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "blockrepl/error.h"
#include "blockrepl/metadata.h"
#include "blockrepl/replica_state.h"
#include "fuzz_util.h"

using namespace blockrepl;
using namespace blockrepl::fuzz;

namespace {

bool same(const Identity& a, const Identity& b) {
  return a.node_id == b.node_id && a.cluster_id == b.cluster_id && a.block_size == b.block_size &&
         a.lsn_reserved == b.lsn_reserved && a.lineage == b.lineage && a.role == b.role;
}

void identity(const std::string& text) {
  ScratchDir data("id");
  const int dfd = open(data.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const int meta = open_metadata_dir(dfd, data.path);
  write_file(meta, "identity", text);
  try {
    const Identity id = load_or_create_identity(meta, data.path);
    const auto again = read_identity(data.path);
    FUZZ_CHECK(again && same(*again, id));
    FUZZ_CHECK(!id.node_id.empty());
    store_identity(meta, id, data.path);
    const Identity reread = load_or_create_identity(meta, data.path);
    if (!same(reread, id)) fail("an identity written by store_identity reads back differently:\n" + read_file(meta, "identity"));
  } catch (const Error&) {
    // Damaged: refused with a message naming the file. read_identity agrees.
    bool refused = false;
    try {
      read_identity(data.path);
    } catch (const Error&) {
      refused = true;
    }
    FUZZ_CHECK(refused);
  }
  close(meta);
  close(dfd);
}

void replica(const std::string& text) {
  ScratchDir meta("rs");
  const int mfd = open(meta.path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  write_file(mfd, "replica", text);
  {
    ReplicaState st(mfd, meta.path);
    FUZZ_CHECK(st.applied() >= st.durable());
    const Lsn d = st.durable(), a = st.applied();
    const bool c = st.attach_complete();
    const Lsn next = a == UINT64_MAX ? a : a + 1;
    st.set_applied(next);
    st.set_durable(d, false);
    ReplicaState back(mfd, meta.path);
    FUZZ_CHECK(back.exists() && back.durable() == d && back.applied() == next && back.attach_complete() == c);
  }
  close(mfd);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  quiet_logs();
  if (size < 1) return 0;
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] % 2 == 0) identity(text);
  else replica(text);
  return 0;
}
