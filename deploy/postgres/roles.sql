-- Least privilege for Keygate on PostgreSQL.
--
-- Two roles: the database owner runs `keygate migrate` and the control plane (the `keygate`
-- CLI: tenants, products, keys, tokens, privacy requests); `keygate_edge` is what every
-- `keygate serve` node connects as. Run this as the owner after `keygate migrate`, and again
-- after a migration that adds tables. Set the edge role's password out of band:
--   ALTER ROLE keygate_edge PASSWORD '...';
--
-- The edge role reads what it serves from; it writes activations, its request log and its
-- own progress; it creates trial keys (CreateTrialKey) and moves a trial key's expiry. It
-- cannot change tenants, products, customers or tokens, delete or rewrite log rows (beyond
-- the retention rule's blanking), run DDL, or do anything to the audit log but append.
-- tests/it/pg_store.rs serves real traffic as this role and checks what it is refused.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'keygate_edge') THEN
        CREATE ROLE keygate_edge LOGIN;
    END IF;
END $$;

REVOKE ALL ON ALL TABLES IN SCHEMA public FROM keygate_edge;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO keygate_edge;

-- What a node loads and polls.
GRANT SELECT ON schema_migrations, tenants, products, customers, license_keys, data_objects,
    tokens, activations, changes, node_progress, ingested_batches, request_log,
    request_log_spans TO keygate_edge;

-- Activations: the node's own writes (upsert, deactivation, expired floating leases).
GRANT INSERT, UPDATE, DELETE ON activations TO keygate_edge;

-- The request log: appended (binary COPY, with a span per tenant and product and block of
-- ids), blanked by the retention rule, read by GetWebAPILog.
GRANT INSERT ON request_log, request_log_spans TO keygate_edge;
GRANT UPDATE (machine_code, friendly_name, client_ip) ON request_log TO keygate_edge;

-- Exactly-once bookkeeping of the node's batches and activation log.
GRANT INSERT, DELETE ON ingested_batches TO keygate_edge;
GRANT INSERT, UPDATE ON node_progress TO keygate_edge;

-- CreateTrialKey: a new key (noted in the change feed and the audit log); trial activation
-- moves a key's expiry.
GRANT INSERT ON license_keys TO keygate_edge;
GRANT UPDATE (expires, shared_version) ON license_keys TO keygate_edge;
GRANT INSERT ON changes, audit_log TO keygate_edge;

-- Identity columns of the tables it inserts into.
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO keygate_edge;
