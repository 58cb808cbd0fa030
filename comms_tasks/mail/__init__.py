"""Email: rendering, the sender interface, and its SMTP and file backends."""
