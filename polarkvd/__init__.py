"""polarkvd: a KV-cache node agent for LLM inference.

One daemon per host owns the host's KV-cache tiers (DRAM in a shared-memory arena, compressed pages on
disk) and serves inference engines that attach over a local socket. See README.md and docs/.
"""

__version__ = "0.1.0"
