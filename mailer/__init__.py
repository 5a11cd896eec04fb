"""The newsletter system: editions, rendering, delivery, scheduling, web and CLI."""
