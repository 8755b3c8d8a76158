"""The connector's options (`kv_connector_extra_config`), validated, and the copy modes."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from polarkvd.errors import ConfigError

if TYPE_CHECKING:
    pass


#: Version of the page format below; part of the layout string, so a change never mixes with old pages.
PAGE_FORMAT = "v1"

#: `load_mode` / `save_mode` values.
COPY_MODES = ("auto", "layer", "step")


def copy_mode(setting: str, cuda: bool) -> str:
    """The copy mode a worker uses: "auto" is layer by layer where the KV caches are on a GPU (its
    copies overlap the GPU's compute), per step on CPU (they would compete with the model's threads)."""
    if setting == "auto":
        return "layer" if cuda else "step"
    return setting


# ------------------------------------------------------------------------------------------ options


@dataclasses.dataclass(frozen=True)
class Options:
    """`kv_connector_extra_config` keys. Unknown keys and bad values refuse to start (ConfigError)."""

    #: The daemon's engine socket; empty = $POLARKV_SOCKET, else the daemon's default runtime dir.
    socket: str = ""
    #: vLLM blocks per polarkvd page (page_tokens = page_blocks * block_size).
    page_blocks: int = 1
    #: Seconds one daemon call may take before the daemon counts as down.
    timeout: float = 5.0
    #: Seconds a commit may take (when longer than `timeout`): with the daemon's disk.write_through
    #: a commit is answered once its pages are on disk and synced, which a busy disk can make slow.
    commit_timeout: float = 60.0
    #: Longest wait between reconnection attempts while the daemon is down (backoff from 0.5 s).
    retry_seconds: float = 5.0
    #: "layer": the daemon answers a load at once and pages from disk or from peers arrive layer by
    #: layer (pipelined); a thread copies each layer as soon as it is there while the model computes
    #: the previous one (wait_for_layer_load waits for one layer). "step": everything is in DRAM
    #: before the answer, and is copied in start_load_kv. "auto": layer on CUDA workers, step on CPU.
    load_mode: str = "auto"
    #: "step": copy saved blocks at wait_for_save; "layer": copy each layer in save_kv_layer;
    #: "auto": layer on CUDA workers, step on CPU.
    save_mode: str = "auto"
    #: A hit with pages on the disk tier or on a peer loads asynchronously (vLLM's async loads): the
    #: request waits while its pages are promoted or fetched and the other requests keep computing.
    #: False: such loads hold the step like DRAM hits. Host (CPU) workers load them on a thread of
    #: their own; CUDA workers in the step, layer-pipelined.
    async_loads: bool = True
    #: Host workers: while the model computes other requests, a background load moves at most this
    #: many bytes per engine step (its pages are asked of the daemon and copied in batches of about
    #: this size, one batch after each step), so the decoding requests keep their cores and memory
    #: bandwidth; when the engine computes nothing the load runs at full speed. 0 = never paced.
    async_load_step_bytes: int = 16 << 20
    #: Also store pages completed while decoding (generated tokens), not only prompt pages: a chat's
    #: next turn then hits its whole history.
    save_decode: bool = True
    #: Overrides the model fingerprint (name@digest of config, dtype and sampled weight bytes).
    model_fingerprint: str = ""
    #: Most namespaces (cache salts) with an open daemon session per process; the oldest is closed.
    max_sessions: int = 64
    #: Engine id shown by `polarkvd status`; empty = vllm-<host>-<pid>.
    engine_id: str = ""
    #: CUDA workers: use the daemon's GPU page pool (L1) when it offers one this process can open:
    #: stores go there first (device to device), and L1 pages load device to device. False: every
    #: page goes through the DRAM arena. No effect on CPU workers or daemons without L1.
    vram: bool = True
    #: The URL this engine serves at (e.g. http://10.0.0.5:8000), reported with its load so a router
    #: can map the engines `polarkvd where` names to servers. Empty: not reported.
    engine_url: str = ""

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> Options:
        extra = dict(extra or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        problems: list[tuple[str, object, str]] = []
        values: dict[str, Any] = {}
        for key, value in extra.items():
            f = fields.get(key)
            if f is None:
                problems.append((key, value, f"unknown option; known: {', '.join(sorted(fields))}"))
                continue
            default = f.default
            try:
                if isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise ValueError("must be true or false")
                elif isinstance(default, int):
                    if isinstance(value, bool) or int(value) != value:
                        raise ValueError("must be an integer")
                    value = int(value)
                elif isinstance(default, float):
                    value = float(value)
                elif not isinstance(value, str):
                    raise ValueError("must be a string")
            except (TypeError, ValueError) as e:
                problems.append((key, value, str(e)))
                continue
            values[key] = value
        opts = cls(**values)
        if opts.page_blocks < 1:
            problems.append(("page_blocks", opts.page_blocks, "must be >= 1"))
        if opts.timeout <= 0:
            problems.append(("timeout", opts.timeout, "must be > 0"))
        if not opts.commit_timeout > 0:
            problems.append(("commit_timeout", opts.commit_timeout, "must be > 0"))
        if opts.retry_seconds <= 0:
            problems.append(("retry_seconds", opts.retry_seconds, "must be > 0"))
        if opts.async_load_step_bytes < 0:
            problems.append(
                ("async_load_step_bytes", opts.async_load_step_bytes, "must be >= 0 (0: not paced)")
            )
        if opts.max_sessions < 1:
            problems.append(("max_sessions", opts.max_sessions, "must be >= 1"))
        for key in ("load_mode", "save_mode"):
            if getattr(opts, key) not in COPY_MODES:
                problems.append(
                    (f"kv_connector_extra_config.{key}", getattr(opts, key), "must be auto, layer or step")
                )
        if problems:
            raise ConfigError(
                [(k if "." in k else f"kv_connector_extra_config.{k}", v, w) for k, v, w in problems]
            )
        return opts
