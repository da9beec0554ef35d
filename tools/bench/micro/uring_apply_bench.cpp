// A slave's apply path with plain system calls against io_uring (issue 14 item 5): is it worth
// keeping several writes in flight and linking the flush after them?
//
// What one iteration is, on real files in /var/tmp (the machine's disk, not tmpfs):
//   4 KiB: K writes of 4 KiB at random block-aligned offsets of F files of 16 MiB (overwrites,
//          as a database's pages arrive), then fdatasync of each file written (the barrier).
//          The /0 variants skip the flush: a batch without a barrier.
//   1 MiB: K sequential writes of 1 MiB to one 256 MiB file (wrapping), then one fdatasync,
//          buffered and O_DIRECT (Store writes records of 256 KiB or more with O_DIRECT).
// Arguments: {K, F, flush} for 4 KiB, {K, flush} for 1 MiB.
//
// Plain          pwrite each, then fdatasync each dirty file: what Store and
//                Follower::make_durable do today.
// UringDrain     the K writes and the F fsyncs (IORING_FSYNC_DATASYNC) in one
//                io_uring_submit_and_wait; the first fsync carries IOSQE_IO_DRAIN so it
//                starts only once every write before it completed.
// UringTwoStep   the K writes in one submit-and-wait, then the F fsyncs in another (the
//                fsyncs of several files run concurrently).
// UringLink      the whole batch as one IOSQE_IO_LINK chain: writes one after the other,
//                then the fsyncs (the "flush linked after the writes" of the issue).
// FlushPlain/FlushUring  F files, one 4 KiB pwrite each, then fdatasync one after the other
//                (FlushPlain) or all at once through io_uring (FlushUring: they run
//                concurrently in io-wq workers): what Follower::make_durable does with
//                several dirty files (blockrepl/uring_sync.h).
// Times are wall clock (UseRealTime); CPU is the whole process's (MeasureProcessCPUTime), which
// counts the io-wq worker threads (iou-wrk-*) that do the writes io_uring cannot do inline.
#include <benchmark/benchmark.h>
#include <liburing.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

constexpr size_t kSmall = 4096;
constexpr size_t kLarge = 1 << 20;
constexpr uint64_t kSmallFileBytes = 16ull << 20;
constexpr uint64_t kLargeFileBytes = 256ull << 20;
constexpr unsigned kRingDepth = 512;

[[noreturn]] void fail(const std::string& what, int err) {
  throw std::runtime_error(what + ": " + strerror(err));
}

// A scratch directory on the machine's disk holding `count` files of `bytes` each, written
// (not just allocated, so overwrites do not convert unwritten extents) and synced up front.
struct Scratch {
  std::string dir;
  std::vector<int> fds;

  Scratch(unsigned count, uint64_t bytes, bool direct) {
    char tmpl[] = "/var/tmp/blockrepl-uring-bench-XXXXXX";
    if (!mkdtemp(tmpl)) fail("mkdtemp /var/tmp", errno);
    dir = tmpl;
    std::vector<char> chunk(kLarge, 'x');
    for (unsigned i = 0; i < count; i++) {
      std::string path = dir + "/f" + std::to_string(i);
      int fd = open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
      if (fd < 0) fail("open " + path, errno);
      for (uint64_t off = 0; off < bytes; off += chunk.size())
        if (pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) != static_cast<ssize_t>(chunk.size()))
          fail("fill " + path, errno);
      if (fsync(fd) != 0) fail("fsync " + path, errno);
      if (direct) {
        close(fd);
        fd = open(path.c_str(), O_RDWR | O_DIRECT | O_CLOEXEC);
        if (fd < 0) fail("open O_DIRECT " + path, errno);
      }
      fds.push_back(fd);
    }
  }
  ~Scratch() {
    for (int fd : fds) close(fd);
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

struct Ring {
  io_uring ring;
  Ring() {
    if (int err = io_uring_queue_init(kRingDepth, &ring, 0)) fail("io_uring_queue_init", -err);
  }
  ~Ring() { io_uring_queue_exit(&ring); }
  io_uring_sqe* sqe() {
    io_uring_sqe* s = io_uring_get_sqe(&ring);
    if (!s) fail("io_uring_get_sqe (ring full)", EBUSY);
    return s;
  }
  // Submits what is queued, waits for `n` completions and checks each (a write must be whole).
  void run(unsigned n, size_t write_len) {
    int rc = io_uring_submit_and_wait(&ring, n);
    if (rc < 0) fail("io_uring_submit_and_wait", -rc);
    for (unsigned i = 0; i < n; i++) {
      io_uring_cqe* cqe;
      if (int err = io_uring_wait_cqe(&ring, &cqe)) fail("io_uring_wait_cqe", -err);
      const int res = cqe->res;
      const bool is_write = cqe->user_data != 0;
      io_uring_cqe_seen(&ring, cqe);
      if (res < 0) fail(is_write ? "write" : "fsync", -res);
      if (is_write && static_cast<size_t>(res) != write_len) fail("short write", EIO);
    }
  }
};

void* aligned_buffer(size_t n, char fill) {
  void* p = std::aligned_alloc(4096, n);
  if (!p) throw std::bad_alloc();
  std::memset(p, fill, n);
  return p;
}

// A batch: which file and offset each write goes to, drawn up front.
struct Batch {
  std::vector<int> fd;
  std::vector<uint64_t> off;
  std::vector<int> dirty;  // each file written, once
};

Batch small_batch(const Scratch& s, size_t k, std::mt19937_64& rng) {
  Batch b;
  for (size_t i = 0; i < k; i++) {
    b.fd.push_back(s.fds[i % s.fds.size()]);
    b.off.push_back((rng() % (kSmallFileBytes / kSmall)) * kSmall);
  }
  for (size_t i = 0; i < std::min(k, s.fds.size()); i++) b.dirty.push_back(s.fds[i]);
  return b;
}

enum class Mode { plain, drain, two_step, link, plain_writes_uring_flush };

void run_batch(Mode mode, Ring* ring, const Batch& b, const std::vector<void*>& bufs, size_t len, bool flush) {
  const size_t k = b.fd.size();
  if (mode == Mode::plain || mode == Mode::plain_writes_uring_flush) {
    for (size_t i = 0; i < k; i++)
      if (pwrite(b.fd[i], bufs[i], len, static_cast<off_t>(b.off[i])) != static_cast<ssize_t>(len)) fail("pwrite", errno);
    if (flush && mode == Mode::plain_writes_uring_flush) {
      for (int fd : b.dirty) io_uring_prep_fsync(ring->sqe(), fd, IORING_FSYNC_DATASYNC);
      ring->run(static_cast<unsigned>(b.dirty.size()), len);
    } else if (flush)
      for (int fd : b.dirty)
        if (fdatasync(fd) != 0) fail("fdatasync", errno);
    return;
  }
  const bool link = mode == Mode::link;
  const size_t total = k + (flush ? b.dirty.size() : 0);
  size_t queued = 0;
  for (size_t i = 0; i < k; i++) {
    io_uring_sqe* sqe = ring->sqe();
    io_uring_prep_write(sqe, b.fd[i], bufs[i], static_cast<unsigned>(len), b.off[i]);
    sqe->user_data = 1;
    if (link && ++queued < total) sqe->flags |= IOSQE_IO_LINK;
  }
  if (!flush) {
    ring->run(static_cast<unsigned>(k), len);
    return;
  }
  if (mode == Mode::two_step) ring->run(static_cast<unsigned>(k), len);
  for (size_t j = 0; j < b.dirty.size(); j++) {
    io_uring_sqe* sqe = ring->sqe();
    io_uring_prep_fsync(sqe, b.dirty[j], IORING_FSYNC_DATASYNC);
    sqe->user_data = 0;
    if (mode == Mode::drain && j == 0) sqe->flags |= IOSQE_IO_DRAIN;
    if (link && ++queued < total) sqe->flags |= IOSQE_IO_LINK;
  }
  ring->run(static_cast<unsigned>(mode == Mode::two_step ? b.dirty.size() : total), len);
}

void small_writes(benchmark::State& state, Mode mode) {
  const size_t k = static_cast<size_t>(state.range(0));
  const unsigned files = static_cast<unsigned>(state.range(1));
  const bool flush = state.range(2) != 0;
  Scratch scratch(files, kSmallFileBytes, false);
  std::unique_ptr<Ring> ring;
  if (mode != Mode::plain) ring = std::make_unique<Ring>();
  std::vector<void*> bufs;
  for (size_t i = 0; i < k; i++) bufs.push_back(aligned_buffer(kSmall, static_cast<char>('a' + i % 26)));
  // Batches drawn up front (PauseTiming would cost as much as a cached 4 KiB write).
  std::mt19937_64 rng(42);
  std::vector<Batch> batches;
  for (int i = 0; i < 64; i++) batches.push_back(small_batch(scratch, k, rng));
  size_t n = 0;
  for (auto _ : state) run_batch(mode, ring.get(), batches[n++ % batches.size()], bufs, kSmall, flush);
  for (void* p : bufs) std::free(p);
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations() * k));
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * k * kSmall));
}

void large_writes(benchmark::State& state, Mode mode, bool direct) {
  const size_t k = static_cast<size_t>(state.range(0));
  const bool flush = state.range(1) != 0;
  Scratch scratch(1, kLargeFileBytes, direct);
  std::unique_ptr<Ring> ring;
  if (mode != Mode::plain) ring = std::make_unique<Ring>();
  std::vector<void*> bufs;
  for (size_t i = 0; i < k; i++) bufs.push_back(aligned_buffer(kLarge, static_cast<char>('a' + i % 26)));
  uint64_t next = 0;
  Batch b;
  b.dirty = {scratch.fds[0]};
  for (auto _ : state) {
    b.fd.assign(k, scratch.fds[0]);
    b.off.clear();
    for (size_t i = 0; i < k; i++) {
      b.off.push_back(next);
      next = (next + kLarge) % kLargeFileBytes;
    }
    run_batch(mode, ring.get(), b, bufs, kLarge, flush);
  }
  for (void* p : bufs) std::free(p);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * k * kLarge));
}

void SmallArgs(benchmark::internal::Benchmark* b) {
  for (int flush : {1, 0})
    for (int files : {1, 4})
      for (int k : {1, 4, 16, 64, 256}) {
        if (files > k) continue;
        b->Args({k, files, flush});
      }
  b->ArgNames({"K", "files", "flush"})->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMicrosecond);
}

void LargeArgs(benchmark::internal::Benchmark* b) {
  for (int flush : {1, 0})
    for (int k : {1, 4, 16}) b->Args({k, flush});
  b->ArgNames({"K", "flush"})->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMillisecond);
}

void BM_Apply4kPlain(benchmark::State& s) { small_writes(s, Mode::plain); }
void BM_Apply4kUringDrain(benchmark::State& s) { small_writes(s, Mode::drain); }
void BM_Apply4kUringTwoStep(benchmark::State& s) { small_writes(s, Mode::two_step); }
void BM_Apply4kUringLink(benchmark::State& s) { small_writes(s, Mode::link); }
BENCHMARK(BM_Apply4kPlain)->Apply(SmallArgs);
BENCHMARK(BM_Apply4kUringDrain)->Apply(SmallArgs);
BENCHMARK(BM_Apply4kUringTwoStep)->Apply(SmallArgs);
BENCHMARK(BM_Apply4kUringLink)->Apply(SmallArgs);

// Only the flush differs: F files with one 4 KiB write each, synced one after the other or at
// once. The numbers behind Follower::make_durable's choice.
void FlushArgs(benchmark::internal::Benchmark* b) {
  for (int files : {1, 2, 4, 8}) b->Args({files, files, 1});
  b->ArgNames({"K", "files", "flush"})->UseRealTime()->MeasureProcessCPUTime()->Unit(benchmark::kMicrosecond);
}
void BM_FlushPlain(benchmark::State& s) { small_writes(s, Mode::plain); }
void BM_FlushUring(benchmark::State& s) { small_writes(s, Mode::plain_writes_uring_flush); }
BENCHMARK(BM_FlushPlain)->Apply(FlushArgs);
BENCHMARK(BM_FlushUring)->Apply(FlushArgs);

void BM_Apply1mPlainBuffered(benchmark::State& s) { large_writes(s, Mode::plain, false); }
void BM_Apply1mUringBuffered(benchmark::State& s) { large_writes(s, Mode::drain, false); }
void BM_Apply1mPlainDirect(benchmark::State& s) { large_writes(s, Mode::plain, true); }
void BM_Apply1mUringDirect(benchmark::State& s) { large_writes(s, Mode::drain, true); }
BENCHMARK(BM_Apply1mPlainBuffered)->Apply(LargeArgs);
BENCHMARK(BM_Apply1mUringBuffered)->Apply(LargeArgs);
BENCHMARK(BM_Apply1mPlainDirect)->Apply(LargeArgs);
BENCHMARK(BM_Apply1mUringDirect)->Apply(LargeArgs);

}  // namespace
