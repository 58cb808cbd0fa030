"""Follow-up phone calls: the check for unanswered emails, booking in free slots, and
outcomes. May import emails (a call's outcome answers its email's requests)."""
