-- A tenant's own request-log retention in days (0 = keep); NULL follows the node's
-- `privacy.log_retention_days`.
ALTER TABLE tenants ADD COLUMN log_retention_days INTEGER;
