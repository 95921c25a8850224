"""The machine-image files under image/ (image/README.md), checked without building an image:
there is no container engine here or in CI, and no SmartOS.

* image/oci/Containerfile, read by a small parser of the Dockerfile syntax (line continuations,
  comments, JSON and shell forms): the base, the checkout at /opt/mailpolicy installed by
  ``sh scripts/setup.sh``, the ports, the volume, and a HEALTHCHECK and ENTRYPOINT that are
  executable files of this repository. Its ignore file drops no tracked file.
* The Debian packages the image runs (supervisord, cron, freshclam ...) are in
  scripts/debian-packages.txt, own the programs named (dpkg -S, where installed), and every
  package of that list exists in Debian 12 (apt-cache).
* Every shell script under image/ parses (sh -n, and bash -n for bash's).
* image/oci/entrypoint runs for real with stand-ins for the two programs it calls
  (``mailpolicy`` and ``supervisord``, which record their argv and pid).
* image/oci/healthcheck runs for real against small servers on loopback (a Unix socket answering
  PING, an SMTP and an IMAP greeting), and once against the real daemon.
* image/smartos/: mibe's manifest keys, the pkgsrc package list, the SMF manifest (XML; its start
  method is the venv's mailpolicy), and the zoneinit include run by bash with stand-ins for
  zonename, zfs, svcs, svcadm and mailpolicy.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import random
import re
import shlex
import shutil
import socketserver
import subprocess
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from policy import protocol
from tests.conftest import Daemon

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "image"
OCI = IMAGE / "oci"
SMARTOS = IMAGE / "smartos"
CONTAINERFILE = OCI / "Containerfile"
ENTRYPOINT = OCI / "entrypoint"
HEALTHCHECK = OCI / "healthcheck"
INCLUDE = SMARTOS / "copy" / "var" / "zoneinit" / "includes" / "31-mailpolicy.sh"
SMF_DIR = SMARTOS / "copy" / "opt" / "local" / "lib" / "svc" / "manifest"
PACKAGE_LIST = REPO / "scripts" / "debian-packages.txt"
INSTALL_DIR = "/opt/mailpolicy"
PORTS = ["25", "587", "143", "993", "4190"]


# --- a small Dockerfile parser ------------------------------------------------------------------

INSTRUCTIONS = frozenset({
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
})  # fmt: skip


@dataclass(frozen=True)
class Instruction:
    line: int  # where it starts
    keyword: str  # upper case
    args: str  # continuations joined, comments inside them dropped

    def exec_form(self) -> list[str] | None:
        """The JSON array of the exec form, or None for the shell form."""
        return exec_form(self.args)


def exec_form(args: str) -> list[str] | None:
    if not args.startswith("["):
        return None
    value = json.loads(args)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"not a JSON array of strings: {args}")
    return value


def parse_containerfile(text: str) -> list[Instruction]:
    """Instructions as Docker reads them: ``\\`` at the end of a line continues it; a line whose
    first non-blank is ``#`` is a comment, also between continued lines (Docker drops those);
    blank lines end nothing. Parser directives (``# escape=``) are not supported."""
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if number == 1 and re.match(r"#\s*escape\s*=", stripped):
            raise ValueError("parser directive '# escape=' is not supported here")
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        body = raw.rstrip()
        if body.endswith("\\"):
            parts.append(body[:-1])
            continue
        parts.append(body)
        joined = " ".join(p.strip() for p in parts)
        parts = []
        keyword, _, args = joined.partition(" ")
        if keyword.upper() not in INSTRUCTIONS:
            raise ValueError(f"line {start}: unknown instruction {keyword!r}")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    if parts:
        raise ValueError(f"line {start}: the file ends inside a continued line")
    return out


def shell_commands(args: str) -> list[list[str]]:
    """The simple commands of a shell-form RUN, split at ``&&``, ``||`` and ``;``."""
    commands: list[list[str]] = [[]]
    lexer = shlex.shlex(args, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    for token in lexer:
        if token in ("&&", "||", ";"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def options(args: str) -> tuple[dict[str, str], str]:
    """``--name=value`` options at the start of an instruction's arguments, and the rest."""
    found: dict[str, str] = {}
    rest = args
    while m := re.match(r"--([a-z-]+)=(\S+)\s+", rest):
        found[m.group(1)] = m.group(2)
        rest = rest[m.end() :]
    return found, rest


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(amount) * units[unit]
    return total


@cache
def containerfile() -> tuple[Instruction, ...]:
    return tuple(parse_containerfile(CONTAINERFILE.read_text()))


def only(keyword: str) -> Instruction:
    found = [i for i in containerfile() if i.keyword == keyword]
    assert len(found) == 1, f"{keyword}: {found}"
    return found[0]


def test_parser_reads_continuations_comments_and_forms() -> None:
    text = (
        "# a comment\n"
        "FROM debian:12\n"
        "\n"
        "RUN a \\\n"
        "    # dropped, as Docker drops it\n"
        "    && b \\\n"
        "    && c\n"
        'entrypoint ["/x", "y z"]\n'
        "EXPOSE 25 \\\n"
        "  587\n"
    )
    got = parse_containerfile(text)
    assert [(i.line, i.keyword, i.args) for i in got] == [
        (2, "FROM", "debian:12"),
        (4, "RUN", "a && b && c"),
        (8, "ENTRYPOINT", '["/x", "y z"]'),
        (9, "EXPOSE", "25 587"),
    ]
    assert got[2].exec_form() == ["/x", "y z"]
    assert got[1].exec_form() is None
    assert shell_commands(got[1].args) == [["a"], ["b"], ["c"]]
    assert shell_commands("rm -rf 'a b' && sh x.sh; true") == [
        ["rm", "-rf", "a b"], ["sh", "x.sh"], ["true"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["FROM debian:12\nRUNN true\n", "FROM debian:12\nRUN a \\\n", "# escape=`\nFROM x\n"],
)
def test_parser_refuses_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError):
        parse_containerfile(text)


# --- the Containerfile --------------------------------------------------------------------------


def repo_file(image_path: str) -> Path:
    """The repository file behind a path inside the image (the checkout is at INSTALL_DIR)."""
    assert image_path.startswith(INSTALL_DIR + "/"), image_path
    return REPO / image_path[len(INSTALL_DIR) + 1 :]


def git_mode(path: Path) -> str | None:
    """The mode git records for a file, None when git does not track it (or no git)."""
    if shutil.which("git") is None:
        return None
    done = subprocess.run(
        ["git", "ls-files", "-s", "--", str(path.relative_to(REPO))],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return done.stdout.split()[0]


def assert_executable_in_repo(path: Path) -> None:
    assert path.is_file(), f"{path} does not exist"
    assert os.access(path, os.X_OK) and path.stat().st_mode & 0o111 == 0o111, f"{path}: not 755"
    mode = git_mode(path)
    if mode is None:
        pytest.skip(f"{path.relative_to(REPO)} is not tracked by git yet: its git mode unchecked")
    assert mode == "100755", f"git records {path.relative_to(REPO)} as {mode}, not executable"


def test_containerfile_builds_on_debian_12() -> None:
    first = containerfile()[0]
    assert (first.keyword, first.args) == ("FROM", "debian:12")


def test_checkout_goes_to_opt_mailpolicy_and_setup_sh_installs_it() -> None:
    steps = containerfile()
    copies = [
        (n, i) for n, i in enumerate(steps)
        if i.keyword == "COPY" and i.args.split()[-1].rstrip("/") == INSTALL_DIR
    ]  # fmt: skip
    assert len(copies) == 1, "one COPY of the checkout to /opt/mailpolicy"
    copy_at, copy = copies[0]
    flags, rest = options(copy.args + " ")
    assert rest.split() == [".", INSTALL_DIR], copy.args  # the whole build context
    assert "chown" not in flags

    runs = [
        (n, i, shell_commands(i.args)) for n, i in enumerate(steps)
        if i.keyword == "RUN" and ["sh", "scripts/setup.sh"] in shell_commands(i.args)
    ]  # fmt: skip
    assert len(runs) == 1, "one RUN invokes `sh scripts/setup.sh`, the script CI runs"
    run_at, _, commands = runs[0]
    assert copy_at < run_at
    workdirs = [i.args for i in steps[:run_at] if i.keyword == "WORKDIR"]
    assert workdirs and workdirs[-1].rstrip("/") == INSTALL_DIR, "setup.sh runs in the checkout"
    # The apt lists go in the same layer that fetched them; a .venv from the context is not kept.
    assert any(c[:2] == ["rm", "-rf"] and "/var/lib/apt/lists/*" in c for c in commands)
    index = commands.index(["sh", "scripts/setup.sh"])
    assert any(c[:2] == ["rm", "-rf"] and ".venv" in c for c in commands[:index])
    env = [i.args for i in steps if i.keyword == "ENV" and i.args.startswith("PATH=")]
    assert env and env[-1].startswith(f"PATH={INSTALL_DIR}/.venv/bin:")


def test_ports_and_volume() -> None:
    exposed = [p for i in containerfile() if i.keyword == "EXPOSE" for p in i.args.split()]
    assert sorted(exposed) == sorted(PORTS), "exactly the seed's SMTP, IMAP and ManageSieve ports"
    volumes: list[str] = []
    for i in containerfile():
        if i.keyword == "VOLUME":
            volumes += i.exec_form() or i.args.split()
    assert volumes == ["/srv/mail"]


def test_healthcheck_instruction_names_the_repository_script() -> None:
    check = only("HEALTHCHECK")
    flags, rest = options(check.args)
    assert rest.startswith("CMD ")
    argv = exec_form(rest[4:].strip())
    assert argv is not None and len(argv) == 1, "exec form, no shell"
    # The script runs its three checks one after another, each bounded by 3 s.
    assert seconds(flags.get("timeout", "30s")) >= 3 * 3 + 1
    assert argv[0] == f"{INSTALL_DIR}/image/oci/healthcheck"
    assert_executable_in_repo(repo_file(argv[0]))


def test_entrypoint_instruction_names_the_repository_script() -> None:
    argv = only("ENTRYPOINT").exec_form()
    # Exec form: the engine's SIGTERM goes to the entrypoint, which execs supervisord.
    assert argv == [f"{INSTALL_DIR}/image/oci/entrypoint"]
    assert_executable_in_repo(repo_file(argv[0]))


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for our file: a pattern matches the path or
    one of its parent directories; ``**/`` also matches nothing; later ``!`` lines re-include."""
    parents = [path] + ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.rstrip("/")
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, v) for p in parents for v in variants):
            result = not negate
    return result


def test_ignore_file_keeps_every_tracked_file_and_drops_the_venv() -> None:
    lines = (OCI / "Containerfile.dockerignore").read_text().splitlines()
    patterns = [x.strip() for x in lines if x.strip() and not x.lstrip().startswith("#")]
    assert ignored(".venv", patterns) and ignored(".venv/bin/python", patterns)
    assert ignored("policy/__pycache__/cli.cpython-311.pyc", patterns)
    assert not ignored("policy/cli.py", patterns)
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    dropped = [p for p in tracked if p and ignored(p, patterns)]
    assert dropped == [], "the image must get every file of the checkout"


# --- Debian packages ----------------------------------------------------------------------------

# What the image runs (entrypoint, supervisord.conf, cron, README), a file it owns, its package.
NEEDED = [
    ("supervisord", "/usr/bin/supervisord", "supervisor"),
    ("supervisorctl", "/usr/bin/supervisorctl", "supervisor"),
    ("cron -f", "/usr/sbin/cron", "cron"),
    ("freshclam -d", "/usr/bin/freshclam", "clamav-freshclam"),
    ("clamd", "/usr/sbin/clamd", "clamav-daemon"),
    ("spamd", "/usr/sbin/spamd", "spamd"),
    ("exim4 -bdf", "/usr/sbin/exim4", "exim4-daemon-heavy"),
    ("dovecot -F", "/usr/sbin/dovecot", "dovecot-core"),
    ("healthcheck, hooks", "/usr/bin/pydoc3", "python3"),
    ("setup.sh: python3 -m venv", "/usr/share/doc/python3-venv", "python3-venv"),
    ("provision: system:timezone", "/usr/share/zoneinfo/Europe/Amsterdam", "tzdata"),
    ("freshclam, backups: TLS", "/usr/sbin/update-ca-certificates", "ca-certificates"),
]


def debian_packages() -> list[str]:
    """As scripts/setup.sh reads the list: '#' starts a comment, names split on blanks."""
    return [
        name
        for line in PACKAGE_LIST.read_text().splitlines()
        for name in re.sub(r"#.*", "", line).split()
    ]


def test_everything_the_image_runs_is_in_the_package_list() -> None:
    listed = debian_packages()
    assert len(listed) == len(set(listed)), "a package listed twice"
    missing = [(what, pkg) for what, _, pkg in NEEDED if pkg not in listed]
    assert missing == []
    present = [(path, pkg) for _, path, pkg in NEEDED if os.path.exists(path)]
    if not present or shutil.which("dpkg") is None:
        pytest.skip("none of the packages is installed here: ownership unchecked")
    done = subprocess.run(["dpkg", "-S", *(p for p, _ in present)], capture_output=True, text=True)
    owners: dict[str, set[str]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("diversion "):
            continue
        pkgs, _, path = line.partition(": ")
        owners.setdefault(path, set()).update(p.split(":")[0] for p in pkgs.split(", "))
    wrong = [
        (path, pkg, owners.get(path)) for path, pkg in present if pkg not in owners.get(path, ())
    ]
    assert wrong == [], "the package named does not own the program"


def is_debian_12() -> bool:
    try:
        release = Path("/etc/os-release").read_text()
    except OSError:
        return False
    return "ID=debian" in release.splitlines() and 'VERSION_ID="12"' in release.splitlines()


def test_every_listed_package_exists_in_debian_12() -> None:
    if shutil.which("apt-cache") is None:
        pytest.skip("no apt-cache here")
    if not is_debian_12():
        pytest.skip("apt-cache here does not speak for Debian 12")
    listed = debian_packages()
    done = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *listed], capture_output=True, text=True
    )
    found = set(re.findall(r"^Package: (\S+)$", done.stdout, re.MULTILINE))
    assert sorted(set(listed) - found) == [], done.stderr


# --- shell syntax -------------------------------------------------------------------------------


def shell_scripts() -> dict[Path, str]:
    """Every shell script under image/ and the shell that runs it."""
    found: dict[Path, str] = {}
    for path in sorted(IMAGE.rglob("*")):
        if not path.is_file() or "copy/opt/mailpolicy" in path.as_posix():
            continue
        first = path.read_bytes()[:64].split(b"\n", 1)[0]
        m = re.match(rb"#!\s*\S*/(sh|bash|dash)\b", first)
        if m:
            found[path] = m.group(1).decode()
        elif path.suffix == ".sh":
            found[path] = "bash"  # zoneinit includes: sourced by zoneinit's bash
    return found


def test_every_shell_script_parses() -> None:
    scripts = shell_scripts()
    assert {ENTRYPOINT, SMARTOS / "customize", INCLUDE} <= set(scripts)
    assert scripts[ENTRYPOINT] == "sh", "the entrypoint is POSIX sh"
    for path, shell in scripts.items():
        for checker in ["sh", shell] if shell != "sh" else ["sh"]:
            if shutil.which(checker) is None:
                continue
            done = subprocess.run([checker, "-n", str(path)], capture_output=True, text=True)
            assert done.returncode == 0, f"{checker} -n {path}: {done.stderr}"


# --- the entrypoint, run for real ---------------------------------------------------------------

FAKE = """#!/usr/bin/python3 -I
# Stand-in that records how it was run, then exits with FAKE_STATUS_<name> (default 0).
import json, os, sys
name = os.path.basename(sys.argv[0])
record = {
    "prog": name, "argv": sys.argv[1:], "pid": os.getpid(),
    "path": os.environ.get("PATH", ""),
    "env": {k: v for k, v in os.environ.items() if k.startswith("MAILPOLICY_")},
}
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(record) + "\\n")
out = os.environ.get("FAKE_STDOUT_" + name.replace("-", "_"))
if out:
    print(out)
status = int(os.environ.get("FAKE_STATUS_" + name.replace("-", "_"), "0"))
if status:
    print(os.environ.get("FAKE_MESSAGE", name + ": failed"), file=sys.stderr)
sys.exit(status)
"""


def install_fake(path: Path, text: str = FAKE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@dataclass
class Run:
    code: int
    pid: int
    stderr: str
    calls: list[dict[str, object]]

    def of(self, prog: str) -> list[dict[str, object]]:
        return [c for c in self.calls if c["prog"] == prog]


@dataclass
class Box:
    dir: Path
    home: Path
    etc: Path
    root: Path
    bin: Path
    log: Path

    @property
    def conf(self) -> Path:
        return self.etc / "mailpolicy" / "supervisord.conf"

    @property
    def metadata(self) -> Path:
        return self.etc / "mailpolicy" / "metadata.json"

    def run(self, *args: str, **env: str) -> Run:
        base = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "FAKE_LOG": str(self.log),
            "MAILPOLICY_HOME": str(self.home),
            "MAILPOLICY_ETC": str(self.etc),
            "MAILPOLICY_ROOT": str(self.root),
        }
        self.log.write_text("")
        proc = subprocess.Popen(
            [str(ENTRYPOINT), *args], env={**base, **env}, cwd=self.dir,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        _, stderr = proc.communicate(timeout=30)
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return Run(proc.returncode, proc.pid, stderr, calls)


@pytest.fixture
def box(tmp_path: Path) -> Box:
    b = Box(tmp_path, tmp_path / "home", tmp_path / "etc", tmp_path / "srv-mail",
            tmp_path / "bin", tmp_path / "calls.jsonl")  # fmt: skip
    install_fake(b.home / ".venv" / "bin" / "mailpolicy")
    install_fake(b.bin / "supervisord")
    install_fake(b.bin / "other-supervisord")
    install_fake(b.bin / "admin-command")
    b.conf.parent.mkdir(parents=True)
    b.conf.write_text("[supervisord]\nnodaemon=true\n")  # as provision leaves it
    return b


def provision_argv(box: Box, *extra: str) -> list[str]:
    return ["provision", "--root", str(box.root), "--etc", str(box.etc), *extra]


def test_entrypoint_provisions_from_the_metadata_file_then_execs_supervisord(box: Box) -> None:
    box.metadata.write_text('{"customer_metadata": {"system:timezone": "Europe/Amsterdam"}}')
    run = box.run()
    assert run.code == 0, run.stderr
    [provision] = run.of("mailpolicy")
    assert provision["argv"] == provision_argv(box, "--metadata", str(box.metadata))
    assert str(provision["path"]).startswith(f"{box.home}/.venv/bin:")
    [supervisord] = run.of("supervisord")
    assert supervisord["argv"] == ["-n", "-c", str(box.conf)]
    # exec: supervisord is the entrypoint's own process (PID 1 in the container).
    assert supervisord["pid"] == run.pid
    assert provision["pid"] != run.pid
    assert [c["prog"] for c in run.calls] == ["mailpolicy", "supervisord"]


def test_entrypoint_takes_the_file_named_by_mailpolicy_metadata(box: Box) -> None:
    elsewhere = box.dir / "vm.json"
    elsewhere.write_text("{}")
    box.metadata.write_text("{}")  # the default path is not used then
    run = box.run(MAILPOLICY_METADATA=str(elsewhere))
    assert run.code == 0, run.stderr
    assert run.of("mailpolicy")[0]["argv"] == provision_argv(box, "--metadata", str(elsewhere))


def test_entrypoint_without_a_file_provisions_from_the_environment(box: Box) -> None:
    run = box.run(MAILPOLICY_SYSTEM_TIMEZONE="Europe/Amsterdam", MAILPOLICY_DNS_DOMAIN="x.org")
    assert run.code == 0, run.stderr
    [provision] = run.of("mailpolicy")
    assert provision["argv"] == provision_argv(box)
    env = provision["env"]
    assert isinstance(env, dict)
    assert env["MAILPOLICY_SYSTEM_TIMEZONE"] == "Europe/Amsterdam"
    assert env["MAILPOLICY_DNS_DOMAIN"] == "x.org"
    assert "environment variables" in run.stderr
    assert len(run.of("supervisord")) == 1


def test_entrypoint_refuses_a_metadata_file_that_is_not_there(box: Box) -> None:
    missing = box.dir / "not-mounted.json"
    run = box.run(MAILPOLICY_METADATA=str(missing))
    assert run.code == 2
    assert str(missing) in run.stderr
    assert run.calls == [], "neither provision nor supervisord ran"


def test_failing_provision_stops_before_supervisord(box: Box) -> None:
    box.metadata.write_text("{}")
    message = "mailpolicy provision: bad metadata in x: system:timezone: unknown time zone"
    run = box.run(FAKE_STATUS_mailpolicy="2", FAKE_MESSAGE=message)
    assert run.code == 2
    assert message in run.stderr, "provision's own message reaches the container log"
    assert "not starting the services" in run.stderr
    assert run.of("supervisord") == []


def test_extra_provision_arguments_are_split_not_globbed(box: Box) -> None:
    (box.dir / "a-file").write_text("")  # what a glob of * would find in the working directory
    run = box.run(MAILPOLICY_PROVISION_ARGS="--port-offset 10000  --offline *")
    assert run.code == 0, run.stderr
    assert run.of("mailpolicy")[0]["argv"] == provision_argv(
        box, "--port-offset", "10000", "--offline", "*"
    )


def test_no_supervisord_conf_from_provision_is_an_error(box: Box) -> None:
    box.conf.unlink()
    run = box.run()
    assert run.code == 1
    assert str(box.conf) in run.stderr
    assert len(run.of("mailpolicy")) == 1 and run.of("supervisord") == []


def test_supervisord_is_overridable(box: Box) -> None:
    run = box.run(SUPERVISORD=str(box.bin / "other-supervisord"))
    assert run.code == 0, run.stderr
    assert [c["prog"] for c in run.calls] == ["mailpolicy", "other-supervisord"]


def test_arguments_run_instead_of_supervisord_after_provisioning(box: Box) -> None:
    run = box.run("admin-command", "check", "two words")
    assert run.code == 0, run.stderr
    assert [c["prog"] for c in run.calls] == ["mailpolicy", "admin-command"]
    command = run.of("admin-command")[0]
    assert command["argv"] == ["check", "two words"]
    assert command["pid"] == run.pid


# --- the health check, run for real -------------------------------------------------------------


class Greeter(socketserver.ThreadingTCPServer):
    """A TCP server on loopback that greets, then answers the client's one line with ``bye``
    (None as greeting: accept and say nothing)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, greeting: bytes | None, bye: bytes) -> None:
        self.greeting = greeting
        self.bye = bye
        self.lines: list[bytes] = []
        self.stopping = threading.Event()
        super().__init__(("127.0.0.1", port), GreeterHandler)


class GreeterHandler(socketserver.StreamRequestHandler):
    server: Greeter

    def handle(self) -> None:
        if self.server.greeting is None:
            self.server.stopping.wait(30)
            return
        self.wfile.write(self.server.greeting)
        self.request.settimeout(5)
        with contextlib.suppress(OSError):
            line = self.rfile.readline(1024)
            self.server.lines.append(line)
            self.wfile.write(self.server.bye)


class PolicyServer(socketserver.ThreadingUnixStreamServer):
    """The daemon's side of PING: read the request to EOF, answer one line (None: never)."""

    daemon_threads = True

    def __init__(self, path: Path, reply: bytes | None) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.stopping = threading.Event()
        super().__init__(str(path), PolicyHandler)


class PolicyHandler(socketserver.BaseRequestHandler):
    server: PolicyServer

    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := self.request.recv(4096):
                data += chunk
        self.server.requests.append(data)
        if self.server.reply is None:
            self.server.stopping.wait(30)
            return
        with contextlib.suppress(OSError):
            self.request.sendall(self.server.reply)


def serve(server: socketserver.BaseServer) -> None:
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()


def stop(server: Greeter | PolicyServer) -> None:
    server.stopping.set()
    server.shutdown()
    server.server_close()


@dataclass
class Stack:
    offset: int
    sock: Path
    smtp: Greeter
    imap: Greeter
    policy: PolicyServer

    def check(
        self, sock: Path | None = None, env: dict[str, str] | None = None
    ) -> tuple[int, str, float]:
        base = {
            "PATH": "/usr/bin:/bin",
            "MAILPOLICY_HEALTH_HOST": "127.0.0.1",
            "MAILPOLICY_HEALTH_PORT_OFFSET": str(self.offset),
            "MAILPOLICY_HEALTH_SOCKET": str(sock or self.sock),
        }
        start = time.monotonic()
        done = subprocess.run(
            [str(HEALTHCHECK)],
            env={**base, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.stderr == ""
        return done.returncode, done.stdout, time.monotonic() - start


PONG = protocol.render_pong("mailpolicy 0.1.0")  # what the daemon answers, from its own code


def start_stack(
    short_dir: Path, smtp: bytes | None, imap: bytes | None, policy: bytes | None
) -> Stack:
    """The three servers on loopback: SMTP on 25 + offset and IMAP on 143 + offset, for an
    offset where both ports are free."""
    rng = random.Random()
    for _ in range(50):
        offset = rng.randrange(20000, 60000)
        try:
            smtp_server = Greeter(25 + offset, smtp, b"221 bye\r\n")
        except OSError:
            continue
        try:
            imap_server = Greeter(143 + offset, imap, b"* BYE\r\nh OK bye\r\n")
        except OSError:
            smtp_server.server_close()
            continue
        break
    else:
        raise RuntimeError("no free pair of loopback ports")
    sock = short_dir / "policy.sock"
    policy_server = PolicyServer(sock, policy)
    for server in (smtp_server, imap_server, policy_server):
        serve(server)
    return Stack(offset, sock, smtp_server, imap_server, policy_server)


@pytest.fixture
def make_stack(short_dir: Path) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(
        smtp: bytes | None = b"220 mail.example.org ESMTP Exim 4.96\r\n",
        imap: bytes | None = b"* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n",
        policy: bytes | None = PONG,
    ) -> Stack:
        stack = start_stack(short_dir, smtp, imap, policy)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        for server in (stack.smtp, stack.imap, stack.policy):
            with contextlib.suppress(OSError):
                stop(server)


NAMES = {"policy": "policy daemon", "smtp": "exim (smtp", "imap": "dovecot (imap"}


def test_healthy_when_all_three_answer(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    code, out, _ = stack.check()
    assert (code, out.count("\n")) == (0, 1), out
    assert out.startswith("healthy: ")
    assert stack.policy.requests == [b"PING\n"], "the daemon's request, write side shut down"
    assert stack.smtp.lines == [b"QUIT\r\n"] and stack.imap.lines == [b"h LOGOUT\r\n"]


def test_multi_line_smtp_greeting_is_healthy(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(smtp=b"220-mail.example.org ESMTP\r\n220 welcome\r\n")
    assert stack.check()[0] == 0


@pytest.mark.parametrize("down", ["policy", "smtp", "imap"])
def test_each_one_down_is_unhealthy_and_named(make_stack: Callable[..., Stack], down: str) -> None:
    stack = make_stack()
    servers: dict[str, Greeter | PolicyServer] = {
        "policy": stack.policy, "smtp": stack.smtp, "imap": stack.imap
    }  # fmt: skip
    stop(servers[down])
    code, out, _ = stack.check()
    assert code == 1
    assert out.count("\n") == 1 and out.startswith("unhealthy: "), out
    assert NAMES[down] in out
    assert [n for n in NAMES if NAMES[n] in out] == [down], "only the one that is down"
    # policy: the socket file is left (a stale socket): connect is refused
    assert "connection refused" in out


def test_missing_socket_is_named(make_stack: Callable[..., Stack], short_dir: Path) -> None:
    stack = make_stack()
    code, out, _ = stack.check(sock=short_dir / "nothing.sock")
    assert code == 1 and "policy daemon" in out and "no such socket" in out


@pytest.mark.parametrize(
    ("server", "kwargs"),
    [
        ("policy", {"policy": b"DEFER 451 4.3.0 temporary local problem\n"}),
        ("policy", {"policy": b""}),
        ("smtp", {"smtp": b"554 5.7.1 go away\r\n"}),
        ("smtp", {"smtp": b"2200 not a greeting\r\n"}),
        ("imap", {"imap": b"* BYE too many connections\r\n"}),
    ],
)
def test_wrong_answers_are_unhealthy(
    make_stack: Callable[..., Stack], server: str, kwargs: dict[str, bytes]
) -> None:
    stack = make_stack(**kwargs)
    code, out, _ = stack.check()
    assert code == 1, out
    assert [n for n in NAMES if NAMES[n] in out] == [server], out


def test_a_hanging_server_is_cut_off_by_the_timeout(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(policy=None, imap=None)
    code, out, elapsed = stack.check(env={"MAILPOLICY_HEALTH_TIMEOUT": "0.5"})
    assert code == 1
    assert "policy daemon" in out and "dovecot (imap" in out and "exim (smtp" not in out
    assert "no answer within 0.5 s" in out
    assert elapsed < 2.5


def test_default_timeout_is_three_seconds(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(smtp=None)
    code, out, elapsed = stack.check()
    assert code == 1 and "no answer within 3 s" in out
    assert 2.9 <= elapsed < 6


@pytest.mark.parametrize(
    "env",
    [
        {"MAILPOLICY_HEALTH_PORT_OFFSET": "x"},
        {"MAILPOLICY_HEALTH_TIMEOUT": "0"},
        {"MAILPOLICY_HEALTH_PORT_OFFSET": "65500"},
    ],
)
def test_bad_settings_are_unhealthy(make_stack: Callable[..., Stack], env: dict[str, str]) -> None:
    code, out, _ = make_stack().check(env=env)
    assert code == 1 and out.startswith("unhealthy: bad MAILPOLICY_HEALTH_")


@pytest.mark.integration
def test_healthy_against_the_real_daemon(
    make_stack: Callable[..., Stack], start_daemon: Callable[..., Daemon], tree: Path
) -> None:
    stack = make_stack()
    daemon = start_daemon(tree)
    code, out, _ = stack.check(sock=daemon.socket)
    assert code == 0, out
    daemon.stop()
    code, out, _ = stack.check(sock=daemon.socket)
    assert code == 1 and "policy daemon" in out


# --- SmartOS ------------------------------------------------------------------------------------

MIBE_KEYS = ["name", "organization", "brand", "version", "description", "homepage", "users"]


def test_mibe_manifest_has_its_keys_and_the_project_version() -> None:
    script = '. "$1" && printf "%s\\0" ' + " ".join(f'"${{{k}:-}}"' for k in MIBE_KEYS)
    done = subprocess.run(
        ["bash", "-o", "nounset", "-c", script, "bash", str(SMARTOS / "manifest")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    values = dict(zip(MIBE_KEYS, done.stdout.split("\0")[:-1], strict=True))
    assert [k for k, v in values.items() if not v] == [], "every mibe manifest key set"
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", values["name"])
    assert {"root", "admin"} <= set(values["users"].split())
    with (REPO / "pyproject.toml").open("rb") as f:
        assert values["version"] == tomllib.load(f)["project"]["version"]


def test_pkgsrc_package_list() -> None:
    names = []
    for line in (SMARTOS / "packages").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue  # mibe drops only whole-line comments
        assert re.fullmatch(r"[a-z0-9][a-z0-9+._-]*", line), f"one package name a line: {line!r}"
        names.append(line)
    wanted = {"exim", "dovecot", "dovecot-pigeonhole", "clamav", "spamassassin", "python311",
              "py311-pip", "openssl", "gtar"}  # fmt: skip
    assert wanted <= set(names)
    assert "supervisor" not in " ".join(names), "SMF runs the services on SmartOS"


def test_customize_imports_the_shipped_smf_manifests() -> None:
    text = (SMARTOS / "customize").read_text()
    assert text.startswith("#!/usr/bin/bash\n")
    assert os.access(SMARTOS / "customize", os.X_OK)
    # Its simple commands, with the script's assignments (home=..., manifest=...) expanded.
    for name, value in re.findall(r"^(\w+)=(/\S+)$", text, re.MULTILINE):
        text = text.replace(f"${{{name}}}", value)
    commands = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):  # heredoc bodies and the like
            commands.append(shlex.split(line, comments=True))
    paths = [c[2] for c in commands if c[:2] == ["svccfg", "import"]]
    assert paths, "customize imports the SMF manifest"
    for path in paths:
        assert (SMARTOS / "copy" / path.lstrip("/")).is_file(), f"{path} is not in copy/"
    shipped = {f"/{p.relative_to(SMARTOS / 'copy')}" for p in SMF_DIR.glob("*.xml")}
    assert shipped == set(paths)
    venv = f"{INSTALL_DIR}/.venv"
    assert ["python3.11", "-m", "venv", "--system-site-packages", "--without-pip", venv] in commands
    # Editable, as scripts/setup.sh installs it: the renderers read the templates beside it.
    pip = [f"{venv}/bin/python", "-m", "pip", "install", "--no-cache-dir", "-e", INSTALL_DIR]
    assert pip in commands
    assert text.rstrip().endswith("sm-prepare-image -y"), "mibe's last step"


def test_smf_manifest_runs_the_venv_daemon() -> None:
    manifests = sorted(SMF_DIR.glob("*.xml"))
    assert manifests
    for path in manifests:
        bundle = ET.parse(path).getroot()
        assert (bundle.tag, bundle.get("type")) == ("service_bundle", "manifest")
        for service in bundle.iter("service"):
            methods = {m.get("name"): m.get("exec", "") for m in service.iter("exec_method")}
            assert {"start", "stop"} <= set(methods)
            props = {
                f"{group.get('name')}/{prop.get('name')}": prop.get("value")
                for group in service.iter("property_group")
                for prop in group.iter("propval")
            }
            for exec_ in methods.values():  # every %{group/prop} token names a property
                for token in re.findall(r"%\{([^}]+)\}", exec_):
                    assert token in props, f"{path.name}: {token} undefined"
            start = shlex.split(methods["start"])
            assert start[0] == f"{INSTALL_DIR}/.venv/bin/mailpolicy"
            assert start[1] == "serve"
            assert props["startd/duration"] == "child", "serve stays in the foreground"
            config = start[start.index("--config") + 1]
            assert config == "%{config/file}"
            assert props["config/file"] == "/etc/mailpolicy/mailpolicy.toml"


@dataclass
class Zone:
    dir: Path
    home: Path
    bin: Path
    log: Path

    def boot(self, **env: str) -> tuple[int, str, list[dict[str, Any]]]:
        """Source the include as zoneinit does: bash, errexit and nounset, log() given."""
        script = (
            'log() { printf "LOG %s\\n" "$*"; }\n. "$1"\necho "DONE ${mailpolicy_home-unset}"\n'
        )
        base = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "FAKE_LOG": str(self.log),
            "MAILPOLICY_HOME": str(self.home),
            "FAKE_STDOUT_zonename": "1df6e2c1-5f58-4c2e-a3b4-d8d0b9b2a0b1",
            "FAKE_STDOUT_zfs": "/zones/1df6e2c1-5f58-4c2e-a3b4-d8d0b9b2a0b1/data",
        }
        self.log.write_text("")
        done = subprocess.run(
            ["bash", "-o", "errexit", "-o", "nounset", "-c", script, "bash", str(INCLUDE)],
            env={**base, **env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return done.returncode, done.stdout + done.stderr, calls


SVCS = """#!/bin/sh
# svcs -H -o fmri NAME: succeeds for the names in FAKE_SVCS
for known in $FAKE_SVCS; do
    [ "$4" = "$known" ] && echo "$known" && exit 0
done
echo "svcs: Pattern '$4' doesn't match any instances" >&2
exit 1
"""


@pytest.fixture
def zone(tmp_path: Path) -> Zone:
    z = Zone(tmp_path, tmp_path / "opt-mailpolicy", tmp_path / "bin", tmp_path / "calls.jsonl")
    install_fake(z.home / ".venv" / "bin" / "mailpolicy")
    for name in ("zonename", "zfs", "svcadm"):
        install_fake(z.bin / name)
    install_fake(z.bin / "svcs", SVCS)
    return z


def test_zoneinit_include_mounts_provisions_and_enables(zone: Zone) -> None:
    code, out, calls = zone.boot(FAKE_SVCS="svc:/application/mailpolicy:default pkgsrc/exim")
    assert code == 0, out
    assert "DONE unset" in out, "zoneinit goes on; the include leaves no variables behind"
    uuid = "1df6e2c1-5f58-4c2e-a3b4-d8d0b9b2a0b1"
    zfs = [c["argv"] for c in calls if c["prog"] == "zfs"]
    assert zfs[0] == ["list", "-H", "-o", "name", f"zones/{uuid}/data"]
    assert ["set", "mountpoint=/srv/mail", f"zones/{uuid}/data"] in zfs
    [provision] = [c for c in calls if c["prog"] == "mailpolicy"]
    # No --metadata: on SmartOS provision reads mdata-get.
    assert provision["argv"] == ["provision", "--root", "/srv/mail", "--etc", "/etc"]
    assert str(provision["path"]).startswith("/opt/local/sbin:/opt/local/bin:")
    order = [c["prog"] for c in calls]
    assert order.index("mailpolicy") < order.index("svcadm")
    enabled = [c["argv"] for c in calls if c["prog"] == "svcadm"]
    assert enabled == [
        ["enable", "-r", "svc:/application/mailpolicy:default"],
        ["enable", "-r", "pkgsrc/exim"],
    ]
    assert "no SMF service pkgsrc/dovecot" in out


def test_zoneinit_include_leaves_a_mounted_dataset_alone(zone: Zone) -> None:
    code, out, calls = zone.boot(FAKE_SVCS="", FAKE_STDOUT_zfs="/srv/mail")
    assert code == 0, out
    assert not [c for c in calls if c["prog"] == "zfs" and c["argv"][0] == "set"]


def test_zoneinit_include_without_a_delegated_dataset(zone: Zone) -> None:
    code, out, calls = zone.boot(FAKE_SVCS="", FAKE_STATUS_zfs="1")
    assert code == 0, out
    assert "no delegated dataset" in out
    assert [c["argv"][0] for c in calls if c["prog"] == "zfs"] == ["list"]
    assert len([c for c in calls if c["prog"] == "mailpolicy"]) == 1


def test_zoneinit_include_enables_nothing_when_provisioning_fails(zone: Zone) -> None:
    code, out, calls = zone.boot(
        FAKE_SVCS="svc:/application/mailpolicy:default", FAKE_STATUS_mailpolicy="2",
        FAKE_MESSAGE="mailpolicy provision: bad metadata in mdata-get, nothing changed:",
    )  # fmt: skip
    assert code == 1
    assert "bad metadata in mdata-get" in out and "provision failed" in out
    assert "DONE" not in out
    assert [c for c in calls if c["prog"] == "svcadm"] == []
