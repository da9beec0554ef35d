// The journal keeps recent records in memory, in LSN order, for the senders that stream them to
// slaves (and, later, for slaves that re-attach after a short absence). It holds at least
// `keep_bytes` of history, and everything a registered reader has not yet taken; when readers
// fall too far behind it makes writers wait (back-pressure) and, past the timeout, gives up on
// the slowest reader rather than block forever.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "blockrepl/record.h"
#include "blockrepl/record_sink.h"

namespace blockrepl {

using RecordPtr = std::shared_ptr<const Record>;

class Journal : public RecordSink {
 public:
  // keep_bytes: history kept for re-attach (0: none beyond what readers need).
  // inflight_bytes: how far the slowest reader may lag before writers wait.
  // stall_timeout: how long writers wait for a lagging reader before it is cut off.
  Journal(size_t keep_bytes, size_t inflight_bytes, std::chrono::milliseconds stall_timeout);
  ~Journal() override;

  void on_record(const Record& rec) override;
  // Stored like any record, without waking the readers (the publisher pushes it: record_sink.h).
  void on_record_pushed(const Record& rec) override;
  // Wakes the readers waiting in wait() or read() (a pusher could not take a record to them).
  void wake_readers();
  // Back-pressure: a reader that lags by more than the in-flight bound holds up writers, here,
  // before they take the node's ordering lock, for at most the stall timeout.
  void wait_for_room() override;
  // Forgets every record and cuts off every reader: they must attach again (a Merkle diff).
  void on_reset(Lsn lsn) override;

  // A reader's position: it has taken every record up to `taken`.
  struct Reader {
    Lsn taken = 0;
    bool cut_off = false;  // the journal gave up on it (it lagged past the timeout)
    bool attaching = false;  // taking a full copy: holds records but never holds up writers
    std::string name;
  };
  // Registers a reader that resumes after `after`. Returns nullptr if the journal no longer
  // holds the records right after `after` (the reader needs another way to catch up).
  std::shared_ptr<Reader> attach(Lsn after, const std::string& name, bool attaching = false);
  void set_attaching(const std::shared_ptr<Reader>& reader, bool attaching);
  void detach(const std::shared_ptr<Reader>& reader);

  // Waits up to `timeout` for records after reader->taken and appends them (up to max_bytes of
  // data, at least one) to `out`, advancing reader->taken. Returns false if the reader was cut
  // off or the journal closed.
  bool read(const std::shared_ptr<Reader>& reader, std::vector<RecordPtr>& out, size_t max_bytes,
            std::chrono::milliseconds timeout);
  // Waits up to `timeout` until there are records after reader->taken, without taking them (a
  // sender then takes them under its send lock, which a pusher may hold meanwhile). Returns
  // false if the reader was cut off or the journal closed.
  bool wait(const std::shared_ptr<Reader>& reader, std::chrono::milliseconds timeout);

  // Whether a reader could resume after `lsn` (the journal holds every record after it).
  bool covers(Lsn lsn);
  Lsn last_lsn();
  // The LSN of the newest barrier record it holds (0: none yet).
  Lsn last_barrier_lsn() const { return last_barrier_lsn_.load(std::memory_order_acquire); }
  // The LSN every record since is known to the journal (last_lsn() when nothing is kept).
  void set_start(Lsn lsn);
  size_t bytes();
  // Data bytes of the records after `lsn` that the journal still holds (a slave's lag).
  uint64_t bytes_after(Lsn lsn);
  void close();

 private:
  void store(const Record& rec, bool wake);
  void evict_locked();
  size_t record_cost(const Record& r) const { return sizeof(Record) + r.data.size() + r.name.size() + r.name2.size(); }

  static constexpr size_t kAttachAllowance = size_t{1} << 30;  // records held for attaching readers
  size_t bound_locked() const;
  const size_t keep_bytes_, inflight_bytes_;
  const std::chrono::milliseconds stall_timeout_;
  std::mutex mu_;
  std::condition_variable new_record_cv_, space_cv_;
  std::deque<RecordPtr> records_;
  size_t bytes_ = 0;
  Lsn base_lsn_ = 0;  // records_ holds every record after base_lsn_
  Lsn last_lsn_ = 0;
  std::atomic<Lsn> last_barrier_lsn_{0};
  std::set<std::shared_ptr<Reader>> readers_;
  bool closed_ = false;
};

}  // namespace blockrepl
