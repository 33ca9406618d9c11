-- Batches of node writes already committed, so a batch retried after an unclear failure (or
-- replayed from a node's journal) is written once.
CREATE TABLE ingested_batches (
    node   INTEGER NOT NULL,
    batch  INTEGER NOT NULL,
    time   INTEGER NOT NULL,
    PRIMARY KEY (node, batch)
);
