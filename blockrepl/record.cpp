#include "blockrepl/record.h"

#include <cinttypes>
#include <cstdio>

namespace blockrepl {

const char* op_name(Op op) {
  switch (op) {
    case Op::write: return "write";
    case Op::truncate: return "truncate";
    case Op::fallocate: return "fallocate";
    case Op::setattr: return "setattr";
    case Op::create: return "create";
    case Op::mkdir: return "mkdir";
    case Op::symlink: return "symlink";
    case Op::link: return "link";
    case Op::unlink: return "unlink";
    case Op::rmdir: return "rmdir";
    case Op::rename: return "rename";
    case Op::setxattr: return "setxattr";
    case Op::removexattr: return "removexattr";
    case Op::fsync: return "fsync";
    case Op::release: return "release";
  }
  return "unknown";
}

std::string Record::describe() const {
  char buf[256];
  snprintf(buf, sizeof buf, "lsn %" PRIu64 " %s fid %016" PRIx64, lsn, op_name(op), fid);
  std::string s = buf;
  switch (op) {
    case Op::write:
      snprintf(buf, sizeof buf, " offset %" PRIu64 " length %zu", offset, data.size());
      s += buf;
      break;
    case Op::truncate:
      snprintf(buf, sizeof buf, " size %" PRIu64, offset);
      s += buf;
      break;
    case Op::fallocate:
      snprintf(buf, sizeof buf, " mode %#x offset %" PRIu64 " length %" PRIu64, flags, offset, length);
      s += buf;
      break;
    case Op::rename:
      snprintf(buf, sizeof buf, " %016" PRIx64 "/", parent);
      s += buf + name;
      snprintf(buf, sizeof buf, " -> %016" PRIx64 "/", parent2);
      s += buf + name2;
      if (flags) {
        snprintf(buf, sizeof buf, " flags %#x", flags);
        s += buf;
      }
      if (whiteout_fid != kInvalidFileId) {
        snprintf(buf, sizeof buf, " whiteout %016" PRIx64, whiteout_fid);
        s += buf;
      }
      break;
    case Op::create: case Op::mkdir: case Op::symlink: case Op::link: case Op::unlink: case Op::rmdir:
      snprintf(buf, sizeof buf, " in %016" PRIx64 " name ", parent);
      s += buf + name;
      break;
    case Op::setxattr: case Op::removexattr:
      s += " xattr " + name;
      break;
    default:
      break;
  }
  return s;
}

}  // namespace blockrepl
