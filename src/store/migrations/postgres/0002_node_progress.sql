-- How far each node's activation log (data_dir/wal) is in the store: changes up to `wal_seq`
-- are committed, so a node replaying its log after a crash skips them.
CREATE TABLE node_progress (
    node     BIGINT PRIMARY KEY,
    wal_seq  BIGINT NOT NULL
);
-- GetWebAPILog reads a tenant's rows newest first.
CREATE INDEX request_log_tenant ON request_log (tenant_id, id);
