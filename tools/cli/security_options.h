// The options with which a node meets its peers (mount and pull): --secret-file, --tls-cert,
// --tls-key, --tls-ca and --insecure, added to a command in one place and loaded in one place.
#pragma once
#include <CLI/CLI.hpp>

#include <optional>
#include <string>

#include "blockrepl/handshake.h"

namespace blockrepl::cli {

struct SecurityOptions {
  std::string secret_file;
  TlsFiles tls;
  bool insecure = false;  // mount: a listener other hosts can reach, without a secret
};

void add_security_options(CLI::App* cmd, SecurityOptions& opts, bool with_insecure);
// Reads the secret and the TLS files into `out`; an error line (naming the file) if one is
// unusable.
std::optional<std::string> load_peer_security(const SecurityOptions& opts, PeerSecurity* out);

}  // namespace blockrepl::cli
