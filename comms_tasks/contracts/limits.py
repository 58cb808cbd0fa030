"""The length limits of stored values, in one place.

The contract (:mod:`comms_tasks.contracts.common`) refuses longer values and the columns
(:mod:`comms_tasks.models`) are made as wide as these, so that a value the contract
accepts can always be stored (tests/contracts/test_limits.py checks both).
"""

from __future__ import annotations

# Free text shown to a therapist may be long, but not unbounded: a message is not a file.
MAX_TEXT = 5000
# A name, title, phone number or the producer of an event.
MAX_NAME = 200
# "Frau" or "Herr".
MAX_SALUTATION = 20
# RFC 5321: at most 254 characters in a forward path.
MAX_EMAIL = 254
# The longest display name that can be built from the parts above: salutation, title,
# first and last name, each separated by a space.
MAX_DISPLAY_NAME = MAX_SALUTATION + 3 * MAX_NAME + 3
# Ids of other services are positive 64-bit integers.
MAX_ID = 2**63 - 1
MAX_ID_DIGITS = len(str(MAX_ID))
# Requests (or outcomes) named in one command.
MAX_REQUESTS_PER_MESSAGE = 100
# Subjects: the longest a template makes is 129 characters (a confirmation names at most
# four ids of up to 19 digits, then "und N weitere"; a follow-up to it adds "Re: "), and
# tests/contracts/test_limits.py renders every count of ids to check it stays below this.
MAX_SUBJECT = 300
# Dates and times of messages: wide enough for any real registration or appointment,
# narrow enough that converting to UTC or adding the 14-day horizon never overflows.
MIN_YEAR = 1900
MAX_YEAR = 2199
# Containers within containers of a message (the envelope is level 1): the deepest valid
# message has 5 (envelope, payload, availability, a day's windows, a window).
MAX_NESTING = 32
# A dead letter keeps a message to this depth; anything deeper is replaced by a note.
MAX_STORED_NESTING = 64
# An email's reply token (``antwort+<token>@...``): lower-case base32, 130 random bits.
REPLY_TOKEN_LENGTH = 26
# A plus-addressed reply or bounce address must still be an address: the base leaves
# room for "+" and the token.
MAX_TAGGABLE_EMAIL = MAX_EMAIL - 1 - REPLY_TOKEN_LENGTH
