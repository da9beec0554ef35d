#!/usr/bin/env python3
"""A rate-limited TCP relay: the stand-in for a WAN link between a blockrepl slave and its master
(tools/bench/run, targets sync-wan and sync-wan-zstd; this kernel has no netem).

    linkrelay.py --listen 127.0.0.1:PORT --connect 127.0.0.1:MASTERPORT --mbit 100 [--delay-ms D]
    linkrelay.py --selftest --mbit 100 [--delay-ms D]     # measure a raw transfer through a relay

Every connection accepted on the listening socket gets its own connection to --connect.  Each
direction of each connection is limited on its own to --mbit megabits per second (10^6 bit/s of
TCP payload) by a token bucket, and every byte is held back --delay-ms milliseconds (one way)
after it was read.  Standard library only.

What it models and what it does not: the relay ends TCP on both sides, so the endpoints see a
loopback TCP connection whose payload arrives at the link's rate and with its delay; it does not
model loss, reordering, or the TCP congestion control (slow start, cwnd) a real long-distance
connection would go through.

Per direction there are two threads: a reader that blocks in recv() and queues what it read with
the time it may leave (read time + delay), and a writer that blocks until the head of the queue
is due and the bucket holds enough tokens, then sends.  The queue holds at most the bytes the
link carries during the delay plus QUEUE_SLACK, so a sender faster than the link is held back by
TCP flow control and memory stays bounded.  Nothing polls: every wait is a blocking call, a
condition variable or a sleep computed from the bucket.  An EOF is passed on as a half-close
(shutdown(SHUT_WR)) once everything before it is sent; an error on either socket closes the whole
connection.  SIGTERM/SIGINT close the listening socket and every connection and exit 0; the relay
also exits when its parent process (the bench runner) is gone.
"""

import argparse
import collections
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

RECV_SIZE = 64 * 1024
SEND_PIECE = 16 * 1024        # at most this much leaves at once: 1.3 ms at 100 Mbit/s
BUCKET_BURST = 32 * 1024      # tokens the bucket holds at least...
BURST_SECONDS = 0.005         # ...or this long of the link: a writer that the scheduler held back
                              # for a few ms catches up instead of losing that time of the link
QUEUE_SLACK = 256 * 1024


def log(msg):
    print("linkrelay: %s" % msg, file=sys.stderr, flush=True)


def parse_addr(text):
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("want HOST:PORT, got %r" % text)
    return host, int(port)


class TokenBucket:
    """rate bytes/s, at most `burst` bytes at once; take(n) sleeps until n bytes may leave."""

    def __init__(self, rate, burst):
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = self.burst
        self.last = time.monotonic()

    def take(self, n):
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens < 0:
            # In debt: wait until the link has carried these bytes.  The refill on the next call
            # counts the sleep, which brings the tokens back to about zero.
            time.sleep(-self.tokens / self.rate)


class Direction:
    """One direction of one relayed connection: src -> dst through the bucket and the delay."""

    def __init__(self, conn, src, dst, name):
        self.conn = conn
        self.src, self.dst = src, dst
        self.name = name
        self.bucket = TokenBucket(conn.rate, max(BUCKET_BURST, conn.rate * BURST_SECONDS))
        self.queue = collections.deque()        # (due monotonic time, bytes)
        self.queued = 0
        self.limit = int(conn.rate * conn.delay) + QUEUE_SLACK
        self.cond = threading.Condition()
        self.eof = False
        self.aborted = False
        self.bytes = 0                          # bytes sent on, for the closing log line
        self.finished = threading.Event()       # the writer is done (half-closed or aborted)

    def abort(self):
        with self.cond:
            self.aborted = True
            self.cond.notify_all()

    def reader(self):
        try:
            while True:
                data = self.src.recv(RECV_SIZE)
                with self.cond:
                    if not data:
                        self.eof = True
                        self.cond.notify_all()
                        return
                    while self.queued >= self.limit and not self.aborted:
                        self.cond.wait()
                    if self.aborted:
                        return
                    self.queue.append((time.monotonic() + self.conn.delay, data))
                    self.queued += len(data)
                    self.cond.notify_all()
        except OSError as e:
            self.conn.fail("%s: recv: %s" % (self.name, e))

    def writer(self):
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.eof and not self.aborted:
                        self.cond.wait()
                    if self.aborted:
                        return
                    if not self.queue:              # EOF and everything before it sent
                        try:
                            self.dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        return
                    due, data = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                for i in range(0, len(data), SEND_PIECE):
                    piece = data[i:i + SEND_PIECE]
                    self.bucket.take(len(piece))
                    self.dst.sendall(piece)
                self.bytes += len(data)
                with self.cond:
                    self.queue.popleft()
                    self.queued -= len(data)
                    self.cond.notify_all()
        except OSError as e:
            self.conn.fail("%s: send: %s" % (self.name, e))
        finally:
            self.finished.set()


class Connection:
    """A client socket and its upstream socket, relayed both ways."""

    def __init__(self, relay, client, upstream, peer):
        self.relay = relay
        self.rate, self.delay = relay.rate, relay.delay
        self.client, self.upstream = client, upstream
        self.peer = peer
        self.failed = None
        self.lock = threading.Lock()
        self.dirs = [Direction(self, client, upstream, "%s -> upstream" % peer),
                     Direction(self, upstream, client, "upstream -> %s" % peer)]

    def start(self):
        for d in self.dirs:
            for fn in (d.reader, d.writer):
                threading.Thread(target=fn, daemon=True).start()
        threading.Thread(target=self.closer, daemon=True).start()

    def fail(self, why):
        """An error on either socket ends both directions; the sockets' shutdown wakes blocked recvs."""
        with self.lock:
            if self.failed is None:
                self.failed = why
        for d in self.dirs:
            d.abort()
        self.shutdown()

    def shutdown(self):
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def closer(self):
        for d in self.dirs:
            d.finished.wait()
        self.shutdown()
        for s in (self.client, self.upstream):
            if self.failed:
                # An error on one side reaches the other as a reset, not as an orderly end.
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            s.close()
        self.relay.forget(self)
        log("connection from %s closed: %d bytes to upstream, %d back%s"
            % (self.peer, self.dirs[0].bytes, self.dirs[1].bytes,
               " (%s)" % self.failed if self.failed else ""))


class Relay:
    def __init__(self, listener, upstream_addr, mbit, delay_ms):
        self.listener = listener
        self.upstream_addr = upstream_addr
        self.rate = mbit * 1e6 / 8.0
        self.delay = delay_ms / 1000.0
        self.conns = set()
        self.lock = threading.Lock()

    def forget(self, conn):
        with self.lock:
            self.conns.discard(conn)

    def serve(self):
        while True:
            client, addr = self.listener.accept()
            peer = "%s:%d" % addr[:2]
            try:
                upstream = socket.create_connection(self.upstream_addr, timeout=10)
                upstream.settimeout(None)
            except OSError as e:
                log("connection from %s: cannot reach upstream %s:%d: %s" % ((peer,) + self.upstream_addr + (e,)))
                client.close()
                continue
            for s in (client, upstream):
                # The relay must not add Nagle's delay to small messages (acks, barriers).
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, client, upstream, peer)
            with self.lock:
                self.conns.add(conn)
            conn.start()

    def close(self):
        try:
            self.listener.close()
        except OSError:
            pass
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            c.fail("relay stopped")


def watch_parent(parent):
    """Exit when the process that started us is gone (a runner killed with SIGKILL)."""
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)


def serve_main(args):
    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(parse_addr(args.listen))
        listener.listen(16)
    relay = Relay(listener, parse_addr(args.connect), args.mbit, args.delay_ms)

    def on_signal(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=watch_parent, args=(os.getppid(),), daemon=True).start()
    log("relaying %s:%d -> %s, %g Mbit/s each way, %g ms one-way delay"
        % (listener.getsockname()[:2] + (args.connect, args.mbit, args.delay_ms)))
    try:
        relay.serve()
    finally:
        relay.close()
    return 0


# ---------------------------------------------------------------------------
# Self-test: a raw transfer through a real relay process.

def start_relay(upstream_port, mbit, delay_ms, log_file=None):
    """Starts this script as a relay to 127.0.0.1:upstream_port on a listening socket made here
    (so the port is known and bound before the child runs); returns (Popen, port)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        cmd = [sys.executable, os.path.abspath(__file__), "--listen-fd", str(listener.fileno()),
               "--connect", "127.0.0.1:%d" % upstream_port, "--mbit", str(mbit), "--delay-ms", str(delay_ms)]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=log_file if log_file is not None else subprocess.DEVNULL,
                             pass_fds=(listener.fileno(),), start_new_session=True)
        return p, port
    finally:
        listener.close()


def stop_relay(p):
    """SIGTERM, then SIGKILL if it does not exit within 10 s; its exit code (None if unknown)."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
    return p.returncode


def _drain(sock, out):
    """Receives until EOF; out = (bytes, seconds from the first byte to the last)."""
    n, first, last = 0, None, None
    while True:
        data = sock.recv(RECV_SIZE)
        if not data:
            break
        now = time.monotonic()
        first = first or now
        last = now
        n += len(data)
    out.append((n, (last - first) if first else 0.0))


def selftest(mbit, delay_ms, seconds=2.0):
    """Both directions at once for about `seconds`, then ping-pong of 64-byte messages.
    Returns {"up_mbit", "down_mbit", "rtt_ms_median", "rtt_ms_max", "clean_exit"}; raises
    RuntimeError on a wrong byte count."""
    size = int(mbit * 1e6 / 8 * seconds)
    sink = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sink.bind(("127.0.0.1", 0))
    sink.listen(4)
    p, port = start_relay(sink.getsockname()[1], mbit, delay_ms)
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=60)
        server, _ = sink.accept()
        server.settimeout(60)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up, down = [], []
        threads = [threading.Thread(target=_drain, args=(server, up)),
                   threading.Thread(target=_drain, args=(client, down))]
        for t in threads:
            t.start()
        block = os.urandom(RECV_SIZE)

        def send_all(sock):
            left = size
            while left:
                n = sock.send(block[:min(left, len(block))])
                left -= n
            sock.shutdown(socket.SHUT_WR)

        senders = [threading.Thread(target=send_all, args=(s,)) for s in (client, server)]
        for t in senders:
            t.start()
        for t in senders + threads:
            t.join()
        client.close()
        server.close()
        if up[0][0] != size or down[0][0] != size:
            raise RuntimeError("sent %d bytes each way, received %d and %d" % (size, up[0][0], down[0][0]))
        # Round trips of a small message: 2 x delay plus the serialization of 64 bytes twice.
        client = socket.create_connection(("127.0.0.1", port), timeout=60)
        server, _ = sink.accept()
        server.settimeout(60)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        msg = b"x" * 64
        for _ in range(20):
            t0 = time.monotonic()
            client.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += server.recv(len(msg) - len(got))
            server.sendall(got)
            got = b""
            while len(got) < len(msg):
                got += client.recv(len(msg) - len(got))
            rtts.append((time.monotonic() - t0) * 1000)
        client.close()
        server.close()
    finally:
        rc = stop_relay(p)
        sink.close()
    rate = lambda r: r[0] * 8 / r[1] / 1e6 if r[1] > 0 else float("inf")
    return {"up_mbit": rate(up[0]), "down_mbit": rate(down[0]), "bytes_each_way": size,
            "rtt_ms_median": statistics.median(rtts), "rtt_ms_max": max(rtts), "clean_exit": rc == 0}


def main():
    ap = argparse.ArgumentParser(prog="linkrelay.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", metavar="HOST:PORT", help="where the slave connects")
    ap.add_argument("--listen-fd", type=int, metavar="FD", help="an inherited listening socket instead of --listen")
    ap.add_argument("--connect", metavar="HOST:PORT", help="the master's address")
    ap.add_argument("--mbit", type=float, default=100.0, help="each direction's rate in Mbit/s (default 100)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in ms (default 0)")
    ap.add_argument("--selftest", action="store_true",
                    help="measure a raw transfer both ways and small round trips through a relay, then exit")
    args = ap.parse_args()
    if args.mbit <= 0:
        ap.error("--mbit must be positive")
    if args.delay_ms < 0:
        ap.error("--delay-ms must not be negative")
    if args.selftest:
        r = selftest(args.mbit, args.delay_ms)
        print("limit %g Mbit/s, %g ms one way: measured %.1f Mbit/s up, %.1f Mbit/s down (%d bytes each way, "
              "at the same time); 64-byte round trip median %.2f ms, max %.2f ms; relay exit %s"
              % (args.mbit, args.delay_ms, r["up_mbit"], r["down_mbit"], r["bytes_each_way"],
                 r["rtt_ms_median"], r["rtt_ms_max"], "clean" if r["clean_exit"] else "NOT clean"))
        return 0
    if (args.listen is None) == (args.listen_fd is None) or not args.connect:
        ap.error("give --connect and one of --listen / --listen-fd (or --selftest)")
    try:
        parse_addr(args.connect)
        if args.listen:
            parse_addr(args.listen)
    except ValueError as e:
        ap.error(str(e))
    return serve_main(args)


if __name__ == "__main__":
    sys.exit(main())
