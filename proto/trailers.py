"""The trailing metadata MemoryService sets on a failed call, for clients to act on (beside the status's message,
which is for people). Part of the wire contract, like memsvc.proto; plain strings, no imports.

OWNER          the replica serving the session (its lease owner name, host:pid:tag), on ABORTED when another
               replica holds the session's lease.
OWNER_ADDRESS  where clients reach that replica (host:port, as it advertises), when it gave one.
RETRY_SAFE     "1" when the call changed nothing stored (it failed before any write, or its write was rolled
               back), on ABORTED and UNAVAILABLE: the same call may be sent again. Absent when a write may have
               landed (e.g. the database was lost at COMMIT): repeating an Append then could store it twice.
"""
OWNER = "memsvc-owner"
OWNER_ADDRESS = "memsvc-owner-address"
RETRY_SAFE = "memsvc-retry-safe"
