"""Where a run's files live on a node. Shared by the operator and the node-side helpers
(stdlib only; the output directory's own layout is `remote_runtime.spec.layout`).

    ~/megafleet/                      WORKDIR (local mode: $MEGAFLEET_HOME/runs/<id>/node0)
      runs/<run-id>/                  the run directory, one per run and node
        run.json                      the node's run record (ranks, master, timeouts; no secrets)
        job.yaml                      the job as this node runs it (paths point at node copies)
        env                           mode 0600: forwarded variables (HF_TOKEN ...) + watcher key
        launch.sh                     torchrun for this node's rank; writes exit_code at the end
        watch.sh                      starts this node's watcher
        node.log                      the launch script's and torchrun's own output
        torchrun-logs/*/attempt_*/<local rank>/{stdout,stderr}.log
                                      each worker's output (torchrun --redirects 3)
        pid, started.json             the launch shell: pid, pgid, session, start time
        exit_code                     torchrun's exit code, written when it exits (after
                                      every process it left behind has been ended)
        exit_cause.json               why it exited non-zero: rank, signal, out-of-memory kill
        stop_requested                written by `megafleet stop` before it signals anything
        watcher.log                   the watcher's own log
        watcher_stop.json             why this node's watcher stopped its job (fail-fast)
        watch.json, failure.json      node 0 only: every node's state; the first failure
        attempts/<n>/                 these per-launch files of earlier launches
                                      (`megafleet resume`)
        output/                       the job's output_dir when relative: logging.jsonl,
                                      checkpoint-<step>/ (rank 0's node)
      uploads/<key>/<file>            dataset copies, reused by later runs (key: the operator's
                                      path)
      models/<name>-<key>/            model copies uploaded from the operator
"""

from __future__ import annotations

# What the runtime writes into output/ is the contract's: re-exported for the node helpers.
from remote_runtime.spec.layout import METRICS_FILE, TRAINER_STATE  # noqa: F401

WORKDIR = "megafleet"  # relative to the node user's home
RUNS = "runs"
UPLOADS = "uploads"
MODELS = "models"

RUN_JSON = "run.json"
JOB_YAML = "job.yaml"
ENV_FILE = "env"
LAUNCH_SH = "launch.sh"
WATCH_SH = "watch.sh"
NODE_LOG = "node.log"
TORCHRUN_LOGS = "torchrun-logs"
PID = "pid"
STARTED = "started.json"
EXIT_CODE = "exit_code"
EXIT_CAUSE = "exit_cause.json"
STOP_REQUESTED = "stop_requested"
WATCHER_LOG = "watcher.log"
WATCHER_STOP = "watcher_stop.json"
WATCH_STATE = "watch.json"
FAILURE = "failure.json"
ATTEMPTS = "attempts"

RANK_PREFIX = "[rank{rank}]:"  # how `nodectl follow` tags a worker's lines (by global rank)
WATCH_TOKEN_VAR = "MEGAFLEET_WATCH_TOKEN"

# What one launch of a run leaves in the run directory; `megafleet resume` moves them aside.
PER_ATTEMPT = (
    PID,
    STARTED,
    EXIT_CODE,
    EXIT_CAUSE,
    STOP_REQUESTED,
    WATCHER_STOP,
    WATCH_STATE,
    FAILURE,
)
