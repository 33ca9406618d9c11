-- A change can carry a detail for the nodes; for an erased machine it is the SHA-256 of the
-- machine code, so the feed itself never holds the personal data it asks nodes to forget.
ALTER TABLE changes ADD COLUMN detail TEXT;
