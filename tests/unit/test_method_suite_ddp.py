"""The shared method suite under 2-process DDP: every entry of tunelab.methods.METHODS, on CPU (gloo).

For each method (the suite's METHOD_NAMES, recipes from its `write_recipe`, so its per-method options
and data settings apply here too), a finetune run by 2 processes x micro-batch 2 must match one
process running the same recipe:
  - with the ranks' micro-batches (micro-batch 2 x grad_accum 2): the loop draws the global batch in
    one order whatever the number of processes, and rank r's micro-batch is the one a single process
    takes as its micro-batch r, so the logged losses and the final weights (every tensor of every
    safetensors file in final/) agree; on CPU they agree bit for bit, the tolerances only allow for
    kernels that round differently;
  - with the whole global batch in one micro-batch (4): the logged losses agree to 1e-5. (Not the
    weights: other matmul shapes round differently, and Adam turns that rounding of near-zero
    gradients into ~1e-5 weight differences in LoHa and OFT. That compares the split, not DDP.)
Full and LoRA also run with each memory option under DDP ("full+gc", "lora+gc": train.gradient_checkpointing;
"full+chunk", "lora+chunk": train.loss_chunk_tokens) and must match one process without it.
A method that cannot run under DDP refuses with a one-line error naming itself and why
(REFUSED_UNDER_DDP, raised from its `prepare` when ctx.dist.world > 1); the test checks that error.

One torchrun launch serves the whole module (a process start imports torch and transformers twice,
~10 s): this file, run as a script under torchrun, is the driver. It runs the selected methods'
stages one after the other in the same two processes and process group (as `tunelab run` does with
a pipeline's stages), each into its own run directory, and appends one line per method to
results.jsonl. The 1-process references run in the test process meanwhile, single-threaded like the
ranks (OMP_NUM_THREADS=1), one method per parametrized test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import test_method_suite as suite
from conftest import REPO
from test_method_suite import METHOD_NAMES, write_recipe

corpus, base_dir = suite.corpus, suite.base_dir  # the suite's fixtures: its corpus and base model
STEPS = 4
TRAIN = {"max_steps": STEPS, "checkpoint_every": 0, "eval_at_start": False, "micro_batch_size": 2}
WORLD = 2  # the reference: 1 process x grad_accum WORLD
# Methods that refuse to run under DDP: a fragment of the one-line error their `prepare` raises.
REFUSED_UNDER_DDP: dict[str, str] = {}
DRIVER_TIMEOUT = 1500  # seconds, all methods together
COLLECTIVE_TIMEOUT = 180  # seconds: a method whose ranks fall out of step fails instead of hanging


# "<method>+<option>": the method with a memory option under DDP, against one process without it.
MEMORY_OPTIONS = {"gc": {"gradient_checkpointing": True}, "chunk": {"loss_chunk_tokens": 7}}
WITH_MEMORY_OPTION = ["full+gc", "lora+gc", "full+chunk", "lora+chunk"]
# "<method>@<objective>": the preference objectives (every method above trains with clm). DPO with lora has the
# adapter-disabled reference, with full the cached one: both are per-process state that must agree.
WITH_OBJECTIVE = ["lora@dpo", "full@dpo", "full@simpo", "full@orpo"]


def recipe(path: Path, corpus: Path, base: Path, case: str, **train) -> Path:
    case, _, option = case.partition("+")
    method, _, objective = case.partition("@")
    return write_recipe(path, corpus, base, method, objective or "clm",
                        **{**TRAIN, **MEMORY_OPTIONS.get(option, {}), **train})


class DDPRuns:
    """The torchrun driver, running in the background; `result(method)` waits for that method's line."""

    def __init__(self, root: Path, corpus: Path, base: Path, methods: list[str]):
        self.root, self.results = root, root / "results.jsonl"
        jobs = [{"method": m, "recipe": str(recipe(root / f"{m}.yaml", corpus, base, m)), "out": str(root / m)}
                for m in methods]
        (root / "jobs.json").write_text(json.dumps(jobs))
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "tests" / "unit"),
                                              os.environ.get("PYTHONPATH", "")])}
        self.log = open(root / "torchrun.log", "w")
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
             __file__, str(root / "jobs.json"), str(self.results)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)  # its own process group: stop() can end the workers with it

    def lines(self) -> dict:
        if not self.results.is_file():
            return {}
        rows = [json.loads(line) for line in self.results.read_text().splitlines() if line.strip()]
        return {r["method"]: r for r in rows}

    def result(self, method: str) -> dict:
        while True:
            done = self.lines()
            if method in done:
                return done[method]
            if self.proc.poll() is not None or time.time() - self.started > DRIVER_TIMEOUT:
                done = self.lines()  # the last line may have come with the exit
                if method in done:
                    return done[method]
                self.stop()
                tail = (self.root / "torchrun.log").read_text()[-3000:]
                pytest.fail(f"the DDP driver ended (exit {self.proc.returncode}) before {method}: {tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # torchrun's agent stops its workers
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def ddp_runs(request, tmp_path_factory, corpus, base_dir):
    # Only the methods this session runs here (all of them, unless -k picked some), in the tests' order.
    selected = [item.callspec.params["method"] for item in request.session.items
                if item.path == Path(__file__) and "method" in getattr(getattr(item, "callspec", None), "params", {})]
    runs = DDPRuns(tmp_path_factory.mktemp("ddp"), corpus, base_dir, list(dict.fromkeys(selected)))
    yield runs
    runs.stop()


def final_tensors(final: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(final.glob("*.safetensors")):
        tensors.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
    return tensors


def one_process(tmp_path: Path, corpus: Path, base: Path, method: str, name: str, **train) -> Path:
    """The reference run, in this process (while the driver works on the methods before this one)."""
    import torch

    from tunelab.recipe import load_recipe
    from tunelab.stages import run_stage

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the same kernels, the same rounding
    try:
        return run_stage(load_recipe(recipe(tmp_path / f"{name}.yaml", corpus, base, method, **train)),
                         out=tmp_path / name, quiet=True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_NAMES + WITH_MEMORY_OPTION + WITH_OBJECTIVE)
def test_method_under_two_processes_matches_one(tmp_path, corpus, base_dir, ddp_runs, method):
    import torch

    from tunelab.runs import train_losses

    refused = REFUSED_UNDER_DDP.get(method)
    if refused is None:
        # One process with the ranks' micro-batches (micro-batch 2 x grad_accum 2), and with the whole global
        # batch in one micro-batch (4): the logged losses must not depend on the split either.
        plain = method.partition("+")[0]  # a "+gc" or "+chunk" run is held to the method without the option
        same_split = one_process(tmp_path, corpus, base_dir, plain, "accum", grad_accum=WORLD)
        whole = one_process(tmp_path, corpus, base_dir, plain, "whole",
                            micro_batch_size=WORLD * TRAIN["micro_batch_size"])
    got = ddp_runs.result(method)
    ranks = got["ranks"]
    if refused is not None:
        for status in ranks:
            assert status["kind"] == "error", f"{method} ran under DDP; expected it to refuse: {status}"
            assert refused in status["message"] and "\n" not in status["message"], status["message"]
            assert method in status["message"], status["message"]
        return
    failed = [(rank, s) for rank, s in enumerate(ranks) if s["kind"] != "ok"]
    assert not failed, (f"{method} failed under DDP: "
                        + "; ".join(f"rank {rank}: {s['kind']}: {s['message']}" for rank, s in failed)
                        + "\n" + failed[0][1].get("traceback", ""))

    two = Path(got["out"])
    state = json.loads((two / "checkpoints" / f"step-{STEPS}" / "state.json").read_text())
    assert state["world_size"] == WORLD  # it really ran in two processes
    losses = train_losses(two / "metrics.jsonl")
    assert sorted(losses) == list(range(1, STEPS + 1))
    for reference in (same_split, whole):
        expected = train_losses(reference / "metrics.jsonl")
        assert sorted(expected) == sorted(losses)
        for step in expected:
            assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-7), \
                (method, reference.name, step, losses, expected)
    a, b = final_tensors(same_split / "final"), final_tensors(two / "final")
    assert a and a.keys() == b.keys(), (sorted(a), sorted(b))
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=f"{method}: {name}")
        else:  # indices (sparse): exactly the same
            assert torch.equal(b[name], a[name]), f"{method}: {name}"


# ---------------------------------------------------------------- the driver (under torchrun)


def drive(jobs_path: str, results_path: str) -> None:
    """Every job's stage in turn in these processes; rank 0 appends {method, out, ranks: [status per rank],
    seconds} to results_path after each. Stops early when the ranks disagree (one failed, one did not):
    the process group may be out of step then."""
    import datetime
    import traceback

    import torch.distributed as tdist

    from tunelab.recipe import load_recipe
    from tunelab.errors import TunelabError
    from tunelab.stages import run_stage

    # The group is joined once here with a short timeout, so that a method whose ranks fall out of step
    # fails in minutes; each stage's open_stage finds it joined and uses it.
    tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT))
    rank = tdist.get_rank()
    for job in json.loads(Path(jobs_path).read_text()):
        start = time.perf_counter()
        try:
            run_stage(load_recipe(job["recipe"]), out=Path(job["out"]), quiet=True)
            status = {"kind": "ok"}
        except TunelabError as err:
            status = {"kind": "error", "type": type(err).__name__, "message": str(err)}
        except Exception as err:  # noqa: BLE001 (a bug: reported with its traceback, the next method runs)
            status = {"kind": "crash", "message": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()[-4000:]}
        statuses = [None] * tdist.get_world_size()
        tdist.all_gather_object(statuses, status)
        if rank == 0:
            with open(results_path, "a") as f:
                f.write(json.dumps({"method": job["method"], "out": job["out"], "ranks": statuses,
                                    "seconds": round(time.perf_counter() - start, 2)}) + "\n")
        if len({s["kind"] for s in statuses}) > 1:
            break
    if tdist.is_initialized():
        tdist.destroy_process_group()


if __name__ == "__main__":
    drive(sys.argv[1], sys.argv[2])
