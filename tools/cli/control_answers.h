// The daemon's half of the control socket: turns `blockrepl status`, `promote` and `verify`
// requests into calls on the Replica and its answers into the JSON the commands print.
#pragma once
#include <string>

#include "blockrepl/replica.h"

namespace blockrepl::cli {

// One request line ("status", "promote", "verify", "verify deep") -> one JSON object; failures
// are {"error": "..."}, which the asking command prints as its one line.
std::string answer_control_request(Replica& replica, const std::string& mountpoint, const std::string& request);

}  // namespace blockrepl::cli
