-- mailsrv user store, version 1 (SQLite).  Keep in step with postgresql/0001_initial.sql.
-- Logins and alias addresses are stored lower-cased; an address is either a login or an
-- alias, never both (checked by the store inside the writing transaction).

CREATE TABLE accounts (
    login         TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    cram_md5      TEXT NULL,
    enabled       BOOLEAN NOT NULL,
    send_as_any   BOOLEAN NOT NULL,
    created       REAL NOT NULL,
    updated       REAL NOT NULL
);

CREATE TABLE aliases (
    address TEXT PRIMARY KEY,
    login   TEXT NOT NULL REFERENCES accounts (login) ON DELETE CASCADE,
    created REAL NOT NULL
);

CREATE INDEX aliases_login ON aliases (login);

CREATE TABLE schema_version (
    version INTEGER NOT NULL
);
