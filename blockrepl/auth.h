// Mutual authentication of two nodes that share the cluster's secret (--secret-file): each proves
// that it holds the secret with HMAC-SHA256 over fresh random nonces from both sides, the cluster
// ids and, with TLS, the TLS session's channel binding. The messages and their order are in
// proto/blockrepl.capnp; the connection-level steps in handshake.h. Pure functions: no sockets.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace blockrepl {

inline constexpr size_t kAuthNonceBytes = 32;
inline constexpr size_t kAuthMacBytes = 32;
inline constexpr size_t kChannelBindingBytes = 32;
// A shorter secret could be guessed offline from one recorded exchange (without TLS); a longer
// one is a mistake (a wrong file).
inline constexpr size_t kMinSecretBytes = 16;
inline constexpr size_t kMaxSecretBytes = 4096;

using Nonce = std::array<uint8_t, kAuthNonceBytes>;
using Mac = std::array<uint8_t, kAuthMacBytes>;
using ChannelBinding = std::array<uint8_t, kChannelBindingBytes>;

class Secret {
 public:
  // The file's bytes, without trailing whitespace (a newline an editor added). The file must be
  // private to its owner, like an ssh key, and hold kMinSecretBytes..kMaxSecretBytes. Throws
  // Error with one line naming the file, never its contents.
  static std::shared_ptr<const Secret> load(const std::string& path);
  explicit Secret(std::string bytes) : bytes_(std::move(bytes)) {}
  ~Secret();  // wipes the bytes
  Secret(const Secret&) = delete;
  Secret& operator=(const Secret&) = delete;
  std::string_view bytes() const { return bytes_; }

 private:
  std::string bytes_;
};

// 32 bytes from the kernel's random generator.
Nonce fresh_nonce();

// What a proof covers. The slave proves first, over the cluster id it claims ("" when it has
// none yet); the master then proves over its own cluster id as well, which the slave adopts.
struct ProofInput {
  enum class Role : uint8_t { slave = 'S', master = 'M' } role = Role::slave;
  Nonce downstream_nonce{}, upstream_nonce{};
  std::string slave_cluster, master_cluster;
  bool has_binding = false;  // TLS: the session's channel binding below
  ChannelBinding binding{};
};

Mac make_proof(const Secret& secret, const ProofInput& in);
// Constant-time comparison of a received MAC (any length: a wrong one never matches).
bool proof_matches(const Secret& secret, const ProofInput& in, const void* mac, size_t mac_len);

}  // namespace blockrepl
