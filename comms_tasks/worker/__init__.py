"""Process hooks the app loads in worker and beat: logs, task runs, delivery counts, the
masked conf command, Flower's guard, beat's heartbeat. May import the foundation and inbound."""
