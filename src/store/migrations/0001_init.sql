-- Keygate main store, version 1. Times are unix seconds (UTC).
CREATE TABLE tenants (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL,
    private_key     BLOB NOT NULL,          -- PKCS#8 DER, RSA-2048
    public_key_xml  TEXT NOT NULL,
    created         INTEGER NOT NULL
);
CREATE TABLE products (
    id                    INTEGER PRIMARY KEY,
    tenant_id             INTEGER NOT NULL REFERENCES tenants(id),
    name                  TEXT NOT NULL,
    trial_feature         INTEGER,          -- which of F1..F8 means "trial"
    time_limited_feature  INTEGER,          -- which of F1..F8 means "time-limited"
    created               INTEGER NOT NULL
);
CREATE TABLE customers (
    id            INTEGER PRIMARY KEY,
    tenant_id     INTEGER NOT NULL REFERENCES tenants(id),
    name          TEXT,
    email         TEXT,
    company_name  TEXT,
    created       INTEGER NOT NULL
);
CREATE TABLE license_keys (
    global_id           INTEGER PRIMARY KEY,
    product_id          INTEGER NOT NULL REFERENCES products(id),
    id                  INTEGER NOT NULL,   -- per-product key number (ID)
    key                 TEXT NOT NULL,
    created             INTEGER NOT NULL,
    expires             INTEGER NOT NULL,
    period              INTEGER NOT NULL,
    features            INTEGER NOT NULL,   -- F1..F8 as bits 0..7
    notes               TEXT,
    block               INTEGER NOT NULL,
    customer_id         INTEGER REFERENCES customers(id),
    trial_activation    INTEGER NOT NULL,
    max_no_of_machines  INTEGER NOT NULL,
    allowed_machines    TEXT NOT NULL,
    trial_machine_code  TEXT,               -- set on keys made by CreateTrialKey
    UNIQUE (product_id, id),
    UNIQUE (product_id, key)
);
CREATE UNIQUE INDEX license_keys_trial ON license_keys (product_id, trial_machine_code)
    WHERE trial_machine_code IS NOT NULL;
CREATE TABLE data_objects (
    id             INTEGER PRIMARY KEY,
    key_global_id  INTEGER NOT NULL REFERENCES license_keys(global_id),
    name           TEXT NOT NULL,
    string_value   TEXT NOT NULL,
    int_value      INTEGER NOT NULL
);
CREATE INDEX data_objects_key ON data_objects (key_global_id);
CREATE TABLE tokens (
    id            INTEGER PRIMARY KEY,
    tenant_id     INTEGER NOT NULL REFERENCES tenants(id),
    hash          BLOB NOT NULL UNIQUE,     -- SHA-256 of the token; the token itself is never stored
    methods       INTEGER NOT NULL,
    product_lock  INTEGER,
    key_lock      INTEGER,
    feature_lock  INTEGER NOT NULL,
    description   TEXT NOT NULL,
    created       INTEGER NOT NULL
);
CREATE TABLE activations (
    key_global_id     INTEGER NOT NULL REFERENCES license_keys(global_id),
    floating          INTEGER NOT NULL,     -- 0 node-locked, 1 floating seat
    machine_code      TEXT NOT NULL,
    kind              INTEGER NOT NULL,     -- 0 node-locked, 1 floating, 2 overdraft
    ip                TEXT NOT NULL,        -- client IP
    proxy_ip          TEXT NOT NULL,        -- edge node that served it
    time              INTEGER NOT NULL,     -- first activation
    friendly_name     TEXT NOT NULL,
    floating_expires  INTEGER NOT NULL,
    seq               INTEGER NOT NULL,     -- insertion order, so responses list machines stably
    PRIMARY KEY (key_global_id, floating, machine_code)
);
CREATE TABLE request_log (
    id                INTEGER PRIMARY KEY,
    tenant_id         INTEGER,
    product_id        INTEGER,
    key_id            INTEGER,
    client_ip         TEXT NOT NULL,
    proxy_ip          TEXT NOT NULL,
    time              INTEGER NOT NULL,
    machine_code      TEXT NOT NULL,
    friendly_name     TEXT NOT NULL,
    state             INTEGER NOT NULL,
    floating_expires  INTEGER NOT NULL
);
CREATE INDEX request_log_product ON request_log (product_id, id);
-- Control-plane change feed: running nodes poll it and reload what changed.
CREATE TABLE changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    entity     TEXT NOT NULL,               -- tenant | product | key | token
    entity_id  INTEGER NOT NULL
);
