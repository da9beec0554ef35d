@0xc3a1f0e6b2d49a71;
using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("blockrepl::wire");
# blockrepl wire protocol, version 5: 2 added the `release` record; 3 added directory time stamps
# on namespace records, the listed directory's mtime in dirListing, and hello.resync; 4 added
# authentication (authHello, authChallenge, authProof) and TLS; 5 added compression of the
# record stream (hello.codecs/compress/compressLevel, welcome.codec/codecLevel, compressedBatch).
#
# Transport: TCP, or TLS 1.3 over TCP when both ends have --tls-cert/--tls-key/--tls-ca (each
# verifies the other's certificate against its CA; the downstream node checks the upstream's
# host name). Each message is one frame: a 4-byte little-endian length N followed by N bytes
# holding one Cap'n Proto message (flat array, unpacked) whose root is `Message`. A receiver
# refuses frames larger than its limit and decodes with a traversal limit; it holds a frame in a
# buffer that grows as the bytes arrive (never the announced length up front), so a broken or
# hostile peer costs at most what it sent of one frame. Any violation drops the connection.
#
# Limits (blockrepl/wire.h, blockrepl/upstream.h):
#   before the hello is accepted: frames at most 64 KiB; the TLS handshake, the authentication
#     and the hello must be through within 10 s of the connection; at most 64 connections wait
#     for their handshake (the one that waited longest is closed for a newcomer), and they cost
#     the master no thread.
#   after: frames up to 64 MiB.
#   fields: node, cluster and lineage ids 255 bytes; listen address 255; hash algorithm 32;
#     lineage 4096 entries; names (entries, xattrs) 255 per component; paths and link targets
#     4096; xattr values 64 KiB; a record's data 16 MiB (write), 4096 (symlink), 64 KiB
#     (setxattr), none otherwise; copy chunks 16 MiB; error reasons and welcome notices 4096.
#   A hello over a limit is refused without an answer; other messages over a limit end the
#   connection. The receiver logs one line naming the peer and the field.
#
# Conversation (the downstream node, a slave or `pull`, opens the connection):
#   authentication, when the nodes have a --secret-file (the upstream node refuses a hello that
#   did not come after it; a downstream node with a secret refuses an upstream one without):
#   slave  -> master  authHello     protocol version and a fresh random 32-byte nonce
#   master -> slave   authChallenge a fresh random 32-byte nonce of its own
#   slave  -> master  authProof     the cluster id it belongs to ("" if none yet) and
#                                   HMAC-SHA256(secret, proof input "slave")
#   master -> slave   authProof     its cluster id and HMAC-SHA256(secret, proof input "master"),
#                     | error       or refused ("authentication failed"); nothing else before
#   The proof input (blockrepl/auth.h): "blockrepl-auth-v1", the role, both nonces, both cluster
#   ids (the slave's claim, and for the master's proof its own), and with TLS 32 bytes of the TLS
#   session's keying material (exporter label "EXPORTER-blockrepl-auth"), so that a proof is
#   worth nothing on another connection, in another cluster or through a relay.
#   slave  -> master  hello        who I am, what I hold (cluster, node, block size, hash,
#                                  lineage, last durable LSN), what ack level I want
#   master -> slave   welcome      accepted: the attach method and where the stream starts
#                     | error      refused: a reason the slave prints (cluster mismatch, ...)
#   full copy (method "full"):
#   master -> slave   copyEntry*   every file and directory with its metadata and data chunks,
#                     copyDone     then the LSN from which the copy is exact once the records
#                                  that follow (from welcome.startLsn on) are applied
#   Merkle diff (method "merkle"; the slave drives it, one question at a time):
#   slave  -> master  dirQuery     directories whose namespace hash differs from ours
#   master -> slave   dirListing*  one per directory asked: its entries, each with the hash of
#                                  its content (file: root of its block hash tree; directory: of
#                                  its own listing), then dirListingsDone
#   slave  -> master  hashQuery    for files that differ: tree nodes at one level
#   master -> slave   hashAnswer   their hashes (level by level, from the top: log n round trips)
#   slave  -> master  blockRequest blocks (or whole files) that differ
#   master -> slave   blockData*   their contents, then blockDataDone
#   slave  -> master  diffDone
#   master -> slave   merkleDone   the LSN from which the diff is exact once the records that
#                                  follow (from welcome.startLsn on) are applied
#   verify (hello.purpose = verify) uses the same questions and ends with diffDone; no stream.
#   then, forever:
#   master -> slave   batch        records in LSN order (a barrier is an `fsync` record)
#                     | compressedBatch  the same batch message, compressed with the welcome's
#                                  codec (only when the welcome named one; mixed with plain
#                                  batches: small or incompressible ones go plain)
#                     heartbeat    when idle, so a dead master is noticed
#   slave  -> master  ack          received LSN (in memory) and durable LSN (fsynced)
#   either            error        why the sender is closing the connection
#
# Acknowledgements carry both LSNs so the master can answer `recv` and `sync` barriers and report
# STORED (durable on the master) versus PROPAGATED (durable on the slave) separately.

# The one protocol version constant (blockrepl/wire.h takes it from here): nodes of different
# versions refuse each other with a clear message.
const protocolVersion :UInt32 = 5;

# The block hash both ends must use (hello.hashAlgorithm): XXH3-128 of each --block-size block.
const hashAlgorithm :Text = "xxh3-128";

enum AckLevel {
  async @0;   # barriers never wait for this slave
  recv @1;    # barriers wait until this slave has received the records
  sync @2;    # barriers wait until this slave has made the records durable
}

enum AttachMethod {
  full @0;     # empty slave: full copy, then stream
  stream @1;   # slave's (lineage, LSN) is on the master's history and in its journal
  merkle @2;   # hash-tree comparison (fast re-attach)
}

struct LineageEntry {
  id @0 :Text;        # lineage (history) id
  firstLsn @1 :UInt64;  # the first LSN written under this id
}

struct Hello {
  protocolVersion @0 :UInt32;
  clusterId @1 :Text;        # empty for an empty slave that has never attached
  nodeId @2 :Text;
  blockSize @3 :UInt32;
  hashAlgorithm @4 :Text;    # "xxh3-128"
  lineage @5 :List(LineageEntry);
  durableLsn @6 :UInt64;     # last LSN durable on the slave (0 if empty)
  ackLevel @7 :AckLevel;
  empty @8 :Bool;            # the slave holds no data (may take a full copy)
  listenAddress @9 :Text;    # where this slave serves its own slaves ("" if it does not)
  purpose @10 :Purpose;      # attach (and stream), or only compare trees (verify)
  deep @11 :Bool;            # verify: rehash the data on both sides first
  discardMyData @12 :Bool;   # a diverged node agrees to be rewritten to the master's state
  resync @13 :Bool;          # the slave cannot go on from its LSN (its disk filled while applying
                             # a record): take the Merkle diff, which frees space before it needs more
  codecs @14 :List(Codec);   # the codecs of compressedBatch this slave decodes (at most 16 entries)
  compress @15 :Codec;       # none, or the codec it asks the master to use (its link is slow)
  compressLevel @16 :Int32;  # the level it asks for with it (0: the master's default)
}

# How a compressedBatch's bytes are compressed (blockrepl/batch_codec.h).
enum Codec {
  none @0;
  zstd @1;    # one zstd frame holding the content size (levels 1..19)
}

enum Purpose {
  attach @0;
  verify @1;
}

struct Welcome {
  protocolVersion @0 :UInt32;
  clusterId @1 :Text;
  nodeId @2 :Text;
  blockSize @3 :UInt32;
  lineage @4 :List(LineageEntry);
  method @5 :AttachMethod;
  startLsn @6 :UInt64;       # records that follow start after this LSN
  lastLsn @7 :UInt64;        # the master's last LSN now: a re-attaching slave may already hold
                             # some of the records up to here, and applies them tolerantly
  ackLevel @8 :AckLevel;     # what the master will wait for from this slave
  notice @9 :Text;           # something the slave should tell its operator ("" if nothing)
  codec @10 :Codec;          # what this session's compressedBatch messages hold (none: none come);
                             # the master runs --compress, or the slave asked, and it can decode it
  codecLevel @11 :Int32;     # the level the master compresses at (for the slave's status)
}

# One change. Field meanings follow blockrepl/record.h.
struct Record {
  lsn @0 :UInt64;
  op @1 :UInt8;
  fid @2 :UInt64;
  parent @3 :UInt64;
  parent2 @4 :UInt64;
  name @5 :Data;
  name2 @6 :Data;
  offset @7 :UInt64;
  length @8 :UInt64;
  mode @9 :UInt32;
  flags @10 :UInt32;
  uid @11 :UInt32;
  gid @12 :UInt32;
  attrValid @13 :UInt32;
  rdev @14 :UInt64;
  atimeSec @15 :Int64;
  atimeNsec @16 :Int64;
  mtimeSec @17 :Int64;
  mtimeNsec @18 :Int64;
  data @19 :Data;
  # Rename with RENAME_WHITEOUT: the file id of the whiteout it leaves at the source name.
  whiteoutFid @20 :UInt64;
  # With attrValid's kAttrStampDirs (namespace records): the mtimes the change left on the parent
  # directory (dirMtime) and on the rename target's directory (dir2Mtime) on the master.
  dirMtimeSec @21 :Int64;
  dirMtimeNsec @22 :Int64;
  dir2MtimeSec @23 :Int64;
  dir2MtimeNsec @24 :Int64;
}

struct Batch {
  records @0 :List(Record);
}

# A batch, compressed (blockrepl/batch_codec.h, batch codec format 1): `data` decompresses to
# exactly uncompressedSize bytes, which are one Cap'n Proto message in flat-array form whose root
# is a Message holding a `batch` (what the master would have sent plain, without the length
# prefix). uncompressedSize is at most the receiver's frame limit (64 MiB) and a multiple of 8;
# the zstd frame announces the same content size. Anything else drops the connection.
struct CompressedBatch {
  codec @0 :Codec;              # the welcome's
  uncompressedSize @1 :UInt64;
  data @2 :Data;
}

struct Ack {
  receivedLsn @0 :UInt64;
  durableLsn @1 :UInt64;
}

struct Heartbeat {
  lsn @0 :UInt64;    # sender's last LSN
  lineage @1 :List(LineageEntry);  # sender's history, when it changed (a promotion upstream)
}

struct Xattr {
  name @0 :Text;
  value @1 :Data;
}

# One entry of a full copy. Directories come before what they contain.
struct CopyEntry {
  path @0 :Data;       # relative to the volume root, '/'-separated, no "..", no leading '/'
  fid @1 :UInt64;
  mode @2 :UInt32;     # with type bits
  uid @3 :UInt32;
  gid @4 :UInt32;
  size @5 :UInt64;
  rdev @6 :UInt64;
  atimeSec @7 :Int64;
  atimeNsec @8 :Int64;
  mtimeSec @9 :Int64;
  mtimeNsec @10 :Int64;
  linkTarget @11 :Data;
  xattrs @12 :List(Xattr);
  hardLinkOf @13 :Data;   # non-empty: another path of the same file, already sent
  chunkOffset @14 :UInt64;
  chunk @15 :Data;        # file data at chunkOffset (entries may repeat with further chunks)
  more @16 :Bool;         # more chunks of this file follow
}

struct CopyDone {
  lsn @0 :UInt64;         # the copy reflects at least every record up to here
  files @1 :UInt64;
  bytes @2 :UInt64;
  rootMtimeSec @3 :Int64;  # the volume root's mtime (no entry carries it)
  rootMtimeNsec @4 :Int64;
}

# One directory entry with what the Merkle diff compares (directories' sizes are not compared:
# they depend on each file system's history; their mtimes are, as replicas copy them).
struct NsEntry {
  name @0 :Data;
  fid @1 :UInt64;
  mode @2 :UInt32;        # with type bits
  uid @3 :UInt32;
  gid @4 :UInt32;
  size @5 :UInt64;
  rdev @6 :UInt64;
  mtimeSec @7 :Int64;
  mtimeNsec @8 :Int64;
  linkTarget @9 :Data;
  xattrs @10 :List(Xattr);
  hash @11 :Data;         # 16 bytes: the entry's namespace hash (metadata and content)
  content @12 :Data;      # 16 bytes: regular file: root of its block hash tree; directory: hash
                          # of its listing; otherwise empty
}

struct DirQuery {
  paths @0 :List(Data);   # directories, relative to the volume root ("" is the root)
}

struct DirListing {
  path @0 :Data;
  fid @1 :UInt64;
  exists @2 :Bool;        # false: the master has no directory there (any more)
  entries @3 :List(NsEntry);
  mtimeSec @4 :Int64;     # the listed directory's own mtime (the root's is compared from here)
  mtimeNsec @5 :Int64;
}

struct HashQueryItem {
  fid @0 :UInt64;
  level @1 :UInt32;
  indices @2 :List(UInt64);
}

struct HashQuery {
  items @0 :List(HashQueryItem);
}

struct HashAnswerItem {
  fid @0 :UInt64;
  size @1 :UInt64;        # the file's size on the master now
  hashes @2 :Data;        # 16 bytes per index asked (all zero where the master has no node)
}

struct HashAnswer {
  items @0 :List(HashAnswerItem);
}

struct BlockRequestItem {
  fid @0 :UInt64;
  blocks @1 :List(UInt64);  # block indices; empty with whole = true: every data region
  whole @2 :Bool;
}

struct BlockRequest {
  items @0 :List(BlockRequestItem);
}

struct BlockData {
  fid @0 :UInt64;
  offset @1 :UInt64;
  data @2 :Data;          # may be shorter than a block at the end of the file
  zeros @3 :UInt64;       # instead of data: this many bytes read as zeros (a hole on the slave)
}

struct MerkleDone {
  lsn @0 :UInt64;         # the diff reflects at least every record up to here
}

struct ErrorMessage {
  reason @0 :Text;        # one line, printed by the other side
  fatal @1 :Bool;         # true: do not retry without operator action (mismatch, refused)
}

struct Message {
  union {
    hello @0 :Hello;
    welcome @1 :Welcome;
    batch @2 :Batch;
    ack @3 :Ack;
    heartbeat @4 :Heartbeat;
    copyEntry @5 :CopyEntry;
    copyDone @6 :CopyDone;
    error @7 :ErrorMessage;
    dirQuery @8 :DirQuery;
    dirListing @9 :DirListing;
    dirListingsDone @10 :Void;
    hashQuery @11 :HashQuery;
    hashAnswer @12 :HashAnswer;
    blockRequest @13 :BlockRequest;
    blockData @14 :BlockData;
    blockDataDone @15 :Void;
    diffDone @16 :Void;
    merkleDone @17 :MerkleDone;
    authHello @18 :AuthHello;
    authChallenge @19 :AuthChallenge;
    authProof @20 :AuthProof;
    compressedBatch @21 :CompressedBatch;
  }
}

# Authentication (see the conversation above). Nonces are exactly 32 bytes, MACs exactly 32.
struct AuthHello {
  protocolVersion @0 :UInt32;
  nonce @1 :Data;
}

struct AuthChallenge {
  nonce @0 :Data;
}

struct AuthProof {
  clusterId @0 :Text;
  mac @1 :Data;
}
