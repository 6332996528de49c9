"""Jobs on the fleet: launch, logs, status, stop, fetch, and the fail-fast watcher.

Operator side (paramiko, rich): `launch` (plan, validate, upload, start), `logs`, `status`,
`stop`, `fetch`, `records` (run records under $MEGAFLEET_HOME/runs), `sync` (incremental,
resumable uploads and downloads checked by sha256), `plan` (hosts, ranks, master address, port
check), `render` (the per-node launch script and env file). Node side (stdlib only, run with the
node's venv python): `nodectl`, `watcher`, `proctree`, `layout`.

Importing this package imports nothing else: the node-side modules must stay light.
"""
