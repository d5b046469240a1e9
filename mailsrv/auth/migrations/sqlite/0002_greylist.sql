-- mailsrv user store, version 2 (SQLite).  Keep in step with postgresql/0002_greylist.sql.
-- Greylisting state (mailsrv.screening.greylist), shared by every node on this database:
-- one row per (client network, sender, recipient) triplet.  passed is 0 until a retry came
-- after the delay; expires is when the row may be removed (the end of the retry window for
-- a triplet that has not passed, the end of its lifetime for one that has).

CREATE TABLE greylist (
    triplet    TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    passed     INTEGER NOT NULL,
    expires    REAL NOT NULL
);

CREATE INDEX greylist_expires ON greylist (expires);
