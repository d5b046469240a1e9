"""Outbound relay: the durable queue, the next-hop client, retry and bounces."""
