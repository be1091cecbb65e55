"""Webhooks: where they may go (targets), the bytes they carry (payload), how they are signed (signing).
No Temporal here; the delivery activity (activities/delivery.py) and its workflow put these together."""
