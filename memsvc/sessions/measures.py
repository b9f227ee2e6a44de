"""What the session manager reports of its sessions (a mixin of `SessionManager`): the sessions in memory and
their bytes and tokens per tier (as each call that held one last measured it), the stored sessions' tokens per
tier (as of their last commits), and the shared cold block cache's hits and misses. For GetStats and /metrics.
"""
from __future__ import annotations


class Measures:
    def resident(self) -> tuple[int, int]:
        """(sessions in memory, bytes of KV cache they hold)."""
        with self._global:
            return len(self._live), sum(live.resident_bytes for live in self._live.values())

    def resident_tier_tokens(self) -> dict[str, float]:
        """Tokens per tier, summed over the sessions in memory."""
        return self._sum_tiers("tier_tokens")

    def resident_tier_bytes(self) -> dict[str, int]:
        """Resident bytes per tier, summed over the sessions in memory (they sum to resident()'s bytes)."""
        return self._sum_tiers("tier_bytes")

    def _sum_tiers(self, measure: str) -> dict:
        with self._global:
            lives = list(self._live.values())
        total: dict = {}
        for live in lives:
            for tier, n in getattr(live, measure).items():
                total[tier] = total.get(tier, 0) + n
        return total

    def stored_tier_tokens(self) -> dict[str, float]:
        """Tokens per tier, summed over every stored session as of its last commit (walks every record)."""
        total: dict[str, float] = {}
        after = ""
        while True:
            page = self.store.list_page(after=after, limit=1000)  # a damaged record counts nothing
            for rec in page.records:
                for tier, n in rec.extra.get("cache", {}).get("tier_tokens", {}).items():
                    total[tier] = total.get(tier, 0) + n
            if len(page) < 1000:
                return total
            after = page.last

    def cold_cache(self) -> tuple[int, int]:
        """(hits, misses) of the shared cold block cache since the server started."""
        return self.block_cache.hits, self.block_cache.misses
