"""Engine-side connectors: they talk to the daemon only through `polarkvd.client`, never the daemon.

Each connector lives in its own module and imports its engine lazily (importing this package does not
import vLLM or SGLang).
"""
