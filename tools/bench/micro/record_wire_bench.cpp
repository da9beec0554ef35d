// Record encoding and decoding (blockrepl/wire.h): what the master pays per record it streams
// and a slave per record it receives, for a 4 KiB write and a 1 MiB write.
#include <benchmark/benchmark.h>

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <string>

#include "blockrepl/wire.h"

namespace blockrepl {
namespace {

// A write record as the master's write path makes it (data viewed, not owned).
Record write_record(const std::string& payload) {
  Record rec;
  rec.lsn = 123456;
  rec.op = Op::write;
  rec.fid = 0x1234;
  rec.offset = 1 << 30;
  rec.mtime = {1700000000, 123456789};
  rec.data = payload;
  return rec;
}

// What a frame on the wire holds: the record's message in flat-array form.
kj::Array<capnp::word> encoded(const Record& rec) {
  capnp::MallocMessageBuilder msg;
  to_wire(rec, msg.initRoot<wire::Record>());
  return capnp::messageToFlatArray(msg);
}

// The reader options a received frame is parsed with (Frame::parse).
capnp::ReaderOptions frame_reader_options() {
  capnp::ReaderOptions opts;
  opts.traversalLimitInWords = kTraversalLimitWords;
  opts.nestingLimit = 16;
  return opts;
}

// to_wire into a fresh builder and its segments ready for writev, as Connection::send takes
// them (a payload of 4 KiB or more is referenced, not copied, so this is nearly size-free).
void BM_RecordToWire(benchmark::State& state) {
  const std::string payload(static_cast<size_t>(state.range(0)), 'x');
  const Record rec = write_record(payload);
  for (auto _ : state) {
    capnp::MallocMessageBuilder msg;
    to_wire(rec, msg.initRoot<wire::Record>());
    benchmark::DoNotOptimize(msg.getSegmentsForOutput().size());
  }
  // No bytes/s: the payload is referenced, not touched, so the figure is the time per record.
}
BENCHMARK(BM_RecordToWire)->Arg(4 << 10)->Arg(1 << 20);

// The same, flattened into one array (a copy of the payload): the cost a writev avoids.
void BM_RecordToFlatArray(benchmark::State& state) {
  const std::string payload(static_cast<size_t>(state.range(0)), 'x');
  const Record rec = write_record(payload);
  for (auto _ : state) benchmark::DoNotOptimize(encoded(rec).size());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * state.range(0));
}
BENCHMARK(BM_RecordToFlatArray)->Arg(4 << 10)->Arg(1 << 20);

// A received frame parsed and validated into a Record; view_data as the follower's apply loop
// does (the data stays in the frame), or owning a copy (a record that outlives its frame).
void from_wire_bench(benchmark::State& state, bool view_data) {
  const std::string payload(static_cast<size_t>(state.range(0)), 'x');
  const auto words = encoded(write_record(payload));
  for (auto _ : state) {
    capnp::FlatArrayMessageReader reader(words.asPtr(), frame_reader_options());
    Record rec = from_wire(reader.getRoot<wire::Record>(), view_data);
    benchmark::DoNotOptimize(rec.data.data());
  }
  // bytes/s only where the payload is copied; a view costs the same for any size.
  if (!view_data) state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * state.range(0));
}
void BM_RecordFromWireView(benchmark::State& state) { from_wire_bench(state, true); }
void BM_RecordFromWireCopy(benchmark::State& state) { from_wire_bench(state, false); }
BENCHMARK(BM_RecordFromWireView)->Arg(4 << 10)->Arg(1 << 20);
BENCHMARK(BM_RecordFromWireCopy)->Arg(4 << 10)->Arg(1 << 20);

}  // namespace
}  // namespace blockrepl
