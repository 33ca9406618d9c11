-- The activation upsert numbers a license's new machine after its highest `seq`
-- (`SELECT MAX(seq) FROM activations WHERE key_global_id = ?`). Through the primary key that
-- read every machine of the license, so on a license with thousands of machines each new one
-- cost the store writer thousands of row reads; with this index it is one seek.
-- A plain CREATE INDEX blocks writes to `activations` while it builds (CONCURRENTLY cannot run
-- in the migration's transaction). On a large table, build it beforehand with
-- `CREATE INDEX CONCURRENTLY activations_seq ON activations (key_global_id, seq);` and this
-- step finds it.
CREATE INDEX IF NOT EXISTS activations_seq ON activations (key_global_id, seq);
