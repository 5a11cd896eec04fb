"""`mailer dev-sink`: a local SMTP server that keeps what it receives (being written)."""


def dev_sink() -> None:
    """Run the development mail sink."""
    raise SystemExit("not written yet")
