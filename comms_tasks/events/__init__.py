"""Events out: the outbox written in each change's transaction, and ``comms.relay_outbox``
that publishes it. Imports the foundation only."""
