"""The node agent's host root on disk: the installed libvgpu and one directory per container.

Layout (``<root>`` is configurable, ``/var/lib/vslice`` style)::

    <root>/lib/libvgpu-<sha256 prefix>.so   one file per version, never rewritten in place
    <root>/lib/libvgpu.so                   symlink to the current version (atomic rename)
    <root>/lib/ld.so.preload                what Kubernetes containers get as /etc/ld.so.preload
    <root>/containers/<pod-uid>_<container>/vgpu.cache   the container's shared cache
    <root>/containers/<pod-uid>_<container>/owner.pid    pids of processes started for it
    <root>/containers/<pod-uid>_<container>/pod.uid      the pod UID and container, exactly

``<pod-uid>_<container>`` is ``preparing.container_key``: escaped, so no two pods share a
directory. ``pod.uid`` tells a directory of that naming from one of the earlier naming
(which replaced unsafe characters by ``-``, so ``a/b`` and ``a-b`` shared one): a
directory without it is adopted only where ``Slicer.reconcile`` can tell whose it is, and
otherwise moved aside (``<key>.legacy-<n>``) and released, never reused for another pod.

Installing libvgpu writes a new versioned file and swings the symlink with ``rename``, so
a process starting at that moment loads either the old or the new library, never half a
file, and processes already running keep the inode they mapped. A shared cache file is
created under a temporary name and renamed into place, and never replaced once it exists:
libvgpu processes may have it mapped. What goes into the files is decided by
``services.nodeagent.core.preparing``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import stat
from pathlib import Path

from services.nodeagent.core import preparing, sharedcaches
from services.nodeagent.core.sharedcaches import SharedCache

log = logging.getLogger("vslice.nodeagent")

LIB_DIR = "lib"
LIB_LINK = "libvgpu.so"
OWNER_FILE = "owner.pid"
MARKER_FILE = "pod.uid"
LEGACY_SUFFIX = ".legacy-"
PRELOAD_FILE = "ld.so.preload"


def install_libvgpu(root: Path, source: Path) -> Path:
    """Install ``source`` as ``<root>/lib/libvgpu-<hash>.so`` and point
    ``<root>/lib/libvgpu.so`` at it; returns the link's path. A no-op when that version is
    current. Raises ``OSError`` when ``source`` cannot be read or the root written."""
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:16]
    lib = root / LIB_DIR
    lib.mkdir(parents=True, exist_ok=True)
    versioned = lib / f"libvgpu-{digest}.so"
    if not versioned.exists():
        tmp = lib / f".{versioned.name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.chmod(0o755)
        os.replace(tmp, versioned)
    link = lib / LIB_LINK
    if not (link.is_symlink() and os.readlink(link) == versioned.name):
        tmp_link = lib / f".{LIB_LINK}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        tmp_link.symlink_to(versioned.name)
        os.replace(tmp_link, link)
        log.info("libvgpu installed", extra={"path": str(versioned)})
    return link


def install_preload(root: Path, text: str) -> Path:
    """Write ``<root>/lib/ld.so.preload`` holding ``text`` (the library path containers
    preload), replaced atomically when its text changes; returns its path. Raises
    ``OSError`` when the root cannot be written."""
    path = root / LIB_DIR / PRELOAD_FILE
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return path


def containers_dir(root: Path) -> Path:
    """``<root>/containers``."""
    return root / preparing.CONTAINERS_DIR


def marker_text(pod_uid: str, container: str) -> str:
    """What ``pod.uid`` holds for a container: its pod UID and name, a line each."""
    return f"{pod_uid}\n{container}\n"


def marked(root: Path, key: str) -> bool:
    """True when container ``key``'s directory has its ``pod.uid`` (the current naming)."""
    return (containers_dir(root) / key / MARKER_FILE).exists()


def mark(root: Path, key: str, *, pod_uid: str, container: str) -> None:
    """Write ``pod.uid`` into container ``key``'s directory (adopting one of the earlier
    naming). Raises ``OSError`` when it cannot be written."""
    _write_marker(containers_dir(root) / key, pod_uid, container)


def _write_marker(directory: Path, pod_uid: str, container: str) -> None:
    tmp = directory / f".{MARKER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(marker_text(pod_uid, container))
    os.replace(tmp, directory / MARKER_FILE)


def move_aside(root: Path, key: str) -> str:
    """Rename container ``key``'s directory to ``<key>.legacy-<n>`` (processes that mapped
    its cache keep it; ``sweep`` removes it once they are gone); returns the new key."""
    base = containers_dir(root)
    for n in range(1, 10_000):
        aside = f"{key}{LEGACY_SUFFIX}{n}"
        try:
            (base / key).rename(base / aside)  # never onto an existing directory
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                continue
            raise
        log.warning("directory of the earlier naming moved aside", extra={"key": aside})
        return aside
    raise OSError(errno.EEXIST, f"no free name to move {key} aside")


def prepare(plan: preparing.ContainerPlan) -> bool:
    """Create the container's directory, ``pod.uid`` and shared cache file; True when
    created now, False when the file was there already (left as it is: processes may map
    it). A directory there without ``pod.uid`` (the earlier naming, perhaps another pod's
    limits) is moved aside first, never reused. Raises ``OSError`` when the directory or
    file cannot be written."""
    directory = Path(plan.directory)
    if directory.is_dir() and not (directory / MARKER_FILE).exists():
        move_aside(directory.parent.parent, plan.key)
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / MARKER_FILE).exists():
        _write_marker(directory, plan.pod_uid, plan.container)
    cache = Path(plan.cache)
    if cache.exists():
        return False
    tmp = directory / f".{cache.name}.{os.getpid()}.tmp"
    tmp.write_bytes(plan.cache_bytes)
    tmp.chmod(0o666)  # every process of the container, whatever its user, maps it
    try:
        os.link(tmp, cache)  # fails if a file appeared meanwhile: never replace one
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def existing(root: Path) -> list[str]:
    """The container keys that have a directory under the root."""
    try:
        return sorted(p.name for p in containers_dir(root).iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


def read_cache(root: Path, key: str) -> SharedCache | str:
    """The decoded shared cache of container ``key``, or why it cannot be read."""
    path = containers_dir(root) / key / preparing.CACHE_FILE
    try:
        return sharedcaches.decode(path.read_bytes())
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    except sharedcaches.SharedCacheError as exc:
        return f"{path}: {exc}"


def add_owner(root: Path, key: str, pid: int) -> None:
    """Record that ``pid`` was started for container ``key`` (its children belong to it
    too). Raises ``OSError`` when the directory is missing."""
    with (containers_dir(root) / key / OWNER_FILE).open("a") as f:
        f.write(f"{pid}\n")


def owners(root: Path, key: str) -> list[int]:
    """The pids recorded with ``add_owner`` (empty when none)."""
    try:
        text = (containers_dir(root) / key / OWNER_FILE).read_text()
    except OSError:
        return []
    return [int(w) for w in text.split() if w.isdigit()]


def alive(pid: int) -> bool:
    """True when process ``pid`` exists (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def start_ticks(pid: int) -> int | None:
    """Process ``pid``'s start time in clock ticks after boot (``/proc/<pid>/stat`` field
    22, proc(5)), as libvgpu records it in its cache slot; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if len(fields) > 19 else None


def in_use(root: Path, key: str) -> list[int]:
    """Live pids using container ``key``: its cache's process slots and its owners.

    A slot counts when the host process of its pid started when the slot's did: a pod's
    process wrote the pid of its own PID namespace (its pid 1 is not the host's), so a
    killed one's slot would otherwise keep the directory for ever.
    """
    pids = {p for p in owners(root, key) if alive(p)}
    cache = read_cache(root, key)
    if isinstance(cache, SharedCache):
        pids.update(
            p.pid
            for p in cache.processes
            if alive(p.pid) and p.start_ticks in (0, start_ticks(p.pid))
        )
    return sorted(pids)


def remove(root: Path, key: str) -> None:
    """Remove container ``key``'s directory (gone already is fine)."""
    shutil.rmtree(containers_dir(root) / key, ignore_errors=True)


def environ_cache(pid: int) -> str | None:
    """``CUDA_DEVICE_MEMORY_SHARED_CACHE`` in process ``pid``'s initial environment, or
    None (no such variable, or ``/proc/<pid>/environ`` unreadable: another user's process)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for entry in raw.split(b"\0"):
        if entry.startswith(b"CUDA_DEVICE_MEMORY_SHARED_CACHE="):
            return entry.partition(b"=")[2].decode(errors="replace")
    return None


FileIdentity = tuple[int, int]  # (st_dev, st_ino)


def file_identity(path: str) -> FileIdentity | None:
    """``(st_dev, st_ino)`` of the file at ``path`` in the agent's view, or None when
    it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def identity_seen_by(pid: int, path: str) -> FileIdentity | None:
    """``(st_dev, st_ino)`` of the regular file process ``pid`` sees at the absolute
    ``path``, or None (relative path, process gone, no such file, not a regular file).

    The path is resolved in the process's own mount namespace and root through
    ``/proc/<pid>/root`` (proc(5)): a container sees its slice's cache at the container
    path Allocate mounts (``/usr/local/vslice/cache/vgpu.cache`` for every container),
    which names a host file only by what is mounted there. No component may be a
    symbolic link: an absolute link would be followed from the agent's root, not the
    container's, and could name another pod's cache.
    """
    if not path.startswith("/"):
        return None
    current = f"/proc/{pid}/root"
    try:
        for part in path.split("/")[1:]:
            if part in ("", ".", ".."):
                return None
            current = f"{current}/{part}"
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):
                return None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def namespace_pid(pid: int) -> int | None:
    """Host process ``pid``'s pid in its own (innermost) PID namespace -- what its
    ``getpid()`` returns, and so what libvgpu writes in its cache slot -- from the last
    ``NSpid`` entry of ``/proc/<pid>/status`` (proc(5); Linux >= 4.1, else ``pid``), or
    None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            fields = line.split()[1:]
            return int(fields[-1]) if fields else pid
    return pid


def parent_of(pid: int) -> int | None:
    """Process ``pid``'s parent pid, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[1]) if len(fields) > 1 else None


def kill(pid: int) -> bool:
    """SIGKILL ``pid``; True when sent (False: gone already or not ours to kill)."""
    try:
        os.kill(pid, 9)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise
        return False
    return True
