-- The activation upsert numbers a license's new machine after its highest `seq`
-- (`SELECT MAX(seq) FROM activations WHERE key_global_id = ?`). Through the primary key that
-- read every machine of the license, so on a license with thousands of machines each new one
-- cost the store writer thousands of row reads; with this index it is one seek.
CREATE INDEX activations_seq ON activations (key_global_id, seq);
