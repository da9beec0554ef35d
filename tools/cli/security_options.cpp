#include "tools/cli/security_options.h"

namespace blockrepl::cli {

void add_security_options(CLI::App* cmd, SecurityOptions& opts, bool with_insecure) {
  cmd->add_option("--secret-file", opts.secret_file,
                  "the cluster's shared secret (mode 600, at least 16 bytes): peers prove it to each other before anything is "
                  "sent");
  cmd->add_option("--tls-cert", opts.tls.cert, "TLS 1.3 on the stream: this node's certificate (PEM, with its chain)");
  cmd->add_option("--tls-key", opts.tls.key, "TLS: this node's private key (PEM, mode 600)");
  cmd->add_option("--tls-ca", opts.tls.ca, "TLS: the CA that peers' certificates must chain to");
  if (with_insecure)
    cmd->add_flag("--insecure", opts.insecure, "allow --listen on an address other hosts can reach without --secret-file");
}

std::optional<std::string> load_peer_security(const SecurityOptions& opts, PeerSecurity* out) {
  try {
    if (!opts.secret_file.empty()) out->secret = Secret::load(opts.secret_file);
    if (opts.tls.any()) out->tls = TlsContext::load(opts.tls);
  } catch (const std::exception& e) {
    return std::string(e.what());
  }
  return std::nullopt;
}

}  // namespace blockrepl::cli
