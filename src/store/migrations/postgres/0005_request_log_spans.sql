-- The request log is indexed per block of ids instead of per row (see the SQLite migration
-- 0010): a block is one value of the sequence below, which steps by 256, so blocks taken by
-- nodes writing at the same time never overlap.
CREATE TABLE request_log_spans (
    kind      BIGINT NOT NULL,
    owner     BIGINT NOT NULL,
    first_id  BIGINT NOT NULL,
    last_id   BIGINT NOT NULL,
    PRIMARY KEY (kind, owner, first_id)
);
INSERT INTO request_log_spans (kind, owner, first_id, last_id)
    SELECT 0, tenant_id, MIN(id), MAX(id) FROM request_log
    WHERE tenant_id IS NOT NULL GROUP BY tenant_id, id / 256;
INSERT INTO request_log_spans (kind, owner, first_id, last_id)
    SELECT 1, product_id, MIN(id), MAX(id) FROM request_log
    WHERE product_id IS NOT NULL GROUP BY product_id, id / 256;
CREATE SEQUENCE request_log_ids INCREMENT BY 256;
SELECT setval('request_log_ids', COALESCE((SELECT MAX(id) FROM request_log), 0) + 1, false);
ALTER TABLE request_log ALTER COLUMN id DROP IDENTITY;
DROP INDEX request_log_product;
DROP INDEX request_log_tenant;
