"""The interactive wizard (`megafleet`, `megafleet wizard`): from "I have some GPU boxes" to a
running job, through the same commands' code an agent drives with `--json`.

Flow (megafleet.wizard.flow): where training runs (this machine / SSH hosts / EC2 instances by
tag) -> the hosts, each checked at once (the `hosts check` table; EC2: find, stage the import,
`ec2 check` findings) -> all hosts or the first only -> task -> model (family checked) ->
dataset (format detected, first row shown) -> max_length and the planner's layout (GPUs from
the host check) -> schedule -> the rendered job and `megafleet launch FILE` -> confirm ->
save -> setup if needed -> launch -> follow the logs.

When things are written (see megafleet.wizard.state and .finish):
- before the confirmation: nothing. Hosts are added to an in-memory inventory; the host keys
  pinned while checking them go to a staged copy of known_hosts in a private temp directory.
  A cancel (Ctrl-C, "Cancel", an error) prints the commands that redo the answers by hand.
- "save" / "save and launch": the inventory (if hosts were added), their host keys, the job
  file (never overwriting one). From here `megafleet launch FILE` replays the job.
- setup runs on hosts only after its own confirmation; the launch creates the run; Ctrl-C
  while following the logs detaches (the run goes on: `megafleet logs RUN -f`).

Answers can come from a YAML file (`--answers`, question id -> answer; see `Asker`), which
tests and scripted runs use; questions it does not answer are asked on the terminal.
"""

from megafleet.wizard.ask import Asker, load_answers
from megafleet.wizard.flow import run_wizard

__all__ = ["Asker", "load_answers", "run_wizard"]
