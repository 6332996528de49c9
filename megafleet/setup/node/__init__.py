"""The node side of `megafleet setup`: code that runs ON each host, with the host's own python3.

Standard library only, Python >= 3.8, like scripts/check_megatron_env.py. The operator never
copies these files to the node: `megafleet.setup.remote` sends their source (and the check
script's) over the SSH channel's stdin to a tiny bootstrap (`python3 -c ...`) that loads them
as the package `megafleet_node` and calls `agent.main(request)`. So a dry run writes nothing on
the host, and the node always runs exactly the operator's version.

Modules: `core` (paths, installed packages, lock, marker, log, commands), `context` (one
request's paths, installer and GPU facts; Command), `steps` (venv, torch, packages, project,
te, apex, flash_attn, check), `agent` (probe, plan and run modes, progress events).
`CHECK` is the check script as a module (its driver table,
header discovery and TE build plan are reused, never copied): on the node the bootstrap sets
it; in the operator it is loaded through `megafleet.envcheck.load_check_script()`.

By hand (any Python >= 3.8, from a checkout, no third-party packages needed):
    python -m megafleet.setup.node plan --venv /opt/torch/.venv --with-te
"""


def __getattr__(name):
    if name == "CHECK":
        from megafleet.envcheck import load_check_script

        module = load_check_script()
        globals()["CHECK"] = module
        return module
    raise AttributeError(name)
