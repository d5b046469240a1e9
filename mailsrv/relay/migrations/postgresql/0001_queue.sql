-- mailsrv cluster queue, version 1 (PostgreSQL only: the embedded queue is files).
-- One row per queued message: its record (the JSON of mailsrv.relay.records, the same as the
-- file queue's), its body stored once, when a waiting recipient is next due, and the lease of
-- the node working on it.  Times are seconds since the epoch, from the nodes' clocks.
-- ``version`` grows with every write: a node writes only over the version it read, so an
-- operator's change (mailsrv queue hold, on any node) is never overwritten by a node's.

CREATE TABLE queue_messages (
    queue_id    TEXT PRIMARY KEY,
    record      JSONB NOT NULL,
    body        BYTEA NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    next_due    DOUBLE PRECISION NULL,
    lease_node  TEXT NULL,
    lease_until DOUBLE PRECISION NULL,
    version     BIGINT NOT NULL DEFAULT 0
);

-- What the claim query walks: messages with a recipient to try, by due time.
CREATE INDEX queue_messages_due ON queue_messages (next_due) WHERE next_due IS NOT NULL;
CREATE INDEX queue_messages_lease ON queue_messages (lease_node) WHERE lease_node IS NOT NULL;

-- Connections open to a destination, cluster-wide: a node takes a slot before it connects and
-- renews it with its leases, so the per-destination limit holds across nodes.
CREATE TABLE queue_slots (
    destination TEXT NOT NULL,
    node        TEXT NOT NULL,
    slot        TEXT NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (destination, node, slot)
);

CREATE TABLE queue_schema_version (
    version INTEGER NOT NULL
);
