#include "blockrepl/attach.h"

#include <algorithm>
#include <cstdint>

#include "blockrepl/wire.h"

namespace blockrepl {

const char* attach_method_name(AttachDecision::Method m) {
  switch (m) {
    case AttachDecision::Method::stream: return "stream";
    case AttachDecision::Method::merkle: return "Merkle diff";
    case AttachDecision::Method::full: return "full copy";
    case AttachDecision::Method::refuse: return "refuse";
  }
  return "?";
}

std::optional<Fork> find_fork(const std::vector<LineageEntry>& ours, const std::vector<LineageEntry>& theirs, Lsn lsn) {
  size_t k = 0;
  while (k < ours.size() && k < theirs.size() && ours[k] == theirs[k]) k++;
  if (k == 0) {
    if (theirs.empty()) return std::nullopt;
    return Fork{0, ours.empty() ? "-" : ours.front().id, theirs.front().id};
  }
  // Their records after the last shared lineage are ours only up to where we moved on.
  const Lsn ours_next = k < ours.size() ? ours[k].first_lsn : UINT64_MAX;
  const Lsn theirs_next = k < theirs.size() ? theirs[k].first_lsn : UINT64_MAX;
  const Lsn fork = std::min(ours_next, theirs_next);
  if (fork == UINT64_MAX || lsn < fork) return std::nullopt;  // they hold only shared records
  if (k == theirs.size() && ours_next == UINT64_MAX) return std::nullopt;
  return Fork{fork - 1, k < ours.size() ? ours[k].id : ours.back().id, k < theirs.size() ? theirs[k].id : theirs.back().id};
}

bool on_our_history(const std::vector<LineageEntry>& ours, const std::vector<LineageEntry>& theirs, Lsn lsn) {
  if (theirs.empty()) return false;
  // The slave's latest lineage must be one of ours, and the slave must not hold records of it
  // beyond the point where we left it for a newer one.
  const LineageEntry& last = theirs.back();
  for (size_t i = 0; i < ours.size(); i++) {
    if (ours[i] == last) {
      if (i + 1 < ours.size() && lsn >= ours[i + 1].first_lsn) return false;
      return true;
    }
  }
  return false;
}

namespace {

AttachDecision refused(std::string reason) {
  AttachDecision d;
  d.method = AttachDecision::Method::refuse;
  d.refusal = std::move(reason);
  // Every refusal needs the slave's operator (another cluster, another block size, a diverged
  // history, ...): retrying would only repeat it.
  d.fatal = true;
  return d;
}

}  // namespace

AttachDecision decide_attach(const AttachServer& me, const AttachHello& hello) {
  using Method = AttachDecision::Method;
  // Refusals first, in the order an operator should fix them: what the two programs speak, then
  // what the two volumes are.
  if (hello.protocol_version != kProtocolVersion)
    return refused("protocol version mismatch: slave speaks " + std::to_string(hello.protocol_version) + ", master speaks " +
                   std::to_string(kProtocolVersion));
  if (hello.block_size != me.block_size)
    return refused("block size mismatch: slave uses " + std::to_string(hello.block_size) + ", master uses " +
                   std::to_string(me.block_size));
  if (hello.hash_algorithm != kHashAlgorithm)
    return refused("hash algorithm mismatch: slave uses " + hello.hash_algorithm + ", master uses " + kHashAlgorithm);
  if (hello.node_id == me.node_id) return refused("a node cannot be its own slave (node id " + me.node_id + ")");
  // An empty slave takes whatever cluster it is given; one holding a volume only its own.
  if (!hello.empty && !hello.cluster_id.empty() && hello.cluster_id != me.cluster_id)
    return refused("cluster id mismatch: slave belongs to cluster " + hello.cluster_id + ", master to " + me.cluster_id);
  if (me.cluster_id.empty()) return refused("this node has no data to serve yet (it is not attached itself)");

  AttachDecision d;
  // Two histories are never merged silently: a node that wrote after its history left ours
  // (a former master after a failover) is rewritten only if its operator said so.
  if (!hello.empty && hello.purpose == AttachHello::Purpose::attach) {
    d.fork = find_fork(me.lineage, hello.lineage, hello.durable_lsn);
    if (d.fork && !hello.discard_my_data)
      return refused("diverged: this node's history (lineage " + d.fork->theirs + ") forked from the master's (lineage " +
                     d.fork->ours + ") after lsn " + std::to_string(d.fork->lsn) +
                     "; mount it with --discard-my-data to rewrite it to the master's state");
    if (!d.fork && hello.discard_my_data)
      d.notice = "--discard-my-data: this node has not diverged from the master; nothing is discarded";
  }

  if (hello.purpose == AttachHello::Purpose::verify) {
    if (!me.has_hashes) return refused("this node keeps no hash trees");
    if (hello.empty || hello.cluster_id != me.cluster_id)
      return refused("verify: the slave is not a replica of cluster " + me.cluster_id);
    d.method = Method::merkle;
    d.start = AttachDecision::Start::our_lsn;
    d.verify_only = true;
    return d;
  }

  // The cheapest correct way: the records it lacks, if it holds only records of our history and
  // the journal still has the ones after them; else compare the trees; copy only into an empty
  // replica (or when there are no trees to compare).
  if (hello.empty) {
    d.method = Method::full;
    d.start = AttachDecision::Start::our_lsn;
    return d;
  }
  if (hello.resync && me.has_hashes)
    d.why_not_stream = "it asked to resync";  // it cannot go on from its LSN (its disk filled part way)
  else if (!on_our_history(me.lineage, hello.lineage, hello.durable_lsn))
    d.why_not_stream = "not on our history";
  else if (hello.durable_lsn > me.last_lsn)
    d.why_not_stream = "ahead of us";
  else if (!me.journal_covers_their_lsn)
    d.why_not_stream = "older than the journal";
  if (d.why_not_stream.empty()) {
    d.method = Method::stream;
    d.start = AttachDecision::Start::their_lsn;
  } else {
    d.method = me.has_hashes ? Method::merkle : Method::full;
    d.start = AttachDecision::Start::our_lsn;
  }
  return d;
}

}  // namespace blockrepl
