"""Rendering the configuration templates (``exim/configure``) with this installation's values.

A template marks each value as ``@@NAME@@``. ``render`` replaces every mark and refuses (raises
RenderError) when a value is missing or a mark is left, so a half-rendered configuration is
never written. Values are checked for characters that would change the meaning of an Exim
configuration line (newlines, and ``@@``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXIM_TEMPLATE = REPO / "exim" / "configure"

_MARK = re.compile(r"@@([A-Z_]+)@@")


class RenderError(Exception):
    pass


def render(template: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        if "\n" in value or "@@" in value:
            raise RenderError(f"value of {name} contains a newline or @@")
    missing = sorted({m for m in _MARK.findall(template) if m not in values})
    if missing:
        raise RenderError(f"no value for {', '.join(missing)}")
    return _MARK.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class EximSite:
    """What differs between installations (and between tests)."""

    root: str  # the mail data tree
    policy_socket: str
    primary_hostname: str
    qualify_domain: str
    log_dir: str
    smtp_port: int = 25
    submission_port: int = 587
    interfaces: tuple[str, ...] = ("0.0.0.0", "::")  # noqa: S104 (a mail server listens)
    # Port of a loopback SMTP sink that gets every non-local message instead of DNS routing
    # (`mailpolicy up` and the tests: nothing may leave the machine). None in production.
    sink_port: int | None = None


def render_exim(site: EximSite, template: str | None = None) -> str:
    text = template if template is not None else EXIM_TEMPLATE.read_text()
    sink = f"LOOPBACK_SINK_PORT = {site.sink_port}" if site.sink_port is not None else ""
    return render(
        text,
        {
            "POLICY_SOCKET": site.policy_socket,
            "ROOT": site.root,
            "SUBMISSION_PORT": str(site.submission_port),
            "REMOTE_DELIVERY_MACRO": sink,
            "PRIMARY_HOSTNAME": site.primary_hostname,
            "QUALIFY_DOMAIN": site.qualify_domain,
            "SMTP_PORTS": f"{site.smtp_port} : {site.submission_port}",
            "LOCAL_INTERFACES": "<; " + " ; ".join(site.interfaces),
            "LOG_DIR": site.log_dir,
        },
    )
