-- mailsrv cluster webhook outbox, version 2: the outbox beside the relay queue.
-- One row per (event, endpoint): the entry (the JSON of mailsrv.webhook.entries, the same as
-- the file outbox's), when it is next due (NULL: dead-lettered, waits for a redrive), and the
-- lease of the node sending it.  A delivered entry is deleted.  A message event's body is
-- stored once in outbox_bodies (by queue id), however many endpoints and event types need
-- it, and goes with the last entry that needs it.

CREATE TABLE outbox_entries (
    entry_key   TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    entry       JSONB NOT NULL,
    body_id     TEXT NULL,
    created_at  DOUBLE PRECISION NOT NULL,
    next_due    DOUBLE PRECISION NULL,
    lease_node  TEXT NULL,
    lease_until DOUBLE PRECISION NULL
);

CREATE INDEX outbox_entries_due ON outbox_entries (next_due) WHERE next_due IS NOT NULL;
CREATE INDEX outbox_entries_event ON outbox_entries (event_id);
CREATE INDEX outbox_entries_body ON outbox_entries (body_id) WHERE body_id IS NOT NULL;

CREATE TABLE outbox_bodies (
    body_id TEXT PRIMARY KEY,
    body    BYTEA NOT NULL
);

-- Endpoints disabled by a 410 Gone, cluster-wide: no node claims their entries until an
-- operator redrives them (or the endpoint's URL changes).
CREATE TABLE outbox_disabled (
    name  TEXT PRIMARY KEY,
    state JSONB NOT NULL
);
