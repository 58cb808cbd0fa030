"""Retention and erasure across every copy (emails, calls, mail, dead letters, the SMTP
outbox) and ids-only task reprs. May import emails, calls and mailbox."""
