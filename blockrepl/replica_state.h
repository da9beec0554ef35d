// What a slave knows about its own progress, kept in <data>/.blockrepl/replica: the last LSN that
// is durable here (everything up to it survives a power loss), the last LSN applied (survives a
// crash of the daemon, not of the machine), and whether the first full copy completed.
#pragma once
#include <string>

#include "blockrepl/record.h"

namespace blockrepl {

class ReplicaState {
 public:
  // Opens (creating) the state file in the metadata folder; throws Error.
  ReplicaState(int meta_fd, const std::string& where);
  ~ReplicaState();
  ReplicaState(const ReplicaState&) = delete;
  ReplicaState& operator=(const ReplicaState&) = delete;

  Lsn durable() const { return durable_; }
  Lsn applied() const { return applied_; }
  bool attach_complete() const { return complete_; }
  bool exists() const { return existed_; }

  // Written in place (one small pwrite): cheap enough for every batch.
  void set_applied(Lsn lsn);
  // Call only once the data up to `lsn` is durable. Unsynced, the note may be lost in a power
  // failure and read back older, which is safe (it is a lower bound).
  void set_durable(Lsn lsn, bool sync = true);
  void set_attach_complete(bool complete, Lsn lsn);

 private:
  void write(bool sync);
  int fd_ = -1;
  std::string where_;
  Lsn durable_ = 0, applied_ = 0;
  bool complete_ = false;
  bool existed_ = false;
};

}  // namespace blockrepl
