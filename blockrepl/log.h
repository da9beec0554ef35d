// One line per event on stderr; quiet by default (warnings and errors), -v for more.
#pragma once
#include <cstdarg>

namespace blockrepl {

enum class LogLevel { error = 0, warn = 1, info = 2, debug = 3 };

void set_log_level(LogLevel level);
LogLevel log_level();
void set_log_prefix(const char* prefix);  // e.g. "blockrepl[master]"
// Also writes every line to fd (-1: stop). A daemon that is still starting logs to the terminal
// of `mount` and to its log file.
void set_log_copy_fd(int fd);

void logf(LogLevel level, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

#define BR_LOG(level, ...)                                              \
  do {                                                                  \
    if (static_cast<int>(level) <= static_cast<int>(::blockrepl::log_level())) \
      ::blockrepl::logf(level, __VA_ARGS__);                            \
  } while (0)
#define LOG_ERROR(...) BR_LOG(::blockrepl::LogLevel::error, __VA_ARGS__)
#define LOG_WARN(...) BR_LOG(::blockrepl::LogLevel::warn, __VA_ARGS__)
#define LOG_INFO(...) BR_LOG(::blockrepl::LogLevel::info, __VA_ARGS__)
#define LOG_DEBUG(...) BR_LOG(::blockrepl::LogLevel::debug, __VA_ARGS__)

}  // namespace blockrepl
