"""memsvc.repair: integrity of stored sessions (check.py) and their rebuild from the token ids (rebuild.py),
which replays the session's log of model calls (feeds.py)."""
from .check import Check, check_session
from .feeds import FEEDS, recorded_feeds, rle, schedule, unrle
from .rebuild import REPAIR, Repair, Unrepairable, repair_session

__all__ = ["Check", "check_session", "FEEDS", "recorded_feeds", "rle", "schedule", "unrle", "REPAIR", "Repair",
           "Unrepairable", "repair_session"]
