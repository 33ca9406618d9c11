-- The request log is indexed per block of ids instead of per row: a batch of rows takes a
-- fresh block of consecutive ids (at most 256 per block), and for each tenant (kind 0) and
-- product (kind 1) in the block one span names the first and last id of its rows there.
-- Reading a tenant's or a product's rows walks its spans and reads each span's id range from
-- the table itself. Two index entries per row (about 5 % of a re-activation's CPU on one
-- core) become a few span rows per batch.
CREATE TABLE request_log_spans (
    kind      INTEGER NOT NULL,
    owner     INTEGER NOT NULL,
    first_id  INTEGER NOT NULL,
    last_id   INTEGER NOT NULL,
    PRIMARY KEY (kind, owner, first_id)
) WITHOUT ROWID;
INSERT INTO request_log_spans (kind, owner, first_id, last_id)
    SELECT 0, tenant_id, MIN(id), MAX(id) FROM request_log
    WHERE tenant_id IS NOT NULL GROUP BY tenant_id, id / 256;
INSERT INTO request_log_spans (kind, owner, first_id, last_id)
    SELECT 1, product_id, MIN(id), MAX(id) FROM request_log
    WHERE product_id IS NOT NULL GROUP BY product_id, id / 256;
-- The next id a batch takes: ids are never used twice, even after rows are deleted, so an
-- old span never overlaps a new one.
CREATE TABLE request_log_ids (next INTEGER NOT NULL);
INSERT INTO request_log_ids (next) SELECT COALESCE(MAX(id), 0) + 1 FROM request_log;
DROP INDEX request_log_product;
DROP INDEX request_log_tenant;
