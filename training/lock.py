"""One training process per model_dir: the lock file ``model_dir/.lock``.

The file is created atomically (``O_CREAT | O_EXCL``) and holds JSON: ``pid``, ``host``, ``boot``
(Linux boot id), ``start`` (the process start time in clock ticks after boot, from
``/proc/<pid>/stat``), ``since`` (Unix seconds) and a random ``token``. A second run finds the file
and stops with exit code LOCKED and a message naming the holder. A lock left by a run that died
(kill -9, power loss) is stale when its host is this host and its PID is not alive, or is alive but
is another process (reused PID: other start time, or another boot): it is taken over with a
warning. A lock from another host cannot be checked and is never taken over. The lock is released
at exit (atexit, so also after an exception or sys.exit), never when another process holds it.

train.py takes it for training; ``--projector_only`` only reads checkpoints and rewrites the
projector files, so it runs without it (it can refresh the projector while a run trains).

A multi-worker job (training/distribute.py) is one run: its chief takes the lock and records the
job's fingerprint in it (``job``); the other workers take no lock, they only check with
:func:`check_shared` that the lock, if any, is their own job's (another live run's: LockedError).
"""
import atexit
import json
import os
import socket
import time
import uuid

from absl import logging

from exit_codes import LOCKED, USAGE, CliError

LOCK_NAME = ".lock"
_FRESH_SECONDS = 10.0  # an empty/unreadable lock younger than this may be a writer mid-way


class LockedError(CliError):
    """model_dir is in use by another process (exit code LOCKED)."""

    def __init__(self, message):
        super().__init__(message, LOCKED)


def _boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_ticks(pid):
    """Start time of process ``pid`` in clock ticks after boot (Linux), or None."""
    try:
        with open(f"/proc/{int(pid)}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _describe(holder):
    since = holder.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    return f"PID {holder.get('pid')} on host {holder.get('host')}{when}"


def is_stale(holder):
    """True when the process that wrote ``holder`` (the lock's JSON) is certainly gone."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return True  # our own PID cannot be another live holder: a reused PID
    boot = _boot_id()
    if boot and holder.get("boot") and holder["boot"] != boot:
        return True  # written before a reboot
    if not _pid_alive(pid):
        return True
    start = holder.get("start")
    return start is not None and _start_ticks(pid) not in (None, start)  # PID reused


class ModelDirLock:
    """``model_dir/.lock``; :meth:`acquire` raises :class:`LockedError` when it is held."""

    def __init__(self, model_dir, job=None):
        self.model_dir = os.fspath(model_dir)
        self.path = os.path.join(self.model_dir, LOCK_NAME)
        self.job = job  # a multi-worker job's fingerprint (its other workers share the dir)
        self.token = None
        self.pid = None

    def _record(self):
        record = {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(),
                  "start": _start_ticks(os.getpid()), "since": time.time(),
                  "token": uuid.uuid4().hex}
        if self.job is not None:
            record["job"] = self.job
        return record

    def _try_create(self):
        record = self._record()
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise CliError(f"cannot create the lock file {self.path}: {exc.strerror}; is "
                           f"--model_dir writable?", USAGE) from exc
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        self.token, self.pid = record["token"], record["pid"]
        return True

    def _read(self, path=None):
        """(holder dict or None when unreadable, raw text); raw None when the file is gone."""
        try:
            with open(path or self.path, encoding="utf-8") as f:
                raw = f.read()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(raw)
            ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int)
            return (holder if ok else None), raw
        except ValueError:
            return None, raw

    def _take_over(self, raw):
        """Remove the stale lock whose content is ``raw``, unless another process replaced it in
        the meantime (then it is put back). Returns True when it was removed."""
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # another process took it over first
        _, moved = self._read(aside)
        if moved == raw:
            os.remove(aside)
            return True
        try:  # we moved a live lock written meanwhile: restore it without clobbering
            os.link(aside, self.path)
        except OSError:
            pass
        os.remove(aside)
        return False

    def acquire(self, attempts=5):
        """Create the lock or raise LockedError naming the holder. Registers release at exit.

        ``attempts``: stale locks taken over before giving up (other runs racing for it).
        """
        os.makedirs(self.model_dir, exist_ok=True)
        deadline = time.monotonic() + 3 * _FRESH_SECONDS
        while attempts > 0 and time.monotonic() < deadline:
            if self._try_create():
                atexit.register(self.release)
                return self
            holder, raw = self._read()
            if raw is None:
                continue  # released meanwhile
            if holder is None:
                try:
                    age = time.time() - os.path.getmtime(self.path)
                except OSError:
                    continue
                if age < _FRESH_SECONDS:
                    time.sleep(0.2)  # its writer may be mid-way (or was killed there)
                    continue
                logging.warning("%s is unreadable and %.0f s old: taking it over", self.path, age)
                attempts -= 1
                self._take_over(raw)
                continue
            if not is_stale(holder):
                raise LockedError(
                    f"{self.model_dir} is in use by another run ({_describe(holder)}); wait for "
                    f"it to finish or use another --model_dir (if that process is gone, delete "
                    f"{self.path})")
            logging.warning("taking over the stale lock %s of %s, which is no longer running",
                            self.path, _describe(holder))
            attempts -= 1
            self._take_over(raw)
        holder, _ = self._read()
        raise LockedError(f"could not lock {self.model_dir}: other runs keep taking it "
                          f"({_describe(holder or {})})")

    def release(self):
        """Remove the lock if this process holds it (idempotent)."""
        if self.token is None or os.getpid() != self.pid:
            return  # not held, or a forked child that inherited the object
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.token = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


_HELD = {}  # realpath of a model_dir -> the ModelDirLock this process holds on it


def lock_model_dir(model_dir, job=None):
    """Acquire and return the lock of ``model_dir`` (released at exit); a second call in the same
    process returns the lock it already holds. ``job``: a multi-worker job's fingerprint
    (distribute.Cluster.job_id), recorded so that the job's other workers may share the dir."""
    key = os.path.realpath(os.fspath(model_dir))
    held = _HELD.get(key)
    if held is not None and held.token is not None and held.pid == os.getpid():
        return held
    _HELD[key] = ModelDirLock(model_dir, job=job).acquire()
    return _HELD[key]


def check_shared(model_dir, job):
    """For a non-chief worker of the multi-worker job ``job``, which takes no lock: raise
    LockedError when ``model_dir`` is locked by a live run that is not this job (a lock of a dead
    run, or none yet, is fine: this job's chief takes it)."""
    holder, raw = ModelDirLock(model_dir)._read()
    if raw is None or holder is None or holder.get("job") == job or is_stale(holder):
        return
    raise LockedError(f"{model_dir} is in use by another run ({_describe(holder)}), not by this "
                      f"job's chief; wait for it to finish or use another --model_dir")
