// The attach decision (DESIGN.md section 3): given what a serving node knows of itself and what a
// slave said in its hello, the cheapest correct way to bring the slave up to date (stream from
// its LSN, Merkle diff, full copy) or why it is refused. A pure function: no sockets, no Node, so
// every rule is tested by a table (tests/unit/attach_test.cpp); Upstream carries it out.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "blockrepl/metadata.h"
#include "blockrepl/record.h"

namespace blockrepl {

// The serving node (a master, or a slave that serves slaves of its own).
struct AttachServer {
  std::string node_id, cluster_id;  // cluster_id empty: this node holds no volume yet
  uint32_t block_size = 0;
  std::vector<LineageEntry> lineage;
  Lsn last_lsn = 0;
  bool has_hashes = false;  // keeps hash trees: can answer a Merkle diff
  // Whether the journal still holds every record after the slave's durable LSN (the caller asks
  // Journal::covers(hello.durable_lsn)): a stream can start there.
  bool journal_covers_their_lsn = false;
};

// What the slave said in its hello (wire::Hello, as plain values).
struct AttachHello {
  enum class Purpose { attach, verify };
  uint32_t protocol_version = 0;
  std::string node_id, cluster_id, hash_algorithm;
  uint32_t block_size = 0;
  std::vector<LineageEntry> lineage;
  Lsn durable_lsn = 0;
  bool empty = false;            // holds no data: may take a full copy
  Purpose purpose = Purpose::attach;
  bool discard_my_data = false;  // a diverged slave agrees to be rewritten
  bool resync = false;           // cannot go on from its LSN (its disk filled): wants the Merkle diff
};

// Where a slave's history left ours: the last LSN both histories share, and the lineage ids on
// each side after it.
struct Fork {
  Lsn lsn = 0;
  std::string ours, theirs;
};

struct AttachDecision {
  enum class Method { stream, merkle, full, refuse };
  Method method = Method::refuse;
  // Where the records that follow the attach start:
  //  - their_lsn: stream: the slave goes on from its own durable LSN, which the journal holds.
  //  - our_lsn: merkle, full: the tree is compared or copied as it is at the attach, and every
  //    record from the server's LSN at that moment follows (the caller holds them in the journal
  //    before it starts).
  enum class Start { their_lsn, our_lsn };
  Start start = Start::our_lsn;
  // Purpose verify: compare the trees (merkle) and stop; nothing is streamed after.
  bool verify_only = false;

  // For refuse: the reason (the slave prints it; it names both sides' values) and whether the
  // slave should give up rather than retry (every refusal today: they need its operator).
  std::string refusal;
  bool fatal = false;

  // Something the slave should tell its operator ("" if nothing); sent in the welcome.
  std::string notice;
  // The slave's history left ours (it is accepted only with discard_my_data).
  std::optional<Fork> fork;
  // Why a slave that holds data does not stream: "not on our history", "older than the
  // journal", ... ("" when it streams or is empty). For the server's log.
  std::string why_not_stream;
};

const char* attach_method_name(AttachDecision::Method m);  // "stream", "merkle", "full copy", "refuse"

AttachDecision decide_attach(const AttachServer& server, const AttachHello& hello);

// Where the history `theirs`, holding every record up to `lsn`, left `ours`: nullopt if it did
// not (it holds nothing we lack).
std::optional<Fork> find_fork(const std::vector<LineageEntry>& ours, const std::vector<LineageEntry>& theirs, Lsn lsn);
// Whether a slave whose history is `theirs` and which holds every record up to `lsn` has only
// seen records that are also on our history `ours` (so it can simply continue from `lsn`).
bool on_our_history(const std::vector<LineageEntry>& ours, const std::vector<LineageEntry>& theirs, Lsn lsn);

}  // namespace blockrepl
