#include "blockrepl/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/random.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "blockrepl/error.h"
#include "blockrepl/fsutil.h"

namespace blockrepl {

std::shared_ptr<const Secret> Secret::load(const std::string& path) {
  std::string bytes = read_private_file(path, "secret", kMaxSecretBytes);
  while (!bytes.empty() && (bytes.back() == '\n' || bytes.back() == '\r' || bytes.back() == ' ' || bytes.back() == '\t'))
    bytes.pop_back();
  if (bytes.size() < kMinSecretBytes) {
    OPENSSL_cleanse(bytes.data(), bytes.size());
    throw Error("secret file " + path + " holds " + std::to_string(bytes.size()) + " bytes, fewer than " +
                    std::to_string(kMinSecretBytes) + ": make one with `openssl rand -base64 32 > " + path + "`",
                EINVAL);
  }
  return std::make_shared<const Secret>(std::move(bytes));
}

Secret::~Secret() { OPENSSL_cleanse(bytes_.data(), bytes_.size()); }

Nonce fresh_nonce() {
  Nonce n;
  size_t got = 0;
  while (got < n.size()) {
    const ssize_t r = getrandom(n.data() + got, n.size() - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw_errno("cannot draw a random nonce", errno);
    got += static_cast<size_t>(r);
  }
  return n;
}

namespace {

void append_text(std::vector<uint8_t>& out, std::string_view s) {
  const uint32_t n = static_cast<uint32_t>(s.size());
  for (int i = 0; i < 4; i++) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
  out.insert(out.end(), s.begin(), s.end());
}

// The proof input, version 1: "blockrepl-auth-v1\0", the role ('S' or 'M'), the downstream's and
// the upstream's nonce, the slave's claimed cluster id and the master's cluster id (each a 4-byte
// little-endian length and the bytes; the slave's proof has an empty master cluster id), then a
// byte 1 and the 32-byte TLS channel binding, or a byte 0.
std::vector<uint8_t> encode(const ProofInput& in) {
  static const char kLabel[] = "blockrepl-auth-v1";
  std::vector<uint8_t> out(kLabel, kLabel + sizeof kLabel);  // with its NUL
  out.push_back(static_cast<uint8_t>(in.role));
  out.insert(out.end(), in.downstream_nonce.begin(), in.downstream_nonce.end());
  out.insert(out.end(), in.upstream_nonce.begin(), in.upstream_nonce.end());
  append_text(out, in.slave_cluster);
  append_text(out, in.role == ProofInput::Role::master ? std::string_view(in.master_cluster) : std::string_view());
  out.push_back(in.has_binding ? 1 : 0);
  if (in.has_binding) out.insert(out.end(), in.binding.begin(), in.binding.end());
  return out;
}

}  // namespace

Mac make_proof(const Secret& secret, const ProofInput& in) {
  const std::vector<uint8_t> msg = encode(in);
  Mac mac{};
  unsigned len = 0;
  if (!HMAC(EVP_sha256(), secret.bytes().data(), static_cast<int>(secret.bytes().size()), msg.data(), msg.size(), mac.data(), &len) ||
      len != mac.size())
    throw Error("HMAC-SHA256 failed", EIO);
  return mac;
}

bool proof_matches(const Secret& secret, const ProofInput& in, const void* mac, size_t mac_len) {
  const Mac want = make_proof(secret, in);
  return mac_len == want.size() && CRYPTO_memcmp(want.data(), mac, want.size()) == 0;
}

}  // namespace blockrepl
