"""``relaydiff eval scheduler``: the bandit split scheduler against fixed splits, random and the oracle.

Nothing is generated here: quality and latency are **replayed from a table measured from real
generation** (:class:`SchedulerTable`, built from ``relaydiff eval relay`` reports by
:func:`table_from_relay_reports`), on a mixed, seeded workload (:func:`make_workload`): world prompts
of every complexity, users with different quality weights and phones, network regimes that change over
time, a host whose load rises and falls.

Per request and arm (relay fraction f, device variant v; k = round(f N)):

* quality: the table's prompt accuracy at (v, f, the prompt's complexity); the observed quality is
  1 if a uniform draw falls below it, else 0 (one image passes the scorer's checks or not);
* latency (seconds), :func:`latencies`:

  - k = 0 (device-only, no link): ``device_overhead + N * device_step``
  - k > 0: ``rtt + state_bytes * 8 / bandwidth + host_overhead + k * host_step * (1 + host_queue)
    + (N - k) * device_step + device_overhead``

  with ``device_step = table device step * phone slowness * (1 + device_load)``; the host shares its
  accelerator between in-flight requests (processor sharing), so with q other requests each host step
  takes (1 + q) times as long. The observed latency is this times a log-normal factor (sigma 0.1).
* reward: :func:`relaydiff.host.bandit.reward` of the observed quality and latency with the request's
  weight w and ``latency_scale_s`` (default: 3 x the nominal device-only latency of the first variant).

Every policy sees the same requests and the same random draws. Regret is measured on expected
(noise-free) rewards against the per-context oracle, which knows the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError

TABLE_FORMAT = "relaydiff.scheduler_table"
TABLE_VERSION = 1
MAX_TABLE_BYTES = 16 * 1024 * 1024
DEFAULT_TABLE_PATH = Path(__file__).resolve().parent / "assets" / "scheduler_table.json"
# network regimes: name, RTT seconds, bandwidth Mbit/s
NETWORK_REGIMES = (("wifi", 0.02, 100.0), ("lte", 0.06, 20.0), ("weak", 0.2, 3.0), ("congested", 0.4, 0.8))
PHONE_SLOWNESS = (0.5, 1.0, 1.5)  # device step time relative to the table's measured one (fast, mid, slow phones)
QUALITY_WEIGHTS = (0.1, 0.3, 0.5, 0.7, 0.9)  # users' quality weights w


class TableError(RelaydiffError, ValueError):
    """A scheduler table file is missing or malformed (the message names the field and the value)."""


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantCosts:
    """One device variant's measured quality and speed."""

    device_step_s: float  # seconds per device denoising step (with CFG), from eval relay
    device_overhead_s: float  # seconds of device work besides the steps (text encoding, decoding)
    quality: tuple[tuple[float, ...], ...]  # quality[i][j]: prompt accuracy at complexities[i], fractions[j]


@dataclass(frozen=True)
class SchedulerTable:
    """Quality and cost of every relay configuration, measured from real generation (JSON, format below).

    ``{"format": "relaydiff.scheduler_table", "version": 1, "source": str, "steps": N,
    "fractions": [f...], "complexities": [c...], "host_step_s": s, "host_overhead_s": s,
    "state_bytes": n, "variants": {name: {"device_step_s": s, "device_overhead_s": s,
    "quality": [[q per fraction] per complexity]}}}``
    """

    source: str  # where the numbers come from (family, command, date); printed with every evaluation
    steps: int  # denoising steps N the table was measured with
    fractions: tuple[float, ...]  # relay fractions k/N, increasing, from 0 (device-only) to 1 (host-only)
    complexities: tuple[int, ...]  # prompt complexities (world grammar), increasing
    host_step_s: float  # seconds per host denoising step (with CFG), unloaded
    host_overhead_s: float  # seconds of host work besides the steps (text encoding, state packing)
    state_bytes: int  # bytes sent over the link at the hand-off (relay state, or the final latent at k = N)
    variants: dict[str, VariantCosts] = field(default_factory=dict)  # device variants by name

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, expected: str) -> TableError:
            return TableError(f"scheduler table {name} is {value!r}; expected {expected}")

        if not isinstance(self.source, str):
            raise bad("source", self.source, "a string")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise bad("steps", self.steps, "an integer >= 1")
        fr = tuple(self.fractions)
        if (len(fr) < 2 or any(isinstance(f, bool) or not isinstance(f, (int, float)) for f in fr)
                or fr[0] != 0 or fr[-1] != 1 or any(b <= a for a, b in zip(fr, fr[1:]))):
            raise bad("fractions", self.fractions, "increasing numbers from 0 to 1")
        object.__setattr__(self, "fractions", tuple(float(f) for f in fr))
        cx = tuple(self.complexities)
        if not cx or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in cx) or any(b <= a for a, b in zip(cx, cx[1:])):
            raise bad("complexities", self.complexities, "increasing integers >= 0")
        object.__setattr__(self, "complexities", cx)
        for name in ("host_step_s", "host_overhead_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(name, v, "seconds >= 0")
        if isinstance(self.state_bytes, bool) or not isinstance(self.state_bytes, int) or self.state_bytes < 0:
            raise bad("state_bytes", self.state_bytes, "an integer >= 0")
        if not isinstance(self.variants, dict) or not self.variants:
            raise bad("variants", self.variants, "an object with at least one device variant")
        for name, v in self.variants.items():
            if not isinstance(v, VariantCosts):
                raise bad(f"variants[{name!r}]", v, "a VariantCosts")
            for f in ("device_step_s", "device_overhead_s"):
                x = getattr(v, f)
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                    raise bad(f"variants[{name!r}].{f}", x, "seconds >= 0")
            q = np.asarray(v.quality, dtype=float) if _is_grid(v.quality) else None
            if q is None or q.shape != (len(cx), len(fr)) or not np.all(np.isfinite(q)) or q.min() < 0 or q.max() > 1:
                raise bad(f"variants[{name!r}].quality", v.quality,
                          f"{len(cx)} rows (complexities) of {len(fr)} numbers in [0, 1] (fractions)")

    def quality_grid(self) -> np.ndarray:
        """(variants, complexities, fractions) quality array, variants in table order."""
        return np.array([np.asarray(v.quality, dtype=float) for v in self.variants.values()])

    def complexity_index(self, complexity: float) -> int:
        """Row of the nearest measured complexity (ties: the lower one)."""
        return int(np.argmin([abs(c - complexity) for c in self.complexities]))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": TABLE_FORMAT, "version": TABLE_VERSION, "source": self.source, "steps": self.steps,
            "fractions": list(self.fractions), "complexities": list(self.complexities),
            "host_step_s": self.host_step_s, "host_overhead_s": self.host_overhead_s, "state_bytes": self.state_bytes,
            "variants": {n: {"device_step_s": v.device_step_s, "device_overhead_s": v.device_overhead_s,
                             "quality": [list(r) for r in v.quality]} for n, v in self.variants.items()},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "scheduler table") -> "SchedulerTable":
        keys = {"format", "version", "source", "steps", "fractions", "complexities", "host_step_s", "host_overhead_s",
                "state_bytes", "variants"}
        if not isinstance(obj, dict) or obj.get("format") != TABLE_FORMAT or obj.get("version") != TABLE_VERSION:
            raise TableError(f"{where} is not a {TABLE_FORMAT} version {TABLE_VERSION} file")
        if set(obj) != keys:
            raise TableError(f"{where} has keys {sorted(obj)}; expected {sorted(keys)}")
        variants = obj["variants"]
        if not isinstance(variants, dict):
            raise TableError(f"{where} variants is {variants!r}; expected an object")
        built = {}
        for name, v in variants.items():
            vkeys = {"device_step_s", "device_overhead_s", "quality"}
            if not isinstance(v, dict) or set(v) != vkeys:
                raise TableError(f"{where} variants[{name!r}] is {v!r}; expected an object with keys {sorted(vkeys)}")
            quality = tuple(tuple(r) for r in v["quality"]) if _is_grid(v["quality"]) else v["quality"]
            built[name] = VariantCosts(v["device_step_s"], v["device_overhead_s"], quality)
        return cls(obj["source"], obj["steps"], obj["fractions"], obj["complexities"], obj["host_step_s"],
                   obj["host_overhead_s"], obj["state_bytes"], built)


def _is_grid(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in value)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for r in value for x in r))


def load_table(path: str | Path | None = None) -> SchedulerTable:
    """Read a scheduler table; default ``relaydiff/assets/scheduler_table.json``.

    Raises:
        TableError: the file is missing (with how to build one), too big, not JSON or malformed.
    """
    p = Path(path) if path is not None else DEFAULT_TABLE_PATH
    if not p.is_file():
        raise TableError(
            f"scheduler table not found: '{p}'; measure one with `relaydiff eval relay` and build it with "
            "`relaydiff eval scheduler --from-relay-report VARIANT=report.json --state-bytes N --table PATH`"
        )
    if p.stat().st_size > MAX_TABLE_BYTES:
        raise TableError(f"scheduler table '{p}' is {p.stat().st_size} bytes; the cap is {MAX_TABLE_BYTES}")
    try:
        obj = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TableError(f"scheduler table '{p}' is not JSON: {exc}") from None
    return SchedulerTable.from_json(obj, where=f"scheduler table '{p}'")


QUALITY_METRICS = ("accuracy", "attribute_accuracy")


def table_from_relay_reports(reports: dict[str, dict[str, Any]], *, state_bytes: int, source: str = "",
                             quality_metric: str = "accuracy") -> SchedulerTable:
    """Build a table from ``relaydiff eval relay`` reports, one per device variant (same host, same N).

    Reads each report's ``config.steps`` and ``summary`` (the ``report.json`` of ``write_outputs`` or the
    ``--json`` output): quality = ``accuracy_by_complexity`` per relay step; host seconds = a + b k fitted
    over k > 0 (b: host step, a: overhead), device seconds = a + b (N - k) fitted over every k.

    Args:
        reports: variant name -> parsed report.
        state_bytes: relay state size on the link (``relaydiff relay --json`` prints ``relay_state_bytes``).
        quality_metric: "accuracy" (all of a prompt's checks pass) or "attribute_accuracy" (share of checks
            passed: graded, for a family whose prompt accuracy is near zero on complex prompts).
    Raises:
        TableError: a report lacks a field, the reports disagree on N or the relay steps.
    """
    if not reports:
        raise TableError("no eval relay report given; expected at least one VARIANT=report.json")
    if quality_metric not in QUALITY_METRICS:
        raise TableError(f"quality metric {quality_metric!r} is unknown; expected one of {QUALITY_METRICS}")
    key = "accuracy_by_complexity" if quality_metric == "accuracy" else "attribute_accuracy_by_complexity"
    variants: dict[str, VariantCosts] = {}
    host_fits = []
    steps = fractions = complexities = None
    for name, rep in reports.items():
        try:
            n = int(rep["config"]["steps"])
            summary = sorted(rep["summary"], key=lambda s: s["k"])
            ks = np.array([s["k"] for s in summary], dtype=float)
            by_c = [s[key] for s in summary]
            cx = sorted({int(c) for d in by_c for c in d})
            quality = tuple(tuple(float(d[str(c)][0]) if str(c) in d else float("nan") for d in by_c) for c in cx)
            host_s = np.array([s["host_seconds"] for s in summary], dtype=float)
            dev_s = np.array([s["device_seconds"] for s in summary], dtype=float)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise TableError(f"eval relay report of variant {name!r} lacks {exc}; expected config.steps and summary "
                             "entries with k, accuracy_by_complexity, host_seconds, device_seconds") from None
        fr = tuple(float(k / n) for k in ks)
        if steps is None:
            steps, fractions, complexities = n, fr, cx
        elif (n, fr, cx) != (steps, fractions, complexities):
            raise TableError(f"eval relay report of variant {name!r} has N={n}, fractions {fr}, complexities {cx}; "
                             f"the first report has N={steps}, fractions {fractions}, complexities {complexities}")
        if len(ks) < 3 or ks[0] != 0 or ks[-1] != n:
            raise TableError(f"eval relay report of variant {name!r} has relay steps {ks.tolist()}; expected 0, N and one between")
        hb, ha = np.polyfit(ks[1:], host_s[1:], 1)
        db, da = np.polyfit(n - ks, dev_s, 1)
        host_fits.append((max(hb, 0.0), max(ha, 0.0)))
        variants[name] = VariantCosts(float(max(db, 0.0)), float(max(da, 0.0)), quality)
    hb, ha = np.mean(host_fits, axis=0)
    assert steps is not None and fractions is not None and complexities is not None
    return SchedulerTable(source or f"built from eval relay reports ({quality_metric}): " + ", ".join(reports), steps, fractions,
                          tuple(complexities), float(hb), float(ha), int(state_bytes), variants)


def synthetic_table(*, steps: int = 20, variants: tuple[str, ...] = ("fp32",)) -> SchedulerTable:
    """A made-up table shaped like RISE Fig. 5 (for tests and demos; not a measurement).

    Quality rises from device-only to host-only, faster for simple prompts; the host steps 0.04 s, the
    device 0.3 s (a second variant is 40% faster and 4 points less accurate); the state is 400 kB.
    """
    fractions = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    complexities = (4, 5, 7, 8, 11, 12)
    out = {}
    for i, name in enumerate(variants):
        rows = []
        for c in complexities:
            q_host, q_dev, tau = 0.95 - 0.03 * (c - 4), 0.7 - 0.06 * (c - 4), 0.08 + 0.04 * (c - 4)
            rise = [(1 - math.exp(-f / tau)) / (1 - math.exp(-1 / tau)) for f in fractions]
            rows.append(tuple(round(max(q_dev + (q_host - q_dev) * r - 0.04 * i * (1 - f), 0.0), 4)
                              for f, r in zip(fractions, rise)))
        out[name] = VariantCosts(0.3 * 0.6**i, 0.3, tuple(rows))
    return SchedulerTable("synthetic (relaydiff.eval_scheduler.synthetic_table): not measured", steps, fractions,
                          complexities, 0.04, 0.05, 400_000, out)


# -- the workload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """n requests: arrays of length n (one entry per request), drawn from a seed."""

    prompts: list[str]
    complexity: np.ndarray  # prompt complexity
    weight: np.ndarray  # user's quality weight w
    regime: np.ndarray  # index into NETWORK_REGIMES
    rtt_s: np.ndarray
    bandwidth_mbit_s: np.ndarray
    host_queue: np.ndarray  # other in-flight requests at the host
    host_utilisation: np.ndarray
    slowness: np.ndarray  # the phone's step time relative to the table's
    device_load: np.ndarray
    quality_draw: np.ndarray  # uniform draws: an image passes when the draw is below its quality
    latency_noise: np.ndarray  # log-normal latency factors


def make_workload(n: int, seed: int) -> Workload:
    """A mixed workload: world prompts, five user weights, three phone classes, a network regime that
    switches on average every 150 requests (with 20% jitter), host load rising and falling over ~400
    requests (Poisson queue, mean 0.5 to 12)."""
    from relaydiff.world import parse_prompt, sample_prompts

    rng = np.random.default_rng(seed)
    prompts = sample_prompts(seed, n)
    complexity = np.array([parse_prompt(p).complexity for p in prompts], dtype=float)
    regime = np.empty(n, dtype=int)
    r = int(rng.integers(len(NETWORK_REGIMES)))
    for i in range(n):
        if rng.random() < 1 / 150:
            r = int(rng.integers(len(NETWORK_REGIMES)))
        regime[i] = r
    base = np.array([[rtt, bw] for _, rtt, bw in NETWORK_REGIMES])[regime]
    jitter = rng.lognormal(0.0, 0.2, size=(n, 2))
    t = np.arange(n)
    mean_queue = 0.5 + 11.5 * (0.5 - 0.5 * np.cos(2 * np.pi * t / 400 + rng.uniform(0, 2 * np.pi)))
    queue = rng.poisson(mean_queue).astype(float)
    return Workload(
        prompts=prompts, complexity=complexity,
        weight=rng.choice(QUALITY_WEIGHTS, size=n), regime=regime,
        rtt_s=base[:, 0] * jitter[:, 0], bandwidth_mbit_s=base[:, 1] / jitter[:, 1],
        host_queue=queue, host_utilisation=np.minimum(queue / 4.0, 1.0),
        slowness=rng.choice(PHONE_SLOWNESS, size=n), device_load=rng.uniform(0.0, 0.5, size=n),
        quality_draw=rng.random(n), latency_noise=rng.lognormal(0.0, 0.1, size=n),
    )


def latencies(table: SchedulerTable, w: Workload) -> np.ndarray:
    """(n, arms) expected latency in seconds (model in the module docstring); arms = variants x fractions."""
    n_steps = table.steps
    ks = np.array([round(f * n_steps) for f in table.fractions], dtype=float)[None, :]
    out = []
    for v in table.variants.values():
        dev_step = (v.device_step_s * w.slowness * (1 + w.device_load))[:, None]
        link = (w.rtt_s + table.state_bytes * 8 / (w.bandwidth_mbit_s * 1e6))[:, None]
        host = table.host_overhead_s + ks * table.host_step_s * (1 + w.host_queue[:, None])
        relayed = link + host + (n_steps - ks) * dev_step + v.device_overhead_s
        device_only = v.device_overhead_s + n_steps * dev_step
        out.append(np.where(ks == 0, device_only, relayed))
    return np.concatenate(out, axis=1)


def qualities(table: SchedulerTable, w: Workload) -> np.ndarray:
    """(n, arms) expected quality: the table's accuracy at each request's nearest complexity."""
    grid = table.quality_grid()  # (variants, complexities, fractions)
    rows = np.array([table.complexity_index(c) for c in w.complexity])
    return np.concatenate([grid[v][rows] for v in range(grid.shape[0])], axis=1)


# -- the evaluation -------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerEvalConfig:
    """What ``relaydiff eval scheduler`` runs."""

    requests: int = 2000  # requests in the workload
    seed: int = 0  # workload seed (prompts, users, network, load, noise) and the random policy's seed
    alpha: float = 0.3  # LinUCB exploration of the bandit
    latency_scale_s: float | None = None  # reward latency scale; None: 3 x nominal device-only latency
    target_within: int = 500  # the bandit should reach target_ratio of the oracle's reward by this request
    target_ratio: float = 0.9
    window: int = 100  # requests in the moving average used for the target

    def __post_init__(self) -> None:
        if isinstance(self.requests, bool) or not isinstance(self.requests, int) or self.requests < 1:
            raise RelaydiffError(f"--requests must be an integer >= 1, got {self.requests!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RelaydiffError(f"--seed must be an integer >= 0, got {self.seed!r}")
        if self.latency_scale_s is not None and not (math.isfinite(self.latency_scale_s) and self.latency_scale_s > 0):
            raise RelaydiffError(f"latency_scale_s must be > 0 seconds, got {self.latency_scale_s!r}")


def _contexts(table: SchedulerTable, w: Workload, i: int) -> Any:
    from relaydiff.host.bandit import BanditContext

    first = next(iter(table.variants.values()))
    return BanditContext(
        complexity=float(w.complexity[i]), quality_weight=float(w.weight[i]), rtt_s=float(w.rtt_s[i]),
        bandwidth_mbit_s=float(w.bandwidth_mbit_s[i]), host_queue=float(w.host_queue[i]),
        host_utilisation=float(w.host_utilisation[i]),
        device_steps_per_second=1.0 / (first.device_step_s * float(w.slowness[i])) if first.device_step_s > 0 else 1e4,
        device_load=float(w.device_load[i]), steps=table.steps,
    )


def run_scheduler_eval(table: SchedulerTable, cfg: SchedulerEvalConfig, *, progress: bool = False) -> dict[str, Any]:
    """Replay the workload through every policy; returns the report (JSON-ready) and the curves."""
    from tqdm.auto import tqdm

    from relaydiff.host.bandit import Arm, BanditConfig, BanditPolicy

    w = make_workload(cfg.requests, cfg.seed)
    first = next(iter(table.variants.values()))
    scale = cfg.latency_scale_s or 3.0 * (first.device_overhead_s + table.steps * first.device_step_s)
    arms = [Arm(f, v) for v in table.variants for f in table.fractions]
    lat = latencies(table, w)  # (n, arms)
    qual = qualities(table, w)
    wt = w.weight[:, None]
    expected = wt * qual + (1 - wt) * (1 - np.minimum(lat / scale, 1))
    passed = (w.quality_draw[:, None] < qual).astype(float)
    observed_lat = lat * w.latency_noise[:, None]
    observed = wt * passed + (1 - wt) * (1 - np.minimum(observed_lat / scale, 1))
    n, rows = cfg.requests, np.arange(cfg.requests)

    choices: dict[str, np.ndarray] = {}
    bandit = BanditPolicy(BanditConfig(fractions=table.fractions, variants=tuple(table.variants), alpha=cfg.alpha,
                                       latency_scale_s=scale, seed=cfg.seed))
    index = {a.name: j for j, a in enumerate(arms)}
    chosen = np.empty(n, dtype=int)
    for i in tqdm(range(n), desc="bandit", disable=not progress):
        ctx = _contexts(table, w, i)
        arm = bandit.choose_arm(ctx)
        chosen[i] = index[arm.name]
        bandit.record(ctx, arm, float(observed[i, chosen[i]]))
    choices["bandit (LinUCB)"] = chosen
    choices["oracle"] = expected.argmax(axis=1)
    choices["random"] = np.random.default_rng(cfg.seed + 1).integers(len(arms), size=n)
    rule = [min(range(len(table.fractions)), key=lambda j: abs(table.fractions[j] - (0.2 + 0.6 * x))) for x in w.weight]
    choices["preference rule (FixedPolicy)"] = np.array(rule)
    for j, a in enumerate(arms):
        label = "device-only" if a.fraction == 0 else "host-only" if a.fraction == 1 else f"fixed k/N={a.fraction:g}"
        choices[label if len(table.variants) == 1 else f"{label} @{a.variant}"] = np.full(n, j)

    oracle_exp = expected[rows, choices["oracle"]]
    policies: list[dict[str, Any]] = []
    curves: dict[str, np.ndarray] = {}
    for name, c in choices.items():
        exp_r = expected[rows, c]
        regret = np.cumsum(oracle_exp - exp_r)
        curves[name] = regret
        policies.append({
            "policy": name, "fixed": name.startswith(("device-only", "host-only", "fixed")),
            "reward": float(observed[rows, c].mean()), "expected_reward": float(exp_r.mean()),
            "quality": float(qual[rows, c].mean()), "latency_s": float(observed_lat[rows, c].mean()),
            "regret": float(regret[-1]), "share_of_oracle": float(exp_r.sum() / oracle_exp.sum()),
        })
    best_fixed = max((p for p in policies if p["fixed"]), key=lambda p: p["expected_reward"])
    band = next(p for p in policies if p["policy"] == "bandit (LinUCB)")
    kernel = np.ones(cfg.window)
    win = min(cfg.window, n)
    b_roll = np.convolve(expected[rows, choices["bandit (LinUCB)"]], kernel[:win], "valid")
    o_roll = np.convolve(oracle_exp, kernel[:win], "valid")
    ratio = b_roll / o_roll  # ratio[t]: requests t .. t + win - 1
    hit = np.nonzero(ratio >= cfg.target_ratio)[0]
    reached_at = int(hit[0] + win) if hit.size else None
    counts = np.bincount(choices["bandit (LinUCB)"][-min(500, n):], minlength=len(arms))
    report = {
        "source": f"quality and latency replayed from a scheduler table measured from real generation, not generated here; table source: {table.source}",
        "table": {"steps": table.steps, "fractions": list(table.fractions), "complexities": list(table.complexities),
                  "variants": list(table.variants)},
        "config": asdict(cfg), "latency_scale_s": scale,
        "reward": "w * quality + (1 - w) * (1 - min(latency_s / latency_scale_s, 1))",
        "policies": sorted(policies, key=lambda p: -p["expected_reward"]),
        "best_fixed": best_fixed["policy"],
        "bandit_late_arms": {arms[j].name: int(c) for j, c in enumerate(counts) if c},
        "targets": {
            "beats_best_fixed": bool(band["expected_reward"] > best_fixed["expected_reward"]),
            "bandit_expected_reward": band["expected_reward"], "best_fixed_expected_reward": best_fixed["expected_reward"],
            f"reaches_{cfg.target_ratio:g}_of_oracle_within_{cfg.target_within}": bool(reached_at is not None and reached_at <= cfg.target_within),
            "reached_at_request": reached_at,  # first request ending a moving window at >= target_ratio of the oracle
            f"share_of_oracle_first_{min(cfg.target_within, n)}": float(
                expected[rows, choices["bandit (LinUCB)"]][: cfg.target_within].sum() / oracle_exp[: cfg.target_within].sum()),
            f"moving_{win}_share_of_oracle_at_{min(cfg.target_within, n)}": float(ratio[max(min(cfg.target_within, n) - win, 0)]),
        },
    }
    return {"report": report, "regret": curves}


def write_scheduler_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write report.json and regret.png (cumulative regret vs the oracle over requests) into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report.json": str(out_dir / "report.json"), "regret.png": str(out_dir / "regret.png")}
    Path(paths["report.json"]).write_text(json.dumps(result["report"], indent=2) + "\n")
    report = result["report"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    shown = ["bandit (LinUCB)", report["best_fixed"], "preference rule (FixedPolicy)", "random", "host-only", "device-only"]
    for name in dict.fromkeys(shown):
        if name in result["regret"]:
            ax.plot(result["regret"][name], lw=2.2 if name.startswith("bandit") else 1.2, label=name)
    ax.set_xlabel("request")
    ax.set_ylabel("cumulative regret vs per-context oracle")
    ax.set_title("split scheduler (replayed from a measured table)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["regret.png"], dpi=110)
    plt.close(fig)
    return paths
