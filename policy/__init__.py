"""mailpolicy: the acceptance policy of an Exim + Dovecot mail server, as one daemon.

Read the package like the request flow (docs/flow.md): ``protocol`` turns a request line into a
``Request``; ``pipeline`` runs the stage's checks (``checks/``) against a ``mailtree.Snapshot`` of
the admin's list files; the result is a ``verdict.Verdict`` that ``protocol`` renders as one reply
line. ``daemon`` is the transport only; ``cli`` wires the admin commands.
"""

__version__ = "0.1.0"
