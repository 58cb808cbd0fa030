"""Moving what a poll fetched from a full Maildir inbox: each move is one rename.

``make bench`` applies 10,000 messages from one Maildir; when every move listed the
whole inbox again to find its file, a poll cost the square of the inbox's size and the
moves were 40 % of the mailbox stage.
"""

from __future__ import annotations

import mailbox as stdlib_mailbox
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comms_tasks.mailbox.maildir import MaildirSource
from comms_tasks.mailbox.sources import REPLIES, UNMATCHED
from tests.mailbox.conftest import message, subject_of

INBOX = 300


class ScandirCounter:
    """Counts the directory entries os.scandir yields, and yields them (a spy, not a mock:
    the real scan runs; counting is the only way to see how much a move reads)."""

    def __init__(self) -> None:
        self.entries = 0
        self._scandir = os.scandir

    def __call__(self, path: Any) -> Iterator[os.DirEntry[str]]:
        with self._scandir(path) as entries:
            for entry in entries:
                self.entries += 1
                yield entry


def full_inbox(root: Path) -> MaildirSource:
    box = stdlib_mailbox.Maildir(root, create=True)
    for number in range(INBOX):
        box.add(message(f"Antwort {number}"))
    return MaildirSource(root, max_bytes=10 * 1024 * 1024)


def test_moving_fetched_messages_does_not_list_the_inbox_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = full_inbox(tmp_path / "mail")
    with source:
        fetched = source.fetch_new(INBOX)
        assert len(fetched) == INBOX
        counter = ScandirCounter()
        monkeypatch.setattr(os, "scandir", counter)
        for item in fetched:
            source.move(item.key, REPLIES)
        monkeypatch.undo()
        # Listing the inbox for each move read 300 + 299 + ... entries (45,150).
        assert counter.entries < INBOX
        assert source.fetch_new(INBOX) == []
    replies = stdlib_mailbox.Maildir(tmp_path / "mail" / ".Processed.Replies", create=False)
    assert sorted(subject_of(replies.get_bytes(key)) for key in replies.iterkeys()) == sorted(
        f"Antwort {number}" for number in range(INBOX)
    )


def test_a_fetched_message_renamed_since_is_still_found_and_moved(tmp_path: Path) -> None:
    source = full_inbox(tmp_path / "mail")
    with source:
        first, second = source.fetch_new(2)
        # A reader flagged the first one seen meanwhile: its file now has another name.
        [path] = [p for p in (tmp_path / "mail" / "new").iterdir() if p.name == first.key]
        cur = tmp_path / "mail" / "cur" / f"{first.key}:2,S"
        path.rename(cur)
        source.move(first.key, UNMATCHED)
        assert (tmp_path / "mail" / ".Unmatched" / "cur" / cur.name).is_file()
        # Moved twice (a crash between commit and move): the second finds nothing.
        source.move(second.key, REPLIES)
        source.move(second.key, REPLIES)
        assert len(list((tmp_path / "mail" / ".Processed.Replies" / "new").iterdir())) == 1
        assert len(source.fetch_new(INBOX)) == INBOX - 2


def test_a_folder_another_source_is_still_making_is_finished_and_used(tmp_path: Path) -> None:
    """Two polls make a folder at the same moment: one finds it half made (no cur/)."""
    root = tmp_path / "mailbox"
    box = stdlib_mailbox.Maildir(root, create=True)
    box.add(message("Antwort 1"))
    (root / ".Processed.Replies").mkdir()  # made by the other source, nothing in it yet

    with MaildirSource(root, max_bytes=1024 * 1024) as source:
        [fetched] = source.fetch_new(10)
        source.move(fetched.key, REPLIES)
        assert source.fetch_new(10) == []

    replies = stdlib_mailbox.Maildir(root / ".Processed.Replies", create=False)
    assert [subject_of(replies.get_bytes(key)) for key in replies.iterkeys()] == ["Antwort 1"]
