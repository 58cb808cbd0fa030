"""Operator code the worker never loads: reports, the demo and its history and mail.
May import any stage; only the ``comms`` command imports it."""
