-- mailsrv user store, version 3 (PostgreSQL).  Keep in step with sqlite/0003_greylist_domains.sql.
-- Sender domains whose mail has passed greylisting (mailsrv.screening.greylist): a later
-- message from such a domain that passes SPF is not greylisted.  expires is when the row may
-- be removed (renewed by every message of the domain that passes).

CREATE TABLE greylist_domains (
    domain  TEXT PRIMARY KEY,
    expires DOUBLE PRECISION NOT NULL
);

CREATE INDEX greylist_domains_expires ON greylist_domains (expires);
