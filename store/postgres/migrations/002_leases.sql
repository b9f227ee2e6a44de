-- 002: leases, for several replicas over one database (issue 23, phase 2).
--
-- A replica serving a session holds its lease: an expiry it renews, on the database's clock, and a fencing
-- epoch that grows with each new owner. A commit made with an epoch (Store.commit(..., epoch=N)) checks it
-- against this row inside its transaction, so an old owner can never overwrite a new owner's turns.
-- A delete of the session removes its lease in the same transaction. No foreign key: a lease may be taken
-- before the session it names is created.

CREATE TABLE leases (
    session_id text COLLATE "C" PRIMARY KEY,
    owner      text NOT NULL,                        -- the replica holding it
    epoch      bigint NOT NULL CHECK (epoch >= 1),
    expires_at timestamptz NOT NULL
);
