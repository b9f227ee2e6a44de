-- 003: fencing epochs from one sequence, so an epoch is never given twice, not even after a lease row goes
-- (a release or a delete of its session removes it): a paused old owner's epoch can never match a new lease.

CREATE SEQUENCE lease_epochs AS bigint;
