"""Messages in: validate, apply once, retry an outage, dead letters and replay, stray
messages, checks shared by commands. Imports the foundation and events only."""
