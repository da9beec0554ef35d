// The batch codec (blockrepl/batch_codec.h): what --compress costs the master per batch and a
// slave per compressed batch, and what it saves on the link, for three kinds of data: SQLite
// pages (a real database file made here with libsqlite3), text (log lines) and random bytes
// (already compressed or encrypted data). A batch is 1 MiB of 4 KiB write records (SQLite's page
// writes) or 64 KiB of them (a small commit). Counters: `ratio` = batch bytes / bytes sent;
// bytes_per_second counts the uncompressed batch.
#include <benchmark/benchmark.h>
#include <sqlite3.h>
#include <unistd.h>

#include <capnp/message.h>
#include <capnp/serialize.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "blockrepl/batch_codec.h"

namespace blockrepl {
namespace {

enum Kind { kSqlite = 0, kText = 1, kRandom = 2 };

// 8 MiB of a SQLite database file: a table of orders with names, e-mail addresses, amounts,
// dates and a free-text note, and an index, as an application writes them.
std::string sqlite_bytes() {
  char path[] = "/tmp/blockrepl-bench-XXXXXX";
  int fd = mkstemp(path);
  if (fd < 0) return {};
  close(fd);
  sqlite3* db = nullptr;
  sqlite3_open(path, &db);
  sqlite3_exec(db,
               "PRAGMA page_size=4096; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
               "CREATE TABLE orders(id INTEGER PRIMARY KEY, customer TEXT, email TEXT, amount REAL, created TEXT, note TEXT);"
               "CREATE INDEX orders_customer ON orders(customer);",
               nullptr, nullptr, nullptr);
  sqlite3_exec(db, "BEGIN", nullptr, nullptr, nullptr);
  sqlite3_stmt* st = nullptr;
  sqlite3_prepare_v2(db, "INSERT INTO orders(customer, email, amount, created, note) VALUES(?,?,?,?,?)", -1, &st, nullptr);
  std::mt19937 rng(42);
  const char* first[] = {"Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Greta", "Hugo", "Ida", "Jonas"};
  const char* last[] = {"Schmidt", "Miller", "Dubois", "Rossi", "Novak", "Jensen", "Garcia", "Kowalski"};
  const char* notes[] = {"deliver to the back door", "gift wrap", "", "call before delivery", "repeat customer", ""};
  for (int i = 0; i < 60000; i++) {
    std::string name = std::string(first[rng() % 10]) + " " + last[rng() % 8];
    std::string email = name.substr(0, name.find(' ')) + std::to_string(rng() % 1000) + "@example.com";
    std::string date = "2024-0" + std::to_string(1 + rng() % 9) + "-" + std::to_string(10 + rng() % 18) + "T" +
                       std::to_string(10 + rng() % 13) + ":" + std::to_string(10 + rng() % 50) + ":00Z";
    sqlite3_bind_text(st, 1, name.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, email.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_double(st, 3, (rng() % 100000) / 100.0);
    sqlite3_bind_text(st, 4, date.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 5, notes[rng() % 6], -1, SQLITE_TRANSIENT);
    sqlite3_step(st);
    sqlite3_reset(st);
  }
  sqlite3_finalize(st);
  sqlite3_exec(db, "COMMIT", nullptr, nullptr, nullptr);
  sqlite3_close(db);
  std::string out;
  if (FILE* f = fopen(path, "rb")) {
    char buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0 && out.size() < (8u << 20)) out.append(buf, n);
    fclose(f);
  }
  unlink(path);
  return out;
}

std::string text_bytes() {
  std::string out;
  std::mt19937 rng(7);
  const char* paths[] = {"/api/items", "/api/orders", "/static/app.js", "/login", "/api/users/me"};
  while (out.size() < (8u << 20))
    out += "2024-05-01T12:" + std::to_string(10 + rng() % 50) + ":" + std::to_string(10 + rng() % 50) + "Z INFO 10.0." +
           std::to_string(rng() % 256) + "." + std::to_string(rng() % 256) + " GET " + paths[rng() % 5] + "/" +
           std::to_string(rng() % 100000) + " 200 " + std::to_string(rng() % 900) + "ms\n";
  return out;
}

std::string random_bytes() {
  std::string out(8u << 20, '\0');
  std::mt19937_64 rng(3);
  for (size_t i = 0; i + 8 <= out.size(); i += 8) {
    uint64_t v = rng();
    memcpy(&out[i], &v, 8);
  }
  return out;
}

const std::string& source(Kind k) {
  static const std::string sources[] = {sqlite_bytes(), text_bytes(), random_bytes()};
  return sources[k];
}

// A batch of `bytes` of 4 KiB write records taken from the source, as Upstream::stream builds it.
void build_batch(capnp::MallocMessageBuilder& mb, Kind kind, size_t bytes) {
  const std::string& src = source(kind);
  const unsigned n = static_cast<unsigned>(bytes / 4096);
  auto list = mb.initRoot<wire::Message>().initBatch().initRecords(n);
  for (unsigned i = 0; i < n; i++) {
    Record rec;
    rec.lsn = 1000 + i;
    rec.op = Op::write;
    rec.fid = 0x1234;
    rec.offset = (uint64_t{i} * 4096 * 7) % src.size() / 4096 * 4096;  // pages from all over the file
    rec.mtime = {1700000000, 123456789};
    rec.data = std::string_view(src).substr(rec.offset, 4096);
    to_wire(rec, list[i]);
  }
}

void BM_CompressBatch(benchmark::State& state) {
  const Kind kind = static_cast<Kind>(state.range(0));
  const size_t bytes = static_cast<size_t>(state.range(1));
  capnp::MallocMessageBuilder batch;
  build_batch(batch, kind, bytes);
  BatchEncoder enc;
  enc.start({wire::Codec::ZSTD, static_cast<int>(state.range(2))});
  for (auto _ : state) {
    capnp::MallocMessageBuilder out;
    benchmark::DoNotOptimize(enc.encode(batch, out));
  }
  state.SetBytesProcessed(static_cast<int64_t>(enc.batch_bytes()));
  state.counters["ratio"] = static_cast<double>(enc.batch_bytes()) / static_cast<double>(enc.sent_bytes());
}

void BM_DecompressBatch(benchmark::State& state) {
  const Kind kind = static_cast<Kind>(state.range(0));
  const size_t bytes = static_cast<size_t>(state.range(1));
  capnp::MallocMessageBuilder batch;
  build_batch(batch, kind, bytes);
  BatchEncoder enc;
  enc.start({wire::Codec::ZSTD, static_cast<int>(state.range(2))});
  capnp::MallocMessageBuilder out;
  if (!enc.encode(batch, out)) {
    state.SkipWithError("the batch does not compress (sent plain)");
    return;
  }
  // A received frame is read once: each iteration parses its own copy (a reader's traversal
  // limit counts every read), as the slave's receive path does.
  const auto flat = capnp::messageToFlatArray(out);
  uint64_t raw = 0;
  for (auto _ : state) {
    auto frame = Frame::parse(kj::heapArray<capnp::word>(flat.asPtr()), "bench");
    auto cb = frame->root().getCompressedBatch();
    raw += cb.getUncompressedSize();
    benchmark::DoNotOptimize(decode_compressed_batch(cb, "bench"));
  }
  state.SetBytesProcessed(static_cast<int64_t>(raw));
}

// kind (sqlite, text, random) x batch bytes x zstd level.
void codec_args(benchmark::internal::Benchmark* b) {
  for (int kind : {kSqlite, kText, kRandom})
    for (int level : {1, 3, 6, 9})
      for (int bytes : {64 << 10, 1 << 20}) b->Args({kind, bytes, level});
}

BENCHMARK(BM_CompressBatch)->Apply(codec_args)->ArgNames({"kind", "bytes", "level"});
BENCHMARK(BM_DecompressBatch)->Apply(codec_args)->ArgNames({"kind", "bytes", "level"});

}  // namespace
}  // namespace blockrepl
