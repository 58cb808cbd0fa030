"""The life of an Email row, from the weekly batch to its answer: tasks, composing, the
weekly batch, delivery and its re-checks, answers. Delivery of one message is ``mail/``."""
