"""``mailpolicy check``: validate the whole tree the way the daemon reads it, and warn about what
parses but is probably a mistake.

Errors (exit status 1), one per line as ``file:line: reason``: files that do not parse or cannot
be read. Warnings (exit status 0 unless ``--strict``): duplicate keys (the first wins), alias
loops and over-long expansions, alias destinations in local domains that do not exist, rewrite
chains, a local domain where postmaster reaches nobody, weak password schemes, a relay_from_hosts
that opens the relay to the world, and unknown files in exim/conf.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from policy import passwords
from policy.aliases import Kind, Limits, ResolveError, classify, resolve
from policy.listfiles import ListFileError, parse_lsearch, read_text
from policy.mailtree import CONF_LISTS, Snapshot, TreeLoader


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_tree(root: str, hostname: str, limits: Limits | None = None) -> Report:
    report = Report()
    snapshot, _ = TreeLoader(root, hostname).refresh()
    report.errors.extend(snapshot.problems)
    _duplicates(snapshot, report)
    _aliases(snapshot, limits or Limits(), report)
    _rewrites(snapshot, report)
    _passwords(snapshot, report)
    _relay(snapshot, report)
    conf = os.path.join(root, "exim", "conf")
    if os.path.isdir(conf):
        for name in sorted(os.listdir(conf)):
            if name not in CONF_LISTS and not name.startswith("."):
                report.warnings.append(
                    f"exim/conf/{name}: unknown list file (not read); "
                    f"known: {', '.join(CONF_LISTS)}"
                )
    return report


def _duplicates(snapshot: Snapshot, report: Report) -> None:
    rels = [f"aliases/{d}" for d in snapshot.aliases] + [
        "exim/conf/global_aliases",
        "exim/conf/rewrite_domains",
    ]
    for rel in rels:
        try:
            entries = parse_lsearch(read_text(os.path.join(snapshot.root, rel)), rel)
        except (OSError, ListFileError):
            continue
        seen: dict[str, int] = {}
        for e in entries:
            first = seen.setdefault(e.key.lower(), e.line)
            if first != e.line:
                report.warnings.append(
                    f"{rel}:{e.line}: duplicate key {e.key!r} (line {first} wins)"
                )
    for domain in snapshot.users:
        rel = f"passwd/{domain}"
        try:
            text = read_text(os.path.join(snapshot.root, rel))
        except (OSError, ListFileError):
            continue
        seen = {}
        for number, line in enumerate(text.splitlines(), 1):
            name = line.strip().partition(":")[0].strip().lower()
            if name and not name.startswith("#"):
                first = seen.setdefault(name, number)
                if first != number:
                    report.warnings.append(
                        f"{rel}:{number}: duplicate user {name!r} (line {first} wins)"
                    )


def _aliases(snapshot: Snapshot, limits: Limits, report: Report) -> None:
    """Expand every alias of every local domain (global ones included) as the router would."""
    seen: set[str] = set()
    global_keys = list(snapshot.global_aliases.data or {})
    for domain in sorted(set(snapshot.users) | set(snapshot.aliases)):
        loaded = snapshot.aliases.get(domain)
        keys = [*((loaded.data or {}) if loaded is not None else {}), *global_keys]
        for key in keys:
            address = f"{'no-such-user.probe' if key == '*' else key}@{domain}"
            target = classify(snapshot, address)
            if target.kind is not Kind.ALIAS:
                continue
            messages: list[str] = []
            try:
                for dest in resolve(snapshot, address, limits) or []:
                    if classify(snapshot, dest).kind is Kind.UNKNOWN:
                        messages.append(
                            f"{target.source}: {key}@{domain} -> {dest}: no such "
                            "user or alias (mail to it would bounce)"
                        )
            except ResolveError as e:
                messages.append(f"{target.source}: {key}@{domain}: {e}")
            for m in messages:
                if m not in seen:
                    seen.add(m)
                    report.warnings.append(m)
        postmaster = classify(snapshot, f"postmaster@{domain}")
        if postmaster.kind is Kind.POSTMASTER:
            report.warnings.append(
                f"{domain}: postmaster@{domain} is accepted but reaches nobody; add "
                "'postmaster: you@...' to exim/conf/global_aliases"
            )


def _rewrites(snapshot: Snapshot, report: Report) -> None:
    table = snapshot.rewrite_domains.data or {}
    for source, (target, line) in table.items():
        where = f"exim/conf/rewrite_domains:{line}"
        if target in table:
            report.warnings.append(
                f"{where}: {source} -> {target} which is itself rewritten "
                "(rewriting is applied once)"
            )
        elif not snapshot.is_local_domain(target):
            report.warnings.append(
                f"{where}: {source} -> {target}, not a local domain: mail for it is forwarded there"
            )
        # Rewriting comes first, so the source domain's own users and aliases are never reached.
        for sub, files in (("passwd", snapshot.users), ("aliases", snapshot.aliases)):
            if source in files:
                report.warnings.append(
                    f"{sub}/{source}: {source} is rewritten to {target} ({where}): "
                    "its entries are never used"
                )


def _passwords(snapshot: Snapshot, report: Report) -> None:
    for domain, loaded in snapshot.users.items():
        for name, user in (loaded.data or {}).items():
            why = passwords.weakness(user.hash)
            if why:
                report.warnings.append(f"passwd/{domain}:{user.line}: {name}: {why}")


def _relay(snapshot: Snapshot, report: Report) -> None:
    hosts = snapshot.relay_from_hosts.data
    for line in hosts.broad_lines if hosts is not None else []:
        report.warnings.append(
            f"exim/conf/relay_from_hosts:{line}: a network this wide (IPv4 shorter than /8, "
            "IPv6 shorter than /16, or *) relays for much of the Internet: an open relay"
        )
