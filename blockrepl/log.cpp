#include "blockrepl/log.h"

#include <atomic>
#include <cstdio>
#include <ctime>
#include <string>
#include <unistd.h>

namespace blockrepl {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::warn)};
std::string g_prefix = "blockrepl";
std::atomic<int> g_copy_fd{-1};
const char* level_name(LogLevel l) {
  switch (l) {
    case LogLevel::error: return "error";
    case LogLevel::warn: return "warning";
    case LogLevel::info: return "info";
    case LogLevel::debug: return "debug";
  }
  return "?";
}
}  // namespace

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load(std::memory_order_relaxed)); }
void set_log_prefix(const char* prefix) { g_prefix = prefix; }
void set_log_copy_fd(int fd) { g_copy_fd = fd; }

void logf(LogLevel level, const char* fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  // Build the whole line first and write it with one call so concurrent threads never interleave.
  char line[2300];
  int n;
  if (level >= LogLevel::info) {
    timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    localtime_r(&ts.tv_sec, &tm);
    n = snprintf(line, sizeof line, "%02d:%02d:%02d.%03ld %s: %s: %s\n", tm.tm_hour, tm.tm_min,
                 tm.tm_sec, ts.tv_nsec / 1000000, g_prefix.c_str(), level_name(level), msg);
  } else {
    n = snprintf(line, sizeof line, "%s: %s: %s\n", g_prefix.c_str(), level_name(level), msg);
  }
  if (n > static_cast<int>(sizeof line)) n = sizeof line;
  ssize_t ignored = write(STDERR_FILENO, line, n);
  if (int copy = g_copy_fd.load(std::memory_order_relaxed); copy >= 0) ignored = write(copy, line, n);
  (void)ignored;
}

}  // namespace blockrepl
