"""Failure rehearsals on an emulated cluster: a SpecMesh driver on one of its hosts, steered by lines.

:class:`Rehearsal` starts ``python -m specmesh.cluster.rehearsal CONFIG`` on a host of a running
``specmesh emulate`` (the head, by default: a driver needs a Ray node), which builds the engine once
and answers one JSON line per command, so that tests and benchmarks can disturb the cluster (kill an
actor or a node, partition, heal) *between* rounds of a generation the driver is running:

    generate  {prompt, kw, pause_after}  streams {"tokens"} per round; after ``pause_after`` rounds
              it says {"paused"} and waits for ``go``; ends with {"done"} or {"error"} (the committed
              tokens of a GenerationError), each with the times of the recoveries since ``go``
    workers   every worker's role, pid, node and address (they change when a worker is replaced)
    load      {sessions, kw} that many sessions at once; open sessions and RSS of every worker
    dsd       {prompts, variants} target-only beside SpecMesh variants (cluster.compare)
    quit
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping

MARK = "@@ "  # protocol lines start with it; anything else on stdout (Ray's chatter) is ignored
RSS_POLL_S = 0.05
# Ray declares a node dead after `threshold` failed health checks (default 5, every 3 s). For the
# `ray start` of a rehearsal (emulate.up's env): a killed node, whose port refuses at once, is dead
# in ~3 s; a partitioned one, whose every check times out, in ~12 s.
HEALTH_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "3000",
              "RAY_health_check_failure_threshold": "3"}


def rss_kb(pid: int) -> int:
    """Resident memory of process ``pid`` in KiB (VmRSS; every namespace shares this pid space)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


# ---------- the driver (runs on an emulated host) ----------

class _Driver:
    def __init__(self, config: dict) -> None:
        from specmesh.runtime import SpecConfig, SpecMesh

        t0 = time.monotonic()
        self.engine = SpecMesh(SpecConfig(**config))
        self.build_s = time.monotonic() - t0
        self.events: list[dict] = []  # recoveries: role, when asked and answered (s after `go`)
        self.go_t = time.monotonic()
        b = self.engine.backend
        b.target.recover = self._timed(b.target.recover, lambda role: role)
        if b.drafter is not None:
            b.drafter.recover = self._timed(b.drafter.recover, lambda: "draft")

    def _timed(self, recover, role_of):
        def timed(*args):
            now = time.monotonic()  # CLOCK_MONOTONIC: one clock for every namespace of the machine
            event = {"role": role_of(*args), "asked_s": now - self.go_t, "asked_t": now}
            self.events.append(event)
            ok = recover(*args)
            event.update(ok=bool(ok), answered_s=time.monotonic() - self.go_t)
            return ok
        return timed

    def workers(self) -> list[dict]:
        t = self.engine.backend.target
        ws = list(t.workers) + ([t.draft] if t.draft is not None else [])
        return [{"role": w.role, **{k: w.info.get(k) for k in ("pid", "node_id", "ip")}} for w in ws]

    def generate(self, prompt: list[int], kw: dict, pause_after: int | None, say, hear) -> None:
        from specmesh.runtime import GenerationError

        self.events = []
        gen = self.engine.generation(prompt, **kw)
        t0 = self.go_t = time.monotonic()
        try:
            for rnd, tokens in enumerate(gen, start=1):
                now = time.monotonic()
                say({"event": "tokens", "round": rnd, "tokens": tokens, "s": now - self.go_t, "t": now})
                if rnd == pause_after:
                    say({"event": "paused", "round": rnd})
                    hear()  # the caller disturbs the cluster, then says go
                    self.go_t = time.monotonic()
        except GenerationError as exc:
            say({"event": "error", "message": str(exc), "output_ids": exc.output_ids,
                 "s": time.monotonic() - self.go_t, "recoveries": self.events})
            return
        say({"event": "done", "output_ids": gen.output_ids, "notes": gen.stats.recoveries,
             "s": time.monotonic() - self.go_t, "total_s": time.monotonic() - t0, "recoveries": self.events})

    def load(self, sessions: int, kw: dict) -> dict:
        """``sessions`` generations at once (different prompts and seeds); memory sampled meanwhile."""
        import ray

        workers = self.workers()
        t = self.engine.backend.target
        handles = [w.handle for w in t.workers] + ([t.draft.handle] if t.draft is not None else [])
        base = {w["role"]: rss_kb(w["pid"]) for w in workers}
        peak, held, stop = dict(base), {w["role"]: 0 for w in workers}, threading.Event()

        def sample() -> None:
            while not stop.is_set():
                counts = ray.get([h.open_sessions.remote() for h in handles], timeout=60)
                for w, n in zip(workers, counts):
                    peak[w["role"]] = max(peak[w["role"]], rss_kb(w["pid"]))
                    held[w["role"]] = max(held[w["role"]], n)
                stop.wait(RSS_POLL_S)

        jobs = [([(7 * i + j) % 250 + 1 for j in range(6 + i % 5)], {**kw, "seed": i}) for i in range(sessions)]
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        with ThreadPoolExecutor(sessions) as pool:
            outs = list(pool.map(lambda j: self.engine.generate(j[0], **j[1]).output_ids, jobs))
        took = time.monotonic() - t0
        stop.set()
        sampler.join()
        after = ray.get([h.open_sessions.remote() for h in handles], timeout=60)
        return {"s": took, "tokens": sum(map(len, outs)), "held": held, "rss_base_kb": base, "rss_peak_kb": peak,
                "rss_after_kb": {w["role"]: rss_kb(w["pid"]) for w in workers},
                "open_after": dict(zip([w["role"] for w in workers], after))}

    def dsd(self, prompts: list, variants: list) -> list[dict]:
        from .compare import BASELINE, Variant, run_side_by_side, summarise

        runs = run_side_by_side(self.engine, [tuple(p) for p in prompts],
                                [BASELINE, *(Variant(v["label"], v["overrides"]) for v in variants)])
        return [s.__dict__ for s in summarise(runs)]


def _serve(config: dict) -> None:
    def say(obj: dict) -> None:
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    def hear() -> dict:
        line = sys.stdin.readline()
        if not line:
            raise SystemExit(0)  # the caller went away
        return json.loads(line)

    driver = _Driver(config)
    say({"event": "ready", "build_s": driver.build_s, "workers": driver.workers()})
    while True:
        cmd = hear()
        op = cmd.pop("cmd")
        if op == "quit":
            driver.engine.close()
            say({"event": "bye"})
            return
        if op == "generate":
            driver.generate(cmd["prompt"], cmd.get("kw", {}), cmd.get("pause_after"), say, hear)
        elif op == "workers":
            say({"event": "workers", "workers": driver.workers()})
        elif op == "load":
            say({"event": "load", **driver.load(cmd["sessions"], cmd.get("kw", {}))})
        elif op == "dsd":
            say({"event": "dsd", "summary": driver.dsd(cmd["prompts"], cmd["variants"])})
        else:
            say({"event": "error", "message": f"unknown command {op!r}"})


# ---------- the client (runs in the root namespace) ----------

class Rehearsal:
    """A rehearsal driver on host ``node`` of the emulation in ``state``, built with ``config``
    (SpecConfig fields; ``backend`` defaults to ``cluster``, ``topology`` to the job topology).

    Args:
        state: the emulation's state (``emulate.load_state``).
        config: SpecConfig fields as JSON values.
        node: the host to run on. [default: the Ray head]
        timeout_s: how long any answer may take (building the engine included).
    """

    def __init__(self, state: Mapping, config: Mapping, node: str | None = None, timeout_s: float = 300.0) -> None:
        from .emulate_ops import exec_command

        cfg = {"backend": "cluster", "topology": state["job_topology"], **config}
        argv, env = exec_command(state, node or state["head"],
                                 [sys.executable, "-m", "specmesh.cluster.rehearsal", json.dumps(cfg)])
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.timeout_s = timeout_s
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.expect("ready")

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self._lines.put(json.loads(line[len(MARK):]))
        self._lines.put(None)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout_s: float | None = None) -> dict:
        """The driver's next answer; RuntimeError if it exits or says nothing in time."""
        try:
            answer = self._lines.get(timeout=timeout_s or self.timeout_s)
        except queue.Empty:
            raise RuntimeError(f"the rehearsal driver said nothing for {timeout_s or self.timeout_s:g} s") from None
        if answer is None:
            raise RuntimeError(f"the rehearsal driver exited with {self.proc.wait()}")
        return answer

    def expect(self, event: str, timeout_s: float | None = None) -> dict:
        answer = self.next(timeout_s)
        if answer.get("event") != event:
            raise RuntimeError(f"expected {event!r} from the rehearsal driver, got {answer}")
        return answer

    def generate(self, prompt: list[int], kw: Mapping | None = None, pause_after: int | None = None,
                 disturb=None, during: bool = False) -> tuple[dict, list[list[int]]]:
        """Runs one generation; ``disturb()`` runs while the driver waits after ``pause_after``
        rounds (``during``: right after it is told to go on, so that the failure meets a round in
        flight). Returns the final answer (``done`` or ``error``; its ``token_t``: when each round's
        tokens came, ``disturbed_t``: when ``disturb`` began, both on CLOCK_MONOTONIC) and the
        tokens streamed per round."""
        self.send(cmd="generate", prompt=list(prompt), kw=dict(kw or {}), pause_after=pause_after)
        streamed, times, disturbed_t = [], [], None
        while True:
            answer = self.next()
            if answer["event"] == "tokens":
                streamed.append(answer["tokens"])
                times.append(answer["t"])
            elif answer["event"] == "paused":
                if during:
                    self.send(cmd="go")
                if disturb is not None:
                    disturbed_t = time.monotonic()
                    disturb()
                if not during:
                    self.send(cmd="go")
            else:
                return {**answer, "token_t": times, "disturbed_t": disturbed_t}, streamed

    def ask(self, cmd: str, **kw) -> dict:
        self.send(cmd=cmd, **kw)
        return self.expect(cmd)

    def close(self) -> None:
        """Ends the driver (its workers with it); safe to call twice."""
        if self.proc.poll() is None:
            try:
                self.send(cmd="quit")
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
