-- Object lock: a locked token cannot be deleted until it is unlocked.
ALTER TABLE tokens ADD COLUMN locked INTEGER NOT NULL DEFAULT 0;
