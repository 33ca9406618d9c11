-- Object lock: a locked product cannot be deleted until it is unlocked.
ALTER TABLE products ADD COLUMN locked INTEGER NOT NULL DEFAULT 0;
