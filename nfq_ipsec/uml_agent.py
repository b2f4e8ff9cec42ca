"""Command agent running inside the user-mode-linux peer (started by the UML init script).

The UML kernel's root file system is the host's (hostfs), so the host and this agent share
RUNDIR. The host drops requests as RUNDIR/cmd/<id>.json (written to a temporary name, then
renamed); the agent runs each with /bin/sh in its own process group, output in RUNDIR/res/<id>.out,
and publishes RUNDIR/res/<id>.json ({"rc", "timed_out", "elapsed"}) once the command is over.
Every command runs concurrently (servers are just long commands), has a deadline and can be
killed early ({"op": "kill", "target": ID}).

Files are fsync'ed before the result appears: hostfs writes go through the UML page cache.
The agent only ever opens names it has just seen in a directory listing, so the UML dentry
cache never holds a stale negative entry for a file the host creates later.

Runs on the host's Python (stdlib only): python3 uml_agent.py RUNDIR
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import IO, Any

POLL = 0.02


def _publish(path: str, obj: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


class Job:
    def __init__(self, req: dict[str, Any], res_dir: str) -> None:
        self.id = str(req["id"])
        self.res_path = os.path.join(res_dir, self.id + ".json")
        self.out: IO[bytes] = open(os.path.join(res_dir, self.id + ".out"), "wb")
        self.t0 = time.monotonic()
        self.deadline = self.t0 + float(req.get("timeout", 30))
        self.proc = subprocess.Popen(["/bin/sh", "-c", str(req["sh"])], stdin=subprocess.DEVNULL,
                                     stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=str(req.get("cwd", "/")))
        self.timed_out = False

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def poll(self) -> bool:
        """True once finished and published."""
        rc = self.proc.poll()
        if rc is None:
            if time.monotonic() < self.deadline:
                return False
            self.timed_out = True
            self.kill()
            rc = self.proc.wait()
        else:
            self.kill()  # leftovers of the group (e.g. a server started with &)
        self.out.flush()
        os.fsync(self.out.fileno())
        self.out.close()
        _publish(self.res_path, {"id": self.id, "rc": rc, "timed_out": self.timed_out,
                                 "elapsed": round(time.monotonic() - self.t0, 3)})
        return True


def main(rundir: str) -> int:
    cmd_dir, res_dir = os.path.join(rundir, "cmd"), os.path.join(rundir, "res")
    jobs: list[Job] = []
    _publish(os.path.join(rundir, "agent-ready"), {"pid": os.getpid()})
    while True:
        for name in sorted(os.listdir(cmd_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(cmd_dir, name)
            with open(path) as f:
                req = json.load(f)
            os.unlink(path)
            if req.get("op") == "exit":
                for j in jobs:
                    j.kill()
                return 0
            if req.get("op") == "kill":  # the job then publishes its result as killed (rc -9)
                for j in jobs:
                    if j.id == req.get("target"):
                        j.kill()
                continue
            try:
                jobs.append(Job(req, res_dir))
            except OSError as e:  # cannot even start: report it as the command's result
                _publish(os.path.join(res_dir, str(req["id"]) + ".json"),
                         {"id": req["id"], "rc": 127, "timed_out": False, "elapsed": 0, "error": str(e)})
        jobs = [j for j in jobs if not j.poll()]
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
