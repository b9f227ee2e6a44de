-- 004: where clients reach a lease's owner (host:port, '' unknown), so that a replica that cannot take a live
-- lease can tell the client where the session is served (its ABORTED status names the owner and this address).

ALTER TABLE leases ADD COLUMN address text NOT NULL DEFAULT '';
