// The authentication proofs (auth.h): a proof is bound to everything it covers, so that one
// made for another connection, cluster, role or TLS session is worthless; and the secret file
// follows ssh's rule for keys.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

#include "blockrepl/auth.h"
#include "blockrepl/error.h"
#include "temp_dir.h"

namespace blockrepl {
namespace {

ProofInput sample() {
  ProofInput in;
  in.role = ProofInput::Role::slave;
  in.downstream_nonce = fresh_nonce();
  in.upstream_nonce = fresh_nonce();
  in.slave_cluster = "c1";
  return in;
}

TEST(Auth, AProofMatchesOnlyWhatItWasMadeFor) {
  const Secret secret("0123456789abcdef-the-cluster-secret");
  const ProofInput in = sample();
  const Mac mac = make_proof(secret, in);
  EXPECT_TRUE(proof_matches(secret, in, mac.data(), mac.size()));

  const Secret other("0123456789abcdef-another-secret");
  EXPECT_FALSE(proof_matches(other, in, mac.data(), mac.size())) << "another secret";
  auto changed = [&](auto change) {
    ProofInput x = in;
    change(x);
    return proof_matches(secret, x, mac.data(), mac.size());
  };
  EXPECT_FALSE(changed([](ProofInput& x) { x.role = ProofInput::Role::master; })) << "a slave's proof replayed as a master's";
  EXPECT_FALSE(changed([](ProofInput& x) { x.downstream_nonce[0] ^= 1; })) << "another connection (its nonce)";
  EXPECT_FALSE(changed([](ProofInput& x) { x.upstream_nonce[31] ^= 1; })) << "another connection (our nonce)";
  EXPECT_FALSE(changed([](ProofInput& x) { x.slave_cluster = "c2"; })) << "another cluster";
  EXPECT_FALSE(changed([](ProofInput& x) { x.slave_cluster = "c"; x.master_cluster = "1"; })) << "ids are length-prefixed";
  EXPECT_FALSE(changed([](ProofInput& x) { x.has_binding = true; })) << "a TLS session";
  EXPECT_FALSE(proof_matches(secret, in, mac.data(), mac.size() - 1)) << "a truncated MAC";
  EXPECT_FALSE(proof_matches(secret, in, mac.data(), 0)) << "no MAC";

  ProofInput tls = in;
  tls.has_binding = true;
  tls.binding.fill(7);
  const Mac tls_mac = make_proof(secret, tls);
  ProofInput relayed = tls;
  relayed.binding.fill(8);
  EXPECT_FALSE(proof_matches(secret, relayed, tls_mac.data(), tls_mac.size())) << "a proof carried to another TLS session";
}

TEST(Auth, MasterProofCoversItsClusterAndTheSlavesClaim) {
  const Secret secret("0123456789abcdef-the-cluster-secret");
  ProofInput in = sample();
  in.role = ProofInput::Role::master;
  in.master_cluster = "c1";
  const Mac mac = make_proof(secret, in);
  ProofInput x = in;
  x.master_cluster = "c9";
  EXPECT_FALSE(proof_matches(secret, x, mac.data(), mac.size()));
  x = in;
  x.slave_cluster = "";
  EXPECT_FALSE(proof_matches(secret, x, mac.data(), mac.size()));
}

TEST(Auth, NoncesAreFresh) { EXPECT_NE(fresh_nonce(), fresh_nonce()); }

std::string write_secret(const std::string& dir, const std::string& name, const std::string& text, mode_t mode) {
  const std::string path = dir + "/" + name;
  std::ofstream(path) << text;
  chmod(path.c_str(), mode);
  return path;
}

TEST(Auth, SecretFileMustBePrivateLongEnoughAndLosesItsTrailingNewline) {
  TempDir t;
  const std::string good = write_secret(t.path, "good", "0123456789abcdefXYZ\n", 0600);
  EXPECT_EQ(Secret::load(good)->bytes(), "0123456789abcdefXYZ");
  const std::string readable = write_secret(t.path, "readable", "0123456789abcdefXYZ", 0640);
  try {
    Secret::load(readable);
    ADD_FAILURE() << "a group-readable secret was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("chmod 600"), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).find("0123456789"), std::string::npos) << "the error shows the secret: " << e.what();
  }
  EXPECT_THROW(Secret::load(write_secret(t.path, "short", "short\n", 0600)), Error);
  EXPECT_THROW(Secret::load(t.path + "/missing"), Error);
  EXPECT_THROW(Secret::load(t.path), Error) << "a directory";
  EXPECT_THROW(Secret::load(write_secret(t.path, "huge", std::string(kMaxSecretBytes + 1, 'x'), 0600)), Error);
}

}  // namespace
}  // namespace blockrepl
