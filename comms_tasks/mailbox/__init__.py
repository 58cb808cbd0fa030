"""What comes back: therapists' replies, automatic answers and bounces, read from the mailbox."""
