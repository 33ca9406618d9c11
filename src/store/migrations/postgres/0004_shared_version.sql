-- Distributed mode: the Redis version of the activations the store holds for each key, so a
-- snapshot from the stream replaces them only when it is newer.
ALTER TABLE license_keys ADD COLUMN shared_version BIGINT NOT NULL DEFAULT 0;
