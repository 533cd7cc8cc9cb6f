"""The GPU check: the README's CUDA claims measured in one run, printed as one table.

On a machine with a CUDA device, from the repository root (about 6 minutes on one GPU; every
step has its own time limit, and the whole run starts no step after ``--budget`` seconds, nor a
subprocess that the budget cannot let finish)::

    python scripts/gpu_check.py --install --out gpu_check.md

It needs pytest and hypothesis beside torch (it says so and stops where they are missing). The
CPU dry run (CI runs it: 1-4 minutes on 2 cores): the same code, CUDA's own steps reported as skipped::

    python scripts/gpu_check.py --device cpu --quick

Sections, in the order they run: the cheap ones that carry the README's claims first, so that
a short budget cuts the long ones (each row: what was measured, what the README claims, a
verdict):

1. ``syncs``: host synchronisations per forward or training step, upstream's and safe_norm's:
   on CUDA counted by ``torch.cuda.set_sync_debug_mode`` (every warning is one), and on every
   device by a dispatch mode that records the ops which wait for the device (``.item()``,
   ``equal``, ``nonzero``, eigensolvers, copies to the host) when they read device data.
2. ``autocast``: float16 and bfloat16 training of the SNGAN discriminator, side by side with
   upstream from identical weights and ``u``, ``v``.
3. ``graphs``: CUDA-graph capture of a trained model's training step, where upstream's works.
4. ``memory``: peak memory of a training step against upstream's.
5. ``smoke``: ``real_usage_smoke.py`` (the team's, when present; ``--smoke PATH``) with the
   default device set to the device.
6. ``tests``: the CUDA tests (skipped where there is no CUDA), then the suite with the default
   device set to the device (``SAFE_NORM_TEST_DEVICE``; failures listed, for review: a test
   that draws from a CPU generator fails under a CUDA default device for its own reasons).
7. ``compile``: ``torch.compile(mode="reduce-overhead")`` of the training step (four
   compilations, each started only with a minute left).
8. ``benchmarks``: every benchmark script with ``--device``, short settings.

Exit status 1 when a row's verdict is FAIL; otherwise 2 when the budget left a step out (its
row: skipped, "out of time (--budget)"; run again with a larger ``--budget``, or
``--sections`` naming what is left); otherwise 0. Skips for want of a CUDA device or of
``--quick`` leave it 0. The table (and each step's output) goes to ``--out`` as Markdown too.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# Before anything else: the tests' helpers (imported below) need pytest, the suite hypothesis,
# and the GPU machine has no network to fetch them from halfway through.
MISSING = [name for name in ("pytest", "hypothesis") if not _imports(name)]
if MISSING:
    sys.exit(f"gpu_check: {' and '.join(MISSING)} missing: pip install pytest hypothesis (no network: carry "
             f"their wheels, then pip install --no-index --find-links WHEELS_DIR pytest hypothesis)")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Imported after torch and the path: the repository's own safe_norm, its tests' helpers, the
# benchmarks' SNGAN discriminator.
import safe_norm  # noqa: E402
from safe_norm import _krylov  # noqa: E402
from tests.helpers import APIS, DeviceWaits, exact_sigma, sn_state, used_sigma  # noqa: E402
from tracking import sngan_d  # noqa: E402

OUT_OF_TIME = "out of time (--budget)"


@dataclasses.dataclass
class Row:
    section: str
    item: str
    measured: str
    claim: str
    verdict: str  # ok, FAIL, info, skipped


@dataclasses.dataclass
class Check:
    device: torch.device
    quick: bool
    deadline: float
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (title, text)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def row(self, section: str, item: str, measured: object, claim: str, ok: bool | None) -> None:
        verdict = "info" if ok is None else "ok" if ok else "FAIL"
        self.rows.append(Row(section, item, str(measured), claim, verdict))

    def skip(self, section: str, item: str, why: str) -> None:
        self.rows.append(Row(section, item, "-", why, "skipped"))

    def late(self, section: str, item: str) -> None:
        self.skip(section, item, OUT_OF_TIME)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def status(self) -> int:
        # 2, not 0: a run the budget cut short has not checked every claim
        if any(r.verdict == "FAIL" for r in self.rows):
            return 1
        return 2 if any(r.verdict == "skipped" and r.claim == OUT_OF_TIME for r in self.rows) else 0


# ---------------------------------------------------------------------------------------------
# Host synchronisations


class Counting:
    """A context that counts what its body makes the host wait for: ``dispatch``, the waits
    :class:`DeviceWaits` saw (on the CPU plus each of ``_krylov._host``'s reads); ``cuda``, the
    warnings of CUDA's sync debug mode; ``checks``, the checks of the tracked steps that ran."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mode = DeviceWaits(device)
        self.counts: dict[str, int] = {"checks": 0, "reads": 0, "cuda": 0, "dispatch": 0}
        self.ops: list[str] = []
        self.mixed: list[str] = []  # on the CPU: ops that got host data beside device data

    def __enter__(self) -> Counting:
        host, track = self._saved = _krylov._host, _krylov.track_

        def read(x: torch.Tensor) -> torch.Tensor:
            self.counts["reads"] += 1
            y = host(x)
            if self.device.type == "cpu":  # x.cpu() is x itself: mark a copy as the host's
                y = y.clone()
                self.mode.host[y] = True
            return y

        def tracked(*args, **kwargs):
            found = track(*args, **kwargs)
            if found is not None:
                self.counts["checks"] += found.checks
            return found

        _krylov._host, _krylov.track_ = read, tracked
        self._back = _krylov._back
        if self.device.type == "cpu":
            _krylov._back = self.mode.moved(self._back)
        self._warnings = warnings.catch_warnings(record=True)
        self._caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.set_sync_debug_mode("warn")
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)
        _krylov._host, _krylov.track_ = self._saved
        _krylov._back = self._back
        self.counts["cuda"] = sum("synchroniz" in str(w.message) for w in self._caught)
        self.counts["dispatch"] = len(self.mode.ops) + (self.counts["reads"] if self.device.type == "cpu" else 0)
        self.ops = self.mode.ops
        self.mixed = self.mode.mixed


def _mlp(sn: Callable[[nn.Module], nn.Module], device: torch.device) -> nn.Sequential:
    """One layer of each path: 96 wide (solved exactly when tracked), 256 (block Krylov), 1.
    Registered on the device (a layer moved after registration re-converges at its first
    forward there, by design: a move is a change)."""
    torch.manual_seed(0)
    return nn.Sequential(sn(nn.Linear(96, 256, device=device)), nn.LeakyReLU(0.2),
                         sn(nn.Linear(256, 256, device=device)), nn.LeakyReLU(0.2),
                         sn(nn.Linear(256, 1, device=device)))


def _trainer(net: nn.Module, device: torch.device, width: int = 96):
    """A hinge-loss training step; ``step(around)`` runs its forward and backward inside the
    context ``around`` (the counts), the optimizer's step outside it (Adam reads its step count
    on the host, upstream's and ours alike)."""
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9))
    gen = torch.Generator().manual_seed(0)

    def step(around: contextlib.AbstractContextManager | None = None) -> None:
        x = torch.randn(32, width, generator=gen).to(device)
        net.train()
        with around or contextlib.nullcontext():
            out = net(x)
            loss = torch.relu(1 - out[:16]).mean() + torch.relu(1 + out[16:]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()

    return step


def section_syncs(c: Check) -> None:
    x = torch.randn(8, 96).to(c.device)

    def measure(item: str, claim: Callable[[dict], int] | None, claim_text: str, build) -> None:
        """``build()`` returns ``run(around)``, which runs the measured work inside ``around``."""
        run = build()
        counter = Counting(c.device)
        run(counter)
        counts = counter.counts
        if c.cuda:
            expected = claim(counts) if claim else None
            measured = f"{counts['cuda']} (dispatch {counts['dispatch']})"
            ok = None if expected is None else counts["cuda"] == expected == counts["dispatch"]
        else:
            expected = claim(counts) if claim else None
            measured = f"dispatch {counts['dispatch']}"
            ok = None if expected is None else counts["dispatch"] == expected
        ops = ", ".join(sorted(set(counter.ops))) or "-"
        checks = f", {counts['checks']} checks" if counts["checks"] else ""
        if counter.mixed:  # a device mismatch on a GPU
            measured, ok = f"{measured}; host data met device data in {sorted(set(counter.mixed))}", False
        c.row("syncs", item, f"{measured} [{ops}]{checks}", claim_text, ok)

    layers = 3
    for api, (ours, theirs) in APIS.items():
        def upstream_step(theirs=theirs):
            step = _trainer(_mlp(theirs, c.device), c.device)
            step()
            return step

        def first_step(ours=ours):
            return _trainer(_mlp(ours, c.device), c.device)

        def trained_step(ours=ours):
            step = _trainer(_mlp(ours, c.device), c.device)
            step(), step()
            return step

        def tracked_step(ours=ours):
            step = _trainer(_mlp(lambda m: ours(m, track_tol=1e-4), c.device), c.device)
            step(), step()
            return step

        def watched_eval(ours=ours):
            net = _mlp(ours, c.device).eval()

            def forward(around):
                with around:
                    net(x)
            return forward

        def trained_eval(ours=ours):
            net = _mlp(ours, c.device)
            step = _trainer(net, c.device)
            step()
            net.eval()

            def forward(around=None):
                with around or contextlib.nullcontext(), torch.no_grad():
                    net(x)
            forward()  # the CPU's cache is built here and checked below
            return forward

        measure(f"upstream {api}: training step", lambda _: 0, "0", upstream_step)
        measure(f"safe_norm {api}: first training step after registration", lambda _: layers,
                f"{layers}: one comparison per watched layer", first_step)
        measure(f"safe_norm {api}: training step", lambda _: 0, "0: the power step carries no check", trained_step)
        measure(f"safe_norm {api}: tracked training step (track_tol=1e-4)", lambda n: n["checks"],
                "one per check (the count of checks)", tracked_step)
        measure(f"safe_norm {api}: watched eval forward", lambda _: layers,
                f"{layers}: one comparison per watched layer", watched_eval)
        measure(f"safe_norm {api}: trained eval forward, no_grad", (lambda _: 0) if c.cuda else None,
                "0 off the CPU (no cache there); on the CPU the cache's content checks", trained_eval)


# ---------------------------------------------------------------------------------------------
# Autocast, graphs, memory


def _sngan_pair(api: str, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Upstream's and safe_norm's SNGAN discriminator with the same weights and ``u``, ``v``:
    safe_norm's, converged at registration (upstream's own are random, or 2 % off)."""
    ours, theirs = APIS[api]
    torch.manual_seed(0)
    sn, _, _ = sngan_d(ours)
    up, _, _ = sngan_d(theirs)
    up.load_state_dict(sn.state_dict())
    return up.to(device), sn.to(device)


def _worst_sigma_error(net: nn.Module) -> float:
    layers = [m for m in net.modules() if hasattr(m, "weight_u") or hasattr(m, "parametrizations")]
    return max(abs(used_sigma(m) / exact_sigma(sn_state(m)[0].cpu()) - 1) for m in layers)


def section_autocast(c: Check) -> None:
    steps, batch = (2, 2) if c.quick else (20, 64)
    for dtype in (torch.float16, torch.bfloat16):
        for api in APIS:
            item = f"{api}, {str(dtype).split('.')[-1]}, {steps} Adam steps"
            up, sn = _sngan_pair(api, c.device)
            outs = []
            try:
                for net in (up, sn):
                    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9))
                    gen = torch.Generator().manual_seed(0)
                    for _ in range(steps):
                        x = torch.randn(2 * batch, 3, 32, 32, generator=gen).to(c.device)
                        with torch.autocast(c.device.type, dtype=dtype):
                            out = net(x)
                        loss = torch.relu(1 - out[:batch]).float().mean() + torch.relu(1 + out[batch:]).float().mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    outs.append(out.detach().float())
            except RuntimeError as e:  # an autocast dtype this device does not have
                c.skip("autocast", item, f"not available here: {str(e).splitlines()[0][:80]}")
                continue
            diff = ((outs[1] - outs[0]).abs().max() / outs[0].abs().max()).item()
            err_up, err_sn = _worst_sigma_error(up), _worst_sigma_error(sn)
            c.row("autocast", item,
                  f"output diff {diff:.1e}; sigma err ours {err_sn:.1e}, upstream {err_up:.1e}",
                  "finite; sigma err <= 1e-2 (README), or no worse than upstream's (x1.25)",
                  bool(torch.isfinite(outs[1]).all()) and (err_sn <= 1e-2 or err_sn <= 1.25 * err_up))


def _variants() -> dict[str, Callable[[nn.Module], nn.Module]]:
    return {f"{lib} {api}": fn for api, pair in APIS.items() for lib, fn in zip(("safe_norm", "upstream"), pair)}


def _graph_step(net: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9), capturable=True)

    def step() -> None:
        out = net(x)
        loss = torch.relu(1 - out[:16]).mean() + torch.relu(1 + out[16:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    return step


def section_graphs(c: Check) -> None:
    if not c.cuda:
        c.skip("graphs", "CUDA-graph capture, torch.compile(mode='reduce-overhead')", "needs a CUDA device")
        return
    x = torch.randn(32, 96, device=c.device)
    works: dict[str, bool] = {}
    for name, sn in _variants().items():
        net = _mlp(sn, c.device)
        eager = copy.deepcopy(net)
        try:
            step, twin = _graph_step(net, x), _graph_step(eager, x)
            side = torch.cuda.Stream(c.device)
            side.wait_stream(torch.cuda.current_stream(c.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # trained, and the warm-up capture needs
                    step(), twin()
            torch.cuda.current_stream(c.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for _ in range(5):
                graph.replay()
                twin()
            torch.cuda.synchronize(c.device)
            diff = max(((a - b).abs().max() / b.abs().max()).item()
                       for a, b in zip(net.state_dict().values(), eager.state_dict().values()) if b.is_floating_point())
            works[name] = diff <= 1e-5
            c.row("graphs", f"{name}: CUDA graph of a trained training step, 5 replays",
                  f"captured; vs eager {diff:.1e}", "replays equal eager (1e-5)", works[name])
        except Exception as e:  # noqa: BLE001 - the row says what failed
            works[name] = False
            c.row("graphs", f"{name}: CUDA graph of a trained training step", f"{type(e).__name__}: {str(e)[:100]}",
                  "works where upstream's does", None)
    for api in APIS:
        if works.get(f"upstream {api}") and not works.get(f"safe_norm {api}"):
            c.row("graphs", f"{api}: capture", "upstream's works, ours does not", "works where upstream's does", False)


def _compiled_step(net: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.Adam(net.parameters(), lr=2e-4, betas=(0.0, 0.9), capturable=True)

    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are done with
        out = net(x)
        loss = torch.relu(1 - out[:16]).mean() + torch.relu(1 + out[16:]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def section_compile(c: Check) -> None:
    if not c.cuda:
        c.skip("compile", "torch.compile(mode='reduce-overhead') of a training step", "needs a CUDA device")
        return
    if c.quick:
        c.skip("compile", "torch.compile(mode='reduce-overhead')", "--quick")
        return
    from torch._dynamo.utils import counters

    x = torch.randn(32, 96, device=c.device)
    works: dict[str, bool] = {}
    for name, sn in _variants().items():
        if c.left() < 60:
            c.late("compile", f"{name}: torch.compile reduce-overhead")
            continue
        torch._dynamo.reset()
        counters.clear()
        net = _mlp(sn, c.device)
        eager = copy.deepcopy(net)
        start = time.perf_counter()
        try:
            compiled = torch.compile(net, mode="reduce-overhead")
            step, twin = _compiled_step(compiled, x), _graph_step(eager, x)
            for _ in range(4):
                step(), twin()
            torch.cuda.synchronize(c.device)
            diff = max(((a - b).abs().max() / b.abs().max()).item()
                       for a, b in zip(net.state_dict().values(), eager.state_dict().values()) if b.is_floating_point())
            skips = counters["inductor"]["cudagraph_skips"]  # inductor's reasons not to use a graph
            works[name] = diff <= 1e-4
            c.row("compile", f"{name}: torch.compile reduce-overhead, 4 training steps",
                  f"vs eager {diff:.1e}, cudagraph skips {skips}, {time.perf_counter() - start:.0f} s",
                  "matches eager (1e-4); skips reported", works[name])
        except Exception as e:  # noqa: BLE001 - the row says what failed
            works[name] = False
            c.row("compile", f"{name}: torch.compile reduce-overhead", f"{type(e).__name__}: {str(e)[:100]}",
                  "works where upstream's does", None)
    for api in APIS:
        if works.get(f"upstream {api}") and not works.get(f"safe_norm {api}"):
            c.row("compile", f"{api}: reduce-overhead", "upstream's works, ours does not", "works where upstream's does",
                  False)


def section_memory(c: Check) -> None:
    if not c.cuda:
        c.skip("memory", "peak memory of a training step", "needs a CUDA device (torch.cuda.max_memory_allocated)")
        return
    for model, shape in (("SNGAN D, batch 64", None), ("Linear 4096x4096, batch 64", (4096,))):
        peaks = {}
        for name, sn in _variants().items():
            torch.manual_seed(0)
            net = sngan_d(sn)[0].to(c.device) if shape is None else sn(nn.Linear(4096, 4096)).to(c.device)
            x = torch.randn(64, *(shape or (3, 32, 32)), device=c.device)
            opt = torch.optim.Adam(net.parameters(), lr=2e-4)
            for _ in range(2):  # trained, optimizer state allocated
                net(x).mean().backward(), opt.step(), opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(c.device)
            base = torch.cuda.memory_allocated(c.device)
            torch.cuda.reset_peak_memory_stats(c.device)
            net(x).mean().backward(), opt.step(), opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(c.device)
            peaks[name] = torch.cuda.max_memory_allocated(c.device) - base
            del net, opt, x
            torch.cuda.empty_cache()
        for api in APIS:
            ours, theirs = peaks[f"safe_norm {api}"], peaks[f"upstream {api}"]
            c.row("memory", f"{model}, {api}: peak above the resident state",
                  f"{ours / 2**20:.1f} MiB vs upstream {theirs / 2**20:.1f} MiB ({ours / max(theirs, 1):.2f}x)",
                  "reported", None)


# ---------------------------------------------------------------------------------------------
# Subprocesses: tests, benchmarks, the smoke


def _subprocess(c: Check, title: str, cmd: list[str], limit: float, least: float, env: dict[str, str] | None = None,
                cwd: Path = ROOT) -> tuple[int | None, str, float]:
    """Runs ``cmd`` with at most ``limit`` seconds, or what the budget leaves; its output goes to
    the notes. The return code is None where the budget stopped it, or left less than ``least``
    seconds (what it takes at the least) to start it: its row is then skipped, not failed."""
    if c.left() < least:
        return None, "", 0.0
    by_budget = c.left() < limit
    limit = min(limit, c.left())
    start = time.perf_counter()
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    # A session of its own: on a timeout the whole group goes (pytest's xdist workers too)
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        raw, _ = proc.communicate(timeout=limit)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raw, _ = proc.communicate()
        rc = None if by_budget else 124
        raw += f"\n[stopped at {'what --budget left' if by_budget else 'its limit'}: {limit:.0f} s]".encode()
    out = raw.decode(errors="replace")
    seconds = time.perf_counter() - start
    c.notes.append((f"{title} (`{' '.join(cmd[1:])}`, rc {rc}, {seconds:.0f} s)", out[-6000:]))
    return rc, out, seconds


def _pytest_counts(out: str) -> dict[str, int]:
    """pytest's summary line's counts (the last line that has them: stderr may follow it), "error"
    counted as "errors"."""
    pattern = r"(\d+) (passed|failed|skipped|errors?|deselected)\b"
    tail = next((line for line in reversed(out.splitlines()) if re.search(pattern, line)), "")
    counts = dict.fromkeys(("passed", "failed", "errors", "skipped"), 0)
    for n, k in re.findall(pattern, tail):
        counts["errors" if k.startswith("error") else k] = int(n)
    return counts


def _pytest_measured(n: dict[str, int], rc: int, seconds: float) -> str:
    return (f"{n['passed']} passed, {n['failed']} failed, {n['errors']} errors, {n['skipped']} skipped, "
            f"rc {rc} ({seconds:.0f} s)")


def section_tests(c: Check) -> None:
    py = sys.executable
    item = "the CUDA tests (tests/test_cuda.py, test_precision's CUDA case)"
    rc, out, s = _subprocess(c, "CUDA tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                                               "tests/test_cuda.py", "tests/test_precision.py", "-k", "cuda"],
                             240, least=20)
    if rc is None:
        c.late("tests", item)
    else:
        n = _pytest_counts(out)
        ran = n["passed"] + n["failed"]
        # rc 0 only: 1 is a failure, 2 to 5 a run that broke off or never collected (a killed
        # run's counts read 0 passed, 0 failed)
        c.row("tests", item, _pytest_measured(n, rc, s), "all pass" if c.cuda else "all skipped without CUDA",
              rc == 0 and n["errors"] == 0 and (ran > 0 if c.cuda else ran == 0))
    files = ["tests/test_errors.py"] if c.quick else ["tests"]
    item = f"{' '.join(files)} with the default device {c.device}"
    extra: list[str] = []
    if not c.quick:  # where the GPU machine has them: 8 workers, and a limit per test
        with contextlib.suppress(ImportError):
            import xdist  # noqa: F401
            extra += ["-n", "8"]
        with contextlib.suppress(ImportError):
            import pytest_timeout  # noqa: F401
            extra += ["--timeout", "120"]
    rc, out, s = _subprocess(c, f"suite, default device {c.device}",
                             [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, *files,
                              "--ignore=tests/test_gpu_check.py"],  # this script's own dry run
                             240, least=20 if c.quick else 60,
                             env={"SAFE_NORM_TEST_DEVICE": str(c.device), "TORCHINDUCTOR_COMPILE_THREADS": "2"})
    if rc is None:
        c.late("tests", item)
        return
    n = _pytest_counts(out)
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.MULTILINE)))
    c.notes.append((f"tests failing with the default device {c.device}", "\n".join(failed) or "none"))
    c.row("tests", item, _pytest_measured(n, rc, s), "reported; failures listed below for review",
          None if rc in (0, 1) else False)


def section_benchmarks(c: Check) -> None:
    dev = str(c.device)
    quick = c.quick
    runs = [
        ("training.py", ["--min-run-time", "0.01" if quick else "0.3"] + (["--quick"] if quick else [])),
        ("discriminator.py", ["--rounds", "1" if quick else "5", "--number", "1" if quick else "3"]),
        ("registration.py", ["--quick"] + (["--match", "Linear 256x256|DCGAN"] if quick else [])),
        ("eval_and_ema.py", ["--rounds", "1", "--min-run-time", "0.01" if quick else "0.3", "--iters", "2" if quick else "10"]),
        ("launches.py", []),
        ("tracking.py", ["--models", "mlp" if quick else "sngan,mlp", "--steps", "2" if quick else "20",
                         "--rounds", "1" if quick else "3", "--k", "1" if quick else "3"]
         + (["--variants", "safe_norm, track_tol=0.0001"] if quick else [])),
    ]
    for script, args in runs:
        rc, out, s = _subprocess(c, f"benchmarks/{script}", [sys.executable, script, "--device", dev, *args],
                                 120, least=20, cwd=ROOT / "benchmarks")
        if rc is None:
            c.late("benchmarks", f"{script} --device {dev}")
            continue
        ratios = re.findall(r"\b(\d+\.\d+)x?\s*$", out, re.MULTILINE)
        c.row("benchmarks", f"{script} --device {dev}", f"rc {rc}, {s:.0f} s, {len(ratios)} figures (output below)",
              "runs; ratios against upstream from the same run", rc == 0)


SMOKE = [ROOT.parent / "shared" / "hooks" / "real_usage_smoke.py", ROOT / "shared" / "hooks" / "real_usage_smoke.py"]


# Runs the smoke as ``python PATH`` would (its __file__, its folder first on sys.path; a
# ``from __future__`` import stays first) with the default device set. Its own CPU target,
# device="cpu" (``to_empty(device="cpu")``), becomes the device's, so that a module moved "to the
# device" meets inputs made on the default device; hence compile() of the edited text, not
# runpy.run_path, which runs a file as it is. Same lines, so tracebacks point into the original.
SMOKE_RUNNER = """\
import os, sys, torch
device, path = sys.argv[1:3]
torch.set_default_device(device)
sys.argv, sys.path[0] = [path], os.path.dirname(path)
with open(path) as f:
    code = compile(f.read().replace('device="cpu"', f'device="{device}"'), path, "exec")
exec(code, {"__name__": "__main__", "__file__": path})
"""


def section_smoke(c: Check, path: Path | None) -> None:
    found = path or next((p for p in SMOKE if p.exists()), None)
    if found is None or not found.exists():
        c.skip("smoke", "real_usage_smoke.py", "not present (pass --smoke PATH)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        runner = Path(tmp) / "smoke_runner.py"
        runner.write_text(SMOKE_RUNNER)
        rc, out, _ = _subprocess(c, f"smoke on {c.device}", [sys.executable, str(runner), str(c.device),
                                                             str(found.resolve())], 120, least=10)
    if rc is None:
        c.late("smoke", f"{found.name}, default device {c.device}")
        return
    lines = [line for line in out.splitlines() if re.search(r"\b(ok|DIFFERS|FAILS)\b", line)]
    bad = [line for line in lines if re.search(r"\b(DIFFERS|FAILS)\b", line)]
    c.row("smoke", f"{found.name}, default device {c.device}", f"rc {rc}: {len(lines) - len(bad)} ok, {len(bad)} not",
          "every line ok", rc == 0 and bool(lines) and not bad)


# ---------------------------------------------------------------------------------------------


def install(c: Check) -> None:
    """The repository itself, with pip, from its own files (no index: a GPU machine may have no
    network); the installed torch is used as it is."""
    rc, _, s = _subprocess(c, "install", [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                                            "--no-build-isolation", "--no-index", "-e", str(ROOT)], 180, least=0)
    if rc is None:
        c.late("setup", "pip install -e . (no deps, no index)")
        return
    c.row("setup", "pip install -e . (no deps, no index)", f"rc {rc}, {s:.0f} s",
          "installs; otherwise the steps run from the checkout (PYTHONPATH)", None if rc else True)


def report(c: Check, started: float) -> str:
    where = torch.cuda.get_device_name(c.device) if c.cuda else "CPU (dry run: CUDA's own steps skipped)"
    head = (f"GPU check, {time.strftime('%Y-%m-%d %H:%M %Z')}: {where}; torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), safe_norm {safe_norm.__version__}, "
            f"{'--quick, ' if c.quick else ''}{time.monotonic() - started:.0f} s")
    lines = [head, "", "| section | item | measured | claim | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.item} | {r.measured} | {r.claim} | {r.verdict} |" for r in c.rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="short settings (the CPU dry run)")
    parser.add_argument("--install", action="store_true", help="pip install the checkout first (--no-deps, no index)")
    parser.add_argument("--budget", type=float, default=400, help="seconds after which no new step starts")
    parser.add_argument("--sections", default="syncs,autocast,graphs,memory,smoke,tests,compile,benchmarks")
    parser.add_argument("--smoke", type=Path, default=None, help="real_usage_smoke.py's path")
    parser.add_argument("--out", type=Path, default=None, help="also write the table and the outputs here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --device cpu --quick for the dry run")
    if device.type == "cuda":
        if (device.index or 0) >= torch.cuda.device_count():
            parser.error(f"{device}: this machine has {torch.cuda.device_count()} CUDA devices")
        # Streams, graph capture and the caching allocator's pools act on the current device,
        # cuda:0 unless set: cuda:1's steps would otherwise capture and count on cuda:0
        torch.cuda.set_device(device)
    started = time.monotonic()
    c = Check(device=device, quick=args.quick, deadline=started + args.budget)
    if args.install:
        install(c)
    sections: dict[str, Callable[[Check], None]] = {
        "syncs": section_syncs, "autocast": section_autocast, "graphs": section_graphs, "memory": section_memory,
        "smoke": lambda c: section_smoke(c, args.smoke), "tests": section_tests, "compile": section_compile,
        "benchmarks": section_benchmarks,
    }
    for name in args.sections.split(","):
        if c.left() <= 0:
            c.late(name, "the whole section")
            continue
        print(f"[{time.monotonic() - started:5.0f} s] {name}", file=sys.stderr, flush=True)
        try:
            sections[name](c)
        except Exception as e:  # noqa: BLE001 - one section's failure must not hide the others
            c.row(name, "the section", f"{type(e).__name__}: {str(e)[:120]}", "runs", False)
            c.notes.append((f"{name}: traceback", traceback.format_exc()))
    table = report(c, started)
    print(table)
    if args.out:
        notes = "\n\n".join(f"### {title}\n\n```\n{text.strip()}\n```" for title, text in c.notes)
        args.out.write_text(f"{table}\n\n## Outputs\n\n{notes}\n")
    return c.status()


if __name__ == "__main__":
    sys.exit(main())
