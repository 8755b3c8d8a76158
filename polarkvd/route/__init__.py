"""`polarkvd route`: an OpenAI-compatible HTTP router in front of several engines, sending each
request where the least prefill is left to do (docs/ROUTING.md, "polarkvd route").

A top-level application: it uses the daemon's KV-event tracker and, through `polarkvd.client`, the
daemon's `where`; nothing in the daemon imports it. aiohttp is its optional dependency (`[route]`).
"""
