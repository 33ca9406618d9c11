-- Administrative actions, append-only: who did what to which entity, and when. Secrets
-- (tokens, private keys) are never written here, only the entity's id.
CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY,
    time       INTEGER NOT NULL,
    actor      TEXT NOT NULL,
    action     TEXT NOT NULL,   -- tenant.create, product.create, customer.create, key.create, key.block, key.unblock, token.create
    entity     TEXT NOT NULL,
    entity_id  INTEGER NOT NULL
);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
