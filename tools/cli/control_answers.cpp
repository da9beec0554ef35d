#include "tools/cli/control_answers.h"

#include <nlohmann/json.hpp>

#include "blockrepl/node.h"
#include "blockrepl/trace.h"

namespace blockrepl::cli {

namespace {

using nlohmann::json;

json status_json(Replica& replica, const std::string& mountpoint) {
  const ReplicaStatus st = replica.status();
  const Identity& id = st.identity;
  json j;
  j["role"] = st.role;
  j["node_id"] = id.node_id;
  j["cluster_id"] = id.cluster_id;
  json lin = json::array();
  for (auto& e : id.lineage) lin.push_back({{"id", e.id}, {"first_lsn", e.first_lsn}});
  j["lineage"] = lin;
  j["block_size"] = id.block_size;
  j["ack"] = ack_level_name(st.ack);
  j["data"] = st.data_path;
  j["mountpoint"] = mountpoint;
  j["no_fsync"] = st.no_fsync;
  j["upstream"] = nullptr;
  j["last_attach"] = nullptr;
  j["lsn"] = st.lsn;
  if (st.upstream) {
    const FollowerStatus& fs = *st.upstream;
    json up = {{"address", fs.address}, {"state", fs.state}, {"received_lsn", fs.received_lsn}, {"durable_lsn", fs.durable_lsn},
               {"authenticated", fs.authenticated}, {"encrypted", fs.encrypted}, {"compression", fs.compression}};
    if (!fs.last_error.empty() && fs.state == "disconnected") up["last_error"] = fs.last_error;
    if (!fs.waiting_for.empty()) up["waiting_for"] = fs.waiting_for;
    if (fs.state == "attaching")
      up["attach_progress"] = {{"bytes_received", fs.current_attach.bytes_received},
                               {"files_received", fs.current_attach.files_received},
                               {"blocks_received", fs.current_attach.blocks_received},
                               {"seconds", fs.current_attach.seconds}};
    j["upstream"] = up;
    if (fs.has_last_attach)
      j["last_attach"] = {{"method", fs.last_attach.method}, {"bytes_received", fs.last_attach.bytes_received},
                          {"blocks_received", fs.last_attach.blocks_received}, {"seconds", fs.last_attach.seconds}};
  }
  json slaves = json::array();
  for (auto& s : st.slaves)
    slaves.push_back({{"address", s.address}, {"node_id", s.node_id}, {"state", s.state}, {"ack", s.ack},
                      {"received_lsn", s.received_lsn}, {"durable_lsn", s.durable_lsn}, {"lag_bytes", s.lag_bytes},
                      {"authenticated", s.authenticated}, {"encrypted", s.encrypted}, {"probation", s.probation},
                      {"compression", s.compression}, {"batch_bytes", s.batch_bytes}, {"batch_wire_bytes", s.batch_wire_bytes}});
  j["slaves"] = slaves;
  if (Trace::on()) {
    // Cumulative latency histograms of a barrier's stages (trace.h): per stage, pairs of
    // (bucket upper bound in ns, samples); a reader takes the difference of two snapshots.
    json trace = json::object();
    for (const auto& stage : Trace::snapshot()) trace[stage.name] = stage.buckets;
    j["trace"] = trace;
  }
  return j;
}

json promote_json(Replica& replica) {
  const Promotion p = replica.promote();
  return json{{"promoted", true}, {"lsn", p.lsn}, {"lineage", p.lineage}};
}

json verify_json(Replica& replica, bool deep) {
  const DiffReport rep = replica.verify(deep);
  json diffs = json::array();
  for (auto& s : rep.differences) diffs.push_back(s);
  return json{{"identical", rep.differences.empty()}, {"differences", diffs}, {"dirs_listed", rep.dirs_listed},
              {"files_compared", rep.files_compared}, {"round_trips", rep.round_trips},
              {"dirs_covered", rep.dirs_covered}, {"entries_covered", rep.entries_covered}};
}

}  // namespace

std::string answer_control_request(Replica& replica, const std::string& mountpoint, const std::string& request) {
  try {
    if (request == "status") return status_json(replica, mountpoint).dump();
    if (request == "promote") return promote_json(replica).dump();
    if (request == "verify" || request == "verify deep") return verify_json(replica, request == "verify deep").dump();
  } catch (const std::exception& e) {
    return json{{"error", e.what()}}.dump();
  }
  return std::string("{\"error\":\"unknown request\"}");
}

}  // namespace blockrepl::cli
