@0xc3a1f0e6b2d49a71;
# blockrepl wire protocol (filled in by the streaming-replication work).
struct Placeholder { version @0 :UInt32; }
