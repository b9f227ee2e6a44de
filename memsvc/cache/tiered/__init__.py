"""The tiered cache: sink and hot exact, warm 8-bit, cold packed blocks retrieved by their summaries
(cache.py; a layer: layer.py with attend.py and settle.py; cold blocks: cold.py, blockcache.py; its stored
form: pages.py, partcodec.py, load.py; older stored layouts: upgrade.py)."""
