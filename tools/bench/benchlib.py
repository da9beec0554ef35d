"""What the benchmark scripts (tools/bench/run, tools/bench/reattach) share: running commands
without hanging on daemonizing children, FUSE mounts and `blockrepl mount/umount/status`,
the run header, Ctrl-C/SIGTERM handling, the common options and table cells.
Standard library only, like the scripts.
"""

import contextlib
import datetime
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
REPO_ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
DEFAULT_BLOCKREPL = os.environ.get("BLOCKREPL", os.path.join(REPO_ROOT, "build", "bin", "blockrepl"))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A figure could not be measured; the message is the reason."""


class Interrupted(BaseException):
    """Raised by the SIGTERM/SIGHUP handler so that finally blocks run."""


class Ctx:
    """The run's settings and what cleanup must visit; the scripts set its attributes."""


# ---------------------------------------------------------------------------
# Text

def fmt_size(n):
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n % unit == 0:
            return "%d%s" % (n // unit, name)
    return "%dB" % n


def tail(text, n=3):
    """The last n non-empty lines of a command's output, on one line (for error messages)."""
    lines = [l.strip() for l in (text or "").strip().splitlines() if l.strip()]
    return " | ".join(lines[-n:]) if lines else ""


def mark_partial(cell, measured, reps):
    """A median over fewer runs than --reps carries a '*', so it is not read as a full one."""
    return cell + "*" if measured < reps else cell


def aligned(cells, widths):
    """One table line: each cell left-aligned in its column's width."""
    return "".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()


# ---------------------------------------------------------------------------
# Commands

def run_cmd(cmd, timeout, cwd=None, env=None, pass_fds=()):
    """Run cmd with stdout/stderr going to temporary files (never pipes: a daemonizing
    child that keeps its inherited stdio open must not make us wait forever).
    pass_fds: descriptors the child inherits (subprocess closes all others).
    Returns (returncode, stdout, stderr); returncode None means timeout.
    The child gets its own process group, which is killed as a whole on timeout or
    interrupt, so nothing it started keeps running behind our back."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=cwd, env=env,
                                 start_new_session=True, pass_fds=tuple(pass_fds))
        except OSError as e:
            return 127, "", "%s: %s" % (cmd[0], e)

        def kill_group():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group()
            rc = None
        except BaseException:
            kill_group()
            raise
        out.seek(0)
        err.seek(0)
        return rc, out.read().decode(errors="replace"), err.read().decode(errors="replace")


def wait_until(condition, timeout, interval):
    """Polls condition() until it holds or timeout seconds passed (0: checks once); its last answer."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def git_revision(unknown="unknown"):
    """Short HEAD of the repository, '+dirty' if tracked files changed; `unknown` if git cannot say."""
    try:
        rc, out, _ = run_cmd(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], timeout=30)
        if rc != 0:
            return unknown
        rev = out.strip()
        rc, out, _ = run_cmd(["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"], timeout=30)
        if rc == 0 and out.strip():
            rev += "+dirty"
        return rev
    except Exception:
        return unknown


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


# ---------------------------------------------------------------------------
# Mounts

def _unescape_mount(s):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def is_mounted(path):
    """True if path is a mount point per /proc/self/mounts (also a dead FUSE mount
    whose daemon is gone, which os.path.ismount would miss)."""
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and _unescape_mount(fields[1]) == path:
                    return True
    except OSError:
        pass
    return False


def fs_of(path):
    """(fstype, source) of the filesystem holding path."""
    path = os.path.realpath(path)
    best = ("?", "?", "")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mp = _unescape_mount(fields[1])
                if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best[2]):
                    best = (fields[2], fields[0], mp)
    except OSError:
        pass
    return best[0], best[1]


def is_executable(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def blockrepl_mount(binary, args, mnt, timeout, mounts):
    """Run `blockrepl mount ARGS MNT`; returns (wall seconds, what it printed).  mnt joins the
    list `mounts` before the command runs, so cleanup unmounts it even when this raises after
    the daemon mounted.  Raises BenchError with one line on failure."""
    if not is_executable(binary):
        raise BenchError("blockrepl binary not found at %s (build it, or pass --blockrepl / set BLOCKREPL)" % binary)
    if is_mounted(mnt):
        raise BenchError("%s is already a mount point" % mnt)
    cmd = [binary, "mount"] + args + [mnt]
    log("  $ " + " ".join(cmd))
    if mnt not in mounts:
        mounts.append(mnt)
    t0 = time.monotonic()
    rc, out, err = run_cmd(cmd, timeout=timeout)
    wall = time.monotonic() - t0
    if rc is None:
        raise BenchError("`blockrepl mount` did not return within %d s" % timeout)
    if rc != 0:
        raise BenchError("`blockrepl mount` exited %d: %s" % (rc, tail(err + out, 2) or "(no output)"))
    if not is_mounted(mnt):
        raise BenchError("`blockrepl mount` returned 0 but %s is not mounted" % mnt)
    try:
        os.stat(mnt)
    except OSError as e:
        raise BenchError("mount %s is not usable: %s" % (mnt, e.strerror))
    return wall, (err + out).strip()


def unmount(binary, mnt, announce=False):
    """Cleanup: blockrepl umount, then fusermount3 -u, then umount, then lazy.  True if gone.
    announce: log a line for every mount point unmounted."""
    if not is_mounted(mnt):
        return True
    attempts = []
    if is_executable(binary):
        attempts.append([binary, "umount", mnt])
    attempts += [["fusermount3", "-u", mnt], ["umount", mnt]]
    last = ""
    for i in range(3):                     # a process may still be closing its files: retry
        for cmd in attempts:
            rc, out, err = run_cmd(cmd, timeout=60)
            if wait_until(lambda: not is_mounted(mnt), 10 if rc == 0 else 0, 0.1):
                if announce:
                    log("  unmounted %s (%s)" % (mnt, " ".join(cmd[:2])))
                return True
            last = "%s: %s" % (" ".join(cmd[:2]), tail(err + out, 1) or "rc=%s" % rc)
        time.sleep(1 + 2 * i)
    run_cmd(["fusermount3", "-u", "-z", mnt], timeout=30)
    if not is_mounted(mnt):
        log("  WARNING: %s was busy; detached it lazily (%s)" % (mnt, last))
        return True
    log("  ERROR: could not unmount %s (%s); unmount it by hand" % (mnt, last))
    return False


def blockrepl_status(binary, mnt, timeout=60):
    """`blockrepl status MNT --json` as a dict; raises BenchError with the reason otherwise."""
    rc, out, err = run_cmd([binary, "status", mnt, "--json"], timeout=timeout)
    if rc != 0:
        raise BenchError("`blockrepl status %s --json` %s: %s"
                         % (mnt, "timed out" if rc is None else "exited %d" % rc, tail(err + out, 1)))
    try:
        st = json.loads(out)
    except ValueError:
        raise BenchError("`blockrepl status --json` did not print JSON: %s" % tail(out, 1))
    if not isinstance(st, dict):
        raise BenchError("`blockrepl status --json` did not print a JSON object")
    return st


# ---------------------------------------------------------------------------
# Runs

def run_header(title, reps, *details):
    """The first line of every report: what ran where, so figures can be compared later."""
    return "  ".join(["# %s" % title,
                      "date %s" % datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      "kernel %s" % platform.release(), "nproc %d" % (os.cpu_count() or 0),
                      "rev %s" % git_revision(), "reps %d" % reps] + list(details))


def warn_about_setup(fstype, reps):
    if fstype in ("tmpfs", "ramfs", "overlay"):
        log("WARNING: the workdir is on %s, not on a real disk; figures will not mean much" % fstype)
    if reps < 3:
        log("note: fewer than 3 repetitions; medians are not robust")


def add_common_args(ap, reps_help, json_help):
    ap.add_argument("--reps", type=int, default=3, help=reps_help)
    ap.add_argument("--json", metavar="FILE", help=json_help)
    ap.add_argument("--blockrepl", default=DEFAULT_BLOCKREPL,
                    help="blockrepl binary (default $BLOCKREPL or <repo>/build/bin/blockrepl)")


def check_common_args(ap, args):
    if args.reps < 1:
        ap.error("--reps must be at least 1")


def parse_list(value, allowed, what):
    """A comma list of names from `allowed`, in the given order without repeats; ValueError
    naming what is wrong (the caller decides how a script reports it)."""
    items = [x.strip() for x in value.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise ValueError("unknown %s %s (choose from %s)" % (what, ",".join(bad), ",".join(allowed)))
    seen = []
    for x in items:
        if x not in seen:
            seen.append(x)
    if not seen:
        raise ValueError("no %s selected" % what)
    return seen


TERMINATION_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raise_interrupted_on_termination():
    """SIGTERM and SIGHUP raise Interrupted (SIGINT already raises KeyboardInterrupt), so that
    a stopped run still unmounts and prints what it measured."""
    def on_signal(signum, frame):
        raise Interrupted("signal %d" % signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


@contextlib.contextmanager
def termination_signals_ignored():
    """Cleanup finishes even if Ctrl-C is pressed again; every step of it has a timeout."""
    old = [signal.signal(s, signal.SIG_IGN) for s in TERMINATION_SIGNALS]
    try:
        yield
    finally:
        for s, h in zip(TERMINATION_SIGNALS, old):
            signal.signal(s, h)


def measure_then_clean_up(measure, clean_up):
    """Runs measure(), then clean_up() whatever happened, with the termination signals ignored.
    Ctrl-C, SIGTERM or SIGHUP end measure() early; the run still reports what it measured.
    Returns (interrupted, what clean_up returned)."""
    interrupted = False
    try:
        measure()
    except (KeyboardInterrupt, Interrupted) as e:
        interrupted = True
        log("interrupted (%s); cleaning up" % (str(e) or "Ctrl-C"))
    finally:
        with termination_signals_ignored():
            cleaned_up = clean_up()
    return interrupted, cleaned_up
