// decide_attach: one row per rule of DESIGN.md section 3 (stream, Merkle diff, full copy, and
// every refusal), each starting from a slave that could simply stream and changing one thing.
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "blockrepl/attach.h"
#include "blockrepl/wire.h"

namespace blockrepl {
namespace {

using Method = AttachDecision::Method;
using Start = AttachDecision::Start;

// A master on lineage A (since lsn 1) at lsn 100 with hash trees and a journal that holds the
// slave's position; its slave on the same lineage at lsn 90.
AttachServer master() {
  AttachServer s;
  s.node_id = "master-node";
  s.cluster_id = "cluster-1";
  s.block_size = 4096;
  s.lineage = {{"A", 1}};
  s.last_lsn = 100;
  s.has_hashes = true;
  s.journal_covers_their_lsn = true;
  return s;
}

AttachHello slave() {
  AttachHello h;
  h.protocol_version = kProtocolVersion;
  h.node_id = "slave-node";
  h.cluster_id = "cluster-1";
  h.hash_algorithm = kHashAlgorithm;
  h.block_size = 4096;
  h.lineage = {{"A", 1}};
  h.durable_lsn = 90;
  return h;
}

// After a failover: the master is the promoted slave, which started lineage C after lsn 100.
void promoted_at_100(AttachServer& s) {
  s.lineage = {{"A", 1}, {"C", 101}};
  s.last_lsn = 130;
}

struct Row {
  const char* name;
  std::function<void(AttachServer&, AttachHello&)> change;
  Method method;
  Start start = Start::our_lsn;
  // Words the refusal (or, for accepted rows, the notice / why_not_stream) must contain.
  std::vector<std::string> refusal = {};
  std::vector<std::string> notice = {};
  std::string why_not_stream = "";
  bool fork = false;
  Lsn fork_lsn = 0;
  bool verify_only = false;
};

const std::vector<Row>& rows() {
  static const std::vector<Row> table = {
      {"on our history and in the journal: stream from its LSN", [](AttachServer&, AttachHello&) {}, Method::stream,
       Start::their_lsn},
      {"empty slave: full copy",
       [](AttachServer&, AttachHello& h) {
         h.empty = true;
         h.cluster_id = "";
         h.lineage = {};
         h.durable_lsn = 0;
       },
       Method::full},
      {"empty slave that once belonged to another cluster: full copy (it has nothing to lose)",
       [](AttachServer&, AttachHello& h) {
         h.empty = true;
         h.cluster_id = "cluster-2";
       },
       Method::full},
      {"not in the journal any more: Merkle diff", [](AttachServer& s, AttachHello&) { s.journal_covers_their_lsn = false; },
       Method::merkle, Start::our_lsn, {}, {}, "older than the journal"},
      {"not in the journal and no hash trees: full copy",
       [](AttachServer& s, AttachHello&) {
         s.journal_covers_their_lsn = false;
         s.has_hashes = false;
       },
       Method::full, Start::our_lsn, {}, {}, "older than the journal"},
      {"no hash trees but streamable: stream", [](AttachServer& s, AttachHello&) { s.has_hashes = false; }, Method::stream,
       Start::their_lsn},
      {"resync: Merkle diff even when it could stream", [](AttachServer&, AttachHello& h) { h.resync = true; },
       Method::merkle, Start::our_lsn, {}, {}, "resync"},
      {"resync without hash trees: streaming is all there is", [](AttachServer& s, AttachHello& h) {
         h.resync = true;
         s.has_hashes = false;
       },
       Method::stream, Start::their_lsn},
      {"slave ahead of the master on the same lineage: Merkle diff, never a stream of records it lacks",
       [](AttachServer&, AttachHello& h) { h.durable_lsn = 150; }, Method::merkle, Start::our_lsn, {}, {}, "ahead of us"},
      {"lineage extended by a promotion upstream (the slave's is a prefix), slave before the fork: stream",
       [](AttachServer& s, AttachHello& h) {
         promoted_at_100(s);
         h.durable_lsn = 100;
       },
       Method::stream, Start::their_lsn},
      {"lineage extended upstream, journal moved on: Merkle diff, not a refusal",
       [](AttachServer& s, AttachHello& h) {
         promoted_at_100(s);
         h.durable_lsn = 100;
         s.journal_covers_their_lsn = false;
       },
       Method::merkle, Start::our_lsn, {}, {}, "older than the journal"},
      {"diverged (a former master that wrote after the fork) without --discard-my-data: refused",
       [](AttachServer& s, AttachHello& h) {
         promoted_at_100(s);
         h.durable_lsn = 110;
       },
       Method::refuse, Start::our_lsn, {"diverged", "lineage A", "lineage C", "after lsn 100", "--discard-my-data"}},
      {"diverged on a lineage the master never had: refused",
       [](AttachServer&, AttachHello& h) { h.lineage = {{"Z", 1}}; }, Method::refuse, Start::our_lsn,
       {"diverged", "lineage Z", "lineage A", "after lsn 0"}},
      {"diverged with --discard-my-data: rewritten by Merkle diff",
       [](AttachServer& s, AttachHello& h) {
         promoted_at_100(s);
         h.durable_lsn = 110;
         h.discard_my_data = true;
       },
       Method::merkle, Start::our_lsn, {}, {}, "not on our history", true, 100},
      {"--discard-my-data without divergence: a notice, and nothing discarded",
       [](AttachServer&, AttachHello& h) { h.discard_my_data = true; }, Method::stream, Start::their_lsn, {},
       {"--discard-my-data", "has not diverged", "nothing is discarded"}},
      {"cluster mismatch: refused", [](AttachServer&, AttachHello& h) { h.cluster_id = "cluster-2"; }, Method::refuse,
       Start::our_lsn, {"cluster id mismatch", "cluster-2", "cluster-1"}},
      {"block size mismatch: refused", [](AttachServer&, AttachHello& h) { h.block_size = 8192; }, Method::refuse,
       Start::our_lsn, {"block size mismatch", "slave uses 8192", "master uses 4096"}},
      {"protocol version mismatch: refused, before anything else is compared",
       [](AttachServer&, AttachHello& h) {
         h.protocol_version = kProtocolVersion + 1;
         h.block_size = 8192;
       },
       Method::refuse, Start::our_lsn,
       {"protocol version mismatch", "slave speaks " + std::to_string(kProtocolVersion + 1),
        "master speaks " + std::to_string(kProtocolVersion)}},
      {"hash algorithm mismatch: refused", [](AttachServer&, AttachHello& h) { h.hash_algorithm = "md5"; }, Method::refuse,
       Start::our_lsn, {"hash algorithm mismatch", "md5", kHashAlgorithm}},
      {"its own node id: refused", [](AttachServer&, AttachHello& h) { h.node_id = "master-node"; }, Method::refuse,
       Start::our_lsn, {"its own slave", "master-node"}},
      {"a master that is not attached itself: refused",
       [](AttachServer& s, AttachHello& h) {
         s.cluster_id = "";
         h.empty = true;
         h.cluster_id = "";
       },
       Method::refuse, Start::our_lsn, {"no data to serve yet"}},
      {"verify: compare the trees, stream nothing",
       [](AttachServer&, AttachHello& h) { h.purpose = AttachHello::Purpose::verify; }, Method::merkle, Start::our_lsn, {},
       {}, "", false, 0, true},
      {"verify of a diverged replica: compared, not refused (it only reads)",
       [](AttachServer& s, AttachHello& h) {
         promoted_at_100(s);
         h.durable_lsn = 110;
         h.purpose = AttachHello::Purpose::verify;
       },
       Method::merkle, Start::our_lsn, {}, {}, "", false, 0, true},
      {"verify without hash trees: refused",
       [](AttachServer& s, AttachHello& h) {
         h.purpose = AttachHello::Purpose::verify;
         s.has_hashes = false;
       },
       Method::refuse, Start::our_lsn, {"keeps no hash trees"}},
      {"verify from an empty replica: refused",
       [](AttachServer&, AttachHello& h) {
         h.purpose = AttachHello::Purpose::verify;
         h.empty = true;
       },
       Method::refuse, Start::our_lsn, {"verify", "not a replica of cluster cluster-1"}},
  };
  return table;
}

TEST(AttachDecision, EveryRule) {
  for (const Row& row : rows()) {
    SCOPED_TRACE(row.name);
    AttachServer s = master();
    AttachHello h = slave();
    row.change(s, h);
    const AttachDecision d = decide_attach(s, h);
    EXPECT_EQ(attach_method_name(d.method), std::string(attach_method_name(row.method)));
    if (row.method == Method::refuse) {
      EXPECT_TRUE(d.fatal) << "a refusal needs the slave's operator: the slave must not retry it";
      for (const auto& w : row.refusal) EXPECT_NE(d.refusal.find(w), std::string::npos) << "'" << w << "' not in: " << d.refusal;
      continue;
    }
    EXPECT_EQ(d.refusal, "");
    EXPECT_EQ(d.start == Start::their_lsn, row.start == Start::their_lsn);
    EXPECT_EQ(d.verify_only, row.verify_only);
    if (row.notice.empty()) {
      EXPECT_EQ(d.notice, "");
    }
    for (const auto& w : row.notice) EXPECT_NE(d.notice.find(w), std::string::npos) << "'" << w << "' not in: " << d.notice;
    if (row.why_not_stream.empty()) {
      EXPECT_EQ(d.why_not_stream, "") << "a slave that streams (or is empty) needs no reason";
    } else {
      EXPECT_NE(d.why_not_stream.find(row.why_not_stream), std::string::npos) << d.why_not_stream;
    }
    ASSERT_EQ(d.fork.has_value(), row.fork);
    if (row.fork) {
      EXPECT_EQ(d.fork->lsn, row.fork_lsn);
      EXPECT_EQ(d.fork->ours, "C");
      EXPECT_EQ(d.fork->theirs, "A");
    }
  }
}

// The fork point on its own: where two histories part, and when they have not.
TEST(AttachDecision, FindFork) {
  const std::vector<LineageEntry> a = {{"A", 1}};
  const std::vector<LineageEntry> ac = {{"A", 1}, {"C", 101}};
  const std::vector<LineageEntry> ab = {{"A", 1}, {"B", 51}};
  EXPECT_FALSE(find_fork(a, a, 1000)) << "same lineage: no fork, however far either got";
  EXPECT_FALSE(find_fork(ac, a, 100)) << "a prefix, up to the promotion: no fork";
  ASSERT_TRUE(find_fork(ac, a, 101));
  EXPECT_EQ(find_fork(ac, a, 101)->lsn, 100u);
  EXPECT_FALSE(find_fork(a, ac, 100)) << "a slave that started a lineage but wrote nothing under it";
  ASSERT_TRUE(find_fork(ac, ab, 60)) << "two promotions of the same history";
  EXPECT_EQ(find_fork(ac, ab, 60)->lsn, 50u);
  EXPECT_EQ(find_fork(ac, ab, 60)->ours, "C");
  EXPECT_EQ(find_fork(ac, ab, 60)->theirs, "B");
  EXPECT_FALSE(find_fork(a, {}, 0)) << "no history at all";
}

}  // namespace
}  // namespace blockrepl
