// What a record may ask of a backing directory: the written policy for everything that arrives
// from the wire (records, full-copy entries, Merkle listings: all become records), checked in
// the one write path (Store::apply and Store::apply_replayed) before anything reaches the disk.
//
// What nobody may send, however authenticated (refused with EINVAL as malformed, EPERM where the
// record is well formed but asks for what is never allowed, EOPNOTSUPP for an xattr outside every
// namespace a blockrepl volume keeps):
//   - names that are not exactly one path component (empty, ".", "..", a '/' or a NUL, longer
//     than 255 bytes: valid_path_component);
//   - a created entry of any type but regular file, directory, symlink, fifo, socket, character
//     or block device, or whose type does not match its operation (create makes no directory or
//     symlink, mkdir only directories, symlink only symlinks);
//   - mode bits outside 07777 (besides the type bits), a device number on anything but a
//     character or block device, an owner of -1 (chown's "leave it": the entry would keep ours);
//   - a created entry without a file id, or with the volume root's;
//   - a symlink target that is empty, holds a NUL or is PATH_MAX or longer;
//   - xattr names in no namespace a volume keeps: only user.*, trusted.*, security.*,
//     system.posix_acl_access and system.posix_acl_default (EOPNOTSUPP, as a backing file system
//     answers a name it does not know); xattr names under trusted.blockrepl.*, the node's own
//     state (EPERM); xattr values over 64 KiB and unknown setxattr flags;
//   - offsets past what off_t holds, unknown rename, fallocate or setattr bits. (The length of
//     a write, like every field's, is bounded where a peer's message is decoded: wire.h.)
//
// What a trusted (authenticated, or chosen with --insecure) master may send: device nodes,
// set-user-id and set-group-id bits, trusted.* and security.* xattrs (file capabilities
// included), any owner, any mode on the volume root, symlinks to anywhere. A replica is a
// faithful copy of what root on its master made. That is safe because the replica's mount is
// nosuid,nodev (nothing set-id runs, no device opens through it), because its backing directory
// must lie under a root-only directory (blockrepl mount --master and pull refuse it otherwise:
// no unprivileged user reaches the files there), and because the Store never follows a symlink
// from a record (file ids and *at() calls beneath the volume root, O_NOFOLLOW).
//
// A master applies its own FUSE requests through the same Store, so it can never publish a
// record its replicas would refuse.
#pragma once
#include <string>
#include <string_view>

#include "blockrepl/record.h"

namespace blockrepl {

// Returns 0 if `rec` is allowed, or the errno it is refused with; *reason (if given) then says
// why in a few words ("mode bits outside 07777"), for the log line that names the record.
int check_record(const Record& rec, std::string* reason = nullptr);

}  // namespace blockrepl
