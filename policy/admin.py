"""Editing the admin's files from the command line: users (passwd/<domain>) and aliases.

Every write is atomic (a temporary file in the same directory, fsync, rename), keeps every other
line and comment as it was, keeps the file's mode and owner, is validated with the daemon's own
parser before it replaces the file, and holds an exclusive lock (``.<file>.lock``) so two admins
cannot lose each other's edit. The daemon sees the change within one reload interval.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from typing import Any

from policy.addresses import is_valid_domain, restricted_local_part, safe_destination, split
from policy.listfiles import ListFileError, split_key
from policy.mailtree import parse_aliases, parse_passwd


class AdminError(Exception):
    pass


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd = os.open(
        os.path.join(directory, f".{name}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


# A new passwd file's group: Exim's router reads the user names (the seed's lsearch) as this
# user, and 0640 keeps the hashes from everyone else. A set-group-ID directory (as
# `mailpolicy provision` makes passwd/) gives its own group instead.
USER_LIST_GROUP = "Debian-exim"


def _group_id(name: str) -> int | None:
    import grp

    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def atomic_write(path: str, text: str, new_mode: int, new_group: str | None = None) -> None:
    """Replace ``path`` with ``text`` (replace_file), keeping the file's mode and owner; a new
    file gets ``new_mode`` and, unless its directory is set-group-ID, ``new_group``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        gid = None
        if new_group and not os.stat(os.path.dirname(path) or ".").st_mode & 0o2000:
            gid = _group_id(new_group)
        replace_file(path, text, new_mode, gid=-1 if gid is None else gid)
    else:
        replace_file(path, text, st.st_mode & 0o7777, st.st_uid, st.st_gid)


def replace_file(path: str, text: str, mode: int, uid: int = -1, gid: int = -1) -> None:
    """Atomically: a temporary file in the same directory gets ``text``, is fsynced, gets its
    owner (where permitted: not root, an admin keeps their own) and ``mode``, and is renamed
    over ``path``; then the directory is fsynced. A reader sees the old file or the new one."""
    import tempfile  # here: the daemon imports this module through the CLI, never writes

    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if uid != -1 or gid != -1:
            with contextlib.suppress(PermissionError):
                os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)  # after chown, which may clear set-ID bits
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _edit(
    path: str,
    rel: str,
    change: Callable[[list[str]], list[str]],
    validate: Callable[[str, str], Any],
    new_mode: int,
    new_group: str | None = None,
) -> None:
    with locked(path):
        lines = change(read_lines(path))
        text = "\n".join(lines) + "\n" if lines else ""
        try:
            validate(text, rel)
        except ListFileError as e:
            raise AdminError(f"refusing to write an invalid file: {e}") from None
        atomic_write(path, text, new_mode, new_group)


def _address(address: str) -> tuple[str, str]:
    local, domain = split(address)
    domain = domain.lower()
    if not local or not is_valid_domain(domain) or domain.startswith("["):
        raise AdminError(f"{address!r} is not user@domain")
    return local, domain


# --- users --------------------------------------------------------------------------------


def _check_local_part(local: str, what: str) -> str:
    # A leading "#" would make the new line a comment: the command would report success and the
    # entry would not exist ("#" is otherwise a valid local-part character).
    if (
        local.startswith("#")
        or restricted_local_part(local, True)
        or not safe_destination(f"{local}@x.invalid")
        or ":" in local
    ):
        raise AdminError(f"{local!r} is not allowed as {what}")
    return local.lower()


def _check_user_name(local: str) -> str:
    if local == "*":
        raise AdminError(f"{local!r} is not allowed as a user name")
    return _check_local_part(local, "a user name")


def check_new_user(root: str, address: str, exists: bool) -> None:
    """Fail early, before the password is asked for, when ``user add`` (``exists`` False) or
    ``user passwd`` (``exists`` True) cannot succeed. The edit itself checks again under its lock.
    """
    local, domain = _address(address)
    user = _check_user_name(local) if not exists else local.lower()
    found = _user_line_index(read_lines(os.path.join(root, "passwd", domain)), user) >= 0
    if found and not exists:
        raise AdminError(f"{user}@{domain} exists (use `mailpolicy user passwd`)")
    if exists and not found:
        raise AdminError(f"no user {user}@{domain}")


def _user_line_index(lines: list[str], user: str) -> int:
    for i, line in enumerate(lines):
        name, colon, _ = line.strip().partition(":")
        if colon and not line.lstrip().startswith("#") and name.strip().lower() == user:
            return i
    return -1


def user_add(root: str, address: str, hash_: str) -> str:
    local, domain = _address(address)
    user = _check_user_name(local)
    path = os.path.join(root, "passwd", domain)

    def change(lines: list[str]) -> list[str]:
        if _user_line_index(lines, user) >= 0:
            raise AdminError(f"{user}@{domain} exists (use `mailpolicy user passwd`)")
        if not lines:
            lines = [
                f"# Users of {domain}: user:hash, one per line (hash from doveadm pw).",
                f"# Managed by hand or with `mailpolicy user add|passwd|del {'user@' + domain}`.",
            ]
        return [*lines, f"{user}:{hash_}"]

    _edit(path, f"passwd/{domain}", change, parse_passwd, 0o640, USER_LIST_GROUP)
    return path


def user_passwd(root: str, address: str, hash_: str) -> str:
    local, domain = _address(address)
    user = local.lower()
    path = os.path.join(root, "passwd", domain)

    def change(lines: list[str]) -> list[str]:
        i = _user_line_index(lines, user)
        if i < 0:
            raise AdminError(f"no user {user}@{domain}")
        name, _, rest = lines[i].strip().partition(":")
        extra = rest.split(":", 1)[1:]  # Dovecot passwd-file fields after the hash stay
        lines[i] = ":".join([name, hash_, *extra])
        return lines

    _edit(path, f"passwd/{domain}", change, parse_passwd, 0o640, USER_LIST_GROUP)
    return path


def user_del(root: str, address: str) -> str:
    local, domain = _address(address)
    user = local.lower()
    path = os.path.join(root, "passwd", domain)

    def change(lines: list[str]) -> list[str]:
        i = _user_line_index(lines, user)
        if i < 0:
            raise AdminError(f"no user {user}@{domain}")
        return lines[:i] + lines[i + 1 :]

    _edit(path, f"passwd/{domain}", change, parse_passwd, 0o640, USER_LIST_GROUP)
    return path


# --- aliases ------------------------------------------------------------------------------


def alias_path(root: str, address: str, is_global: bool) -> tuple[str, str, str]:
    """(path, relative name, key) of an alias address; global aliases take a bare local part."""
    if is_global:
        if "@" in address or not address:
            raise AdminError("a global alias is a bare local part (it exists in every domain)")
        return (
            os.path.join(root, "exim", "conf", "global_aliases"),
            "exim/conf/global_aliases",
            (address.lower()),
        )
    local, domain = _address(address)
    return os.path.join(root, "aliases", domain), f"aliases/{domain}", local.lower()


def _continues(line: str) -> bool:
    return line[:1] in (" ", "\t") and bool(line.strip())


def _alias_span(lines: list[str], key: str) -> tuple[int, int]:
    """[start, end) of the entry for ``key`` including its continuation lines; (-1, -1).

    As in ``parse_lsearch``, blank lines and ``#`` comment lines between continuation lines do
    not end the entry (stopping there would leave the rest of a folded alias behind, glued onto
    the rewritten line); ``_rebuild`` keeps them.
    """
    for i, line in enumerate(lines):
        if not line or line[0] in " \t#":
            continue
        try:
            k = split_key(line, "", i + 1)[0]
        except ListFileError:
            continue
        if k.lower() == key:
            end = j = i + 1
            while j < len(lines) and (
                _continues(lines[j]) or not lines[j].strip() or lines[j].startswith("#")
            ):
                j += 1
                if _continues(lines[j - 1]):
                    end = j
            return i, end
    return -1, -1


def _targets(lines: list[str], start: int, end: int) -> list[str]:
    value = " ".join(
        [split_key(lines[start], "", start + 1)[1]]
        + [ln.strip() for ln in lines[start + 1 : end] if _continues(ln)]
    )
    return [t.strip() for t in value.split(",") if t.strip()]


def _rebuild(lines: list[str], start: int, end: int, entry: list[str]) -> list[str]:
    """Replace the entry at [start, end) by ``entry`` (0 or 1 line), keeping the comments and
    blank lines that were inside it."""
    inside = [ln for ln in lines[start + 1 : end] if not _continues(ln)]
    return [*lines[:start], *entry, *inside, *lines[end:]]


def _format_alias(key: str, targets: list[str]) -> str:
    return f"{key}: {', '.join(targets)}"


def alias_add(root: str, address: str, targets: list[str], is_global: bool = False) -> str:
    path, rel, key = alias_path(root, address, is_global)
    if key == "*" and is_global:
        raise AdminError("global_aliases has no catch-all ('*' is only for '*@domain')")
    if key != "*":
        _check_local_part(key, "an alias name")
    for t in targets:
        if not (safe_destination(t) or safe_destination(t + "@x.invalid")):
            raise AdminError(f"destination {t!r} is not a plain address")

    def change(lines: list[str]) -> list[str]:
        start, end = _alias_span(lines, key)
        if start < 0:
            if not lines:
                lines = ["# Aliases: local-part: destination, destination ...  ('*' = catch-all)"]
            return [*lines, _format_alias(key, targets)]
        current = _targets(lines, start, end)
        merged = current + [t for t in targets if t.lower() not in {c.lower() for c in current}]
        return _rebuild(lines, start, end, [_format_alias(key, merged)])

    _edit(path, rel, change, parse_aliases, 0o644)
    return path


def alias_del(
    root: str, address: str, targets: list[str] | None = None, is_global: bool = False
) -> str:
    path, rel, key = alias_path(root, address, is_global)

    def change(lines: list[str]) -> list[str]:
        start, end = _alias_span(lines, key)
        if start < 0:
            raise AdminError(f"no alias {address}")
        if not targets:
            return _rebuild(lines, start, end, [])
        drop = {t.lower() for t in targets}
        current = _targets(lines, start, end)
        missing = drop - {c.lower() for c in current}
        if missing:
            raise AdminError(f"{address} has no destination {sorted(missing)[0]!r}")
        kept = [c for c in current if c.lower() not in drop]
        if not kept:
            return _rebuild(lines, start, end, [])
        return _rebuild(lines, start, end, [_format_alias(key, kept)])

    _edit(path, rel, change, parse_aliases, 0o644)
    return path
