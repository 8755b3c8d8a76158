"""`polarkvd tui`: the operator dashboard, a Textual app attached to a daemon's control socket.

Talks to the daemon only through `polarkvd.client.ControlClient`, from worker threads; never embeds
or starts a daemon. Layout: `app.py` (the app, its workers and bindings), `model.py`
(pure data: views, rates, knob checks), `panels.py` (pure render functions), `widgets/`, `screens/`,
`polarkv.tcss`. Textual is imported only here, so the rest of polarkvd runs without it.
"""
