"""A contextual-bandit split scheduler (RISE section 4): LinUCB over relay configurations.

An **arm** is a relay configuration: the hand-off at fraction f of the N steps (0 = device-only,
1 = host-only) on a device model variant, with a device budget b: the share of the device's N - k steps
that run the full UNet, the others from cached deep features (feature caching, docs/cache.md; b = 1: no
caching). Arms are k x variant x budget. The **context** of a request is what the host knows when it
chooses: prompt complexity, the user's quality weight, link RTT and bandwidth, host queue and
utilisation, device speed and device load (:class:`BanditContext`). The **reward** of a finished
request is :func:`reward`:

    r = w * quality + (1 - w) * (1 - min(latency_s / latency_scale_s, 1))      in [0, 1]

with w the request's ``quality_preference`` (0 = only speed counts, 1 = only quality), quality the
device's ``Feedback.quality`` in [0, 1] and latency the ``Feedback.latency_s``.

Each arm's expected reward is modelled as linear in the features of :func:`features` (LinUCB, Li et
al. 2010, as cited by RISE), fitted by mabwiser's ``LearningPolicy.LinUCB``. The features are the
context's raw values and their products with w and 1 - w, so that "quality counts with weight w,
latency with 1 - w" is linear in them.

Cold start: before any feedback the model is fitted on a few synthetic observations (the prior,
:meth:`BanditConfig.prior_fraction`): for weight w the fraction 0.2 + 0.6 w looks best, as with
:class:`~relaydiff.host.policy.FixedPolicy`; real feedback outweighs it after a few requests per arm.

Forgetting: the model covers a sliding window of the most recent observations, between
``ceil(max_history / 2)`` and ``max_history`` of them, kept without ever refitting the history from
scratch: a second (shadow) model learns every observation past the first half of the window, and when
the window is full the shadow replaces the model (its history drops the oldest half) and a fresh shadow
starts from the prior. Each observation costs two ``partial_fit`` calls, whatever the window.

State: the config and the window's observations (context, arm, reward) are saved as JSON Lines
(:meth:`BanditPolicy.flush`, :meth:`BanditPolicy.save`, :meth:`BanditPolicy.load`): the first line is one
JSON object (format, version, config, features and the observations at the last compaction), each
further line one observation appended since. Appending costs one line per observation; the file is
rewritten (compacted, atomically) only when the window drops its oldest half or the appended lines
outnumber ``max_history``. Loading replays the prior and then each observation in order, which gives the
same model (bit for bit) as the one that saved it. mabwiser's own persistence is pickle, which we never load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from relaydiff.core.errors import RelaydiffError
from relaydiff.host.policy import Conditions
from relaydiff.link.events import DeviceCapabilities, Feedback, GenerateRequest

log = logging.getLogger(__name__)

STATE_FORMAT = "relaydiff.bandit"
STATE_VERSION = 1
MAX_STATE_BYTES = 64 * 1024 * 1024  # refuse to read a bigger state file
COMPLEXITY_SCALE = 12.0  # the largest complexity of the world grammar (3 objects, 2 relations, background)
_VARIANT = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_OBSERVATION_KEYS = {"context", "fraction", "variant", "budget", "reward"}
FEATURE_NAMES = (
    "bias", "w", "complexity", "w*complexity", "(1-w)*rtt", "(1-w)*mb_transfer", "(1-w)*host_queue",
    "(1-w)*host_utilisation", "(1-w)*device_compute", "(1-w)*device_compute*device_load",
)


class BanditError(RelaydiffError, ValueError):
    """A bad context value, arm, reward or state file for the bandit (the message quotes the value)."""


def _number(where: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> float:
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BanditError(f"{where} is {value!r}; expected a number in {span}")
    x = float(value)
    if not math.isfinite(x) or x < lo or x > hi or (lo_open and x == lo):
        raise BanditError(f"{where} is {value!r}; expected a finite number in {span}")
    return x


# -- reward ---------------------------------------------------------------------------------


def reward(quality: float, latency_s: float, quality_weight: float, latency_scale_s: float) -> float:
    """r = w * quality + (1 - w) * (1 - min(latency_s / latency_scale_s, 1)), in [0, 1].

    Raises:
        BanditError: quality or w outside [0, 1], a negative or non-finite latency, a scale <= 0.
    """
    q = _number("quality", quality, 0.0, 1.0)
    lat = _number("latency_s", latency_s, 0.0)
    w = _number("quality_weight", quality_weight, 0.0, 1.0)
    scale = _number("latency_scale_s", latency_scale_s, 0.0, lo_open=True)
    return w * q + (1.0 - w) * (1.0 - min(lat / scale, 1.0))


# -- context --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BanditContext:
    """What the scheduler knows about one request when it chooses; validated on construction."""

    complexity: float  # prompt complexity (world grammar attributes, see prompt_complexity), >= 0
    quality_weight: float  # the user's weight w in [0, 1]: 0 = only latency counts, 1 = only quality
    rtt_s: float  # link round-trip time estimate, seconds >= 0
    bandwidth_mbit_s: float  # link bandwidth estimate, Mbit/s > 0
    host_queue: float  # other requests waiting on / running at the host, >= 0
    host_utilisation: float  # busy share of the host's workers, [0, 1]
    device_steps_per_second: float  # the device's measured denoising speed (DeviceCapabilities), > 0
    device_load: float  # the device's own load, [0, 1]
    steps: int = 25  # denoising steps N of the request

    def __post_init__(self) -> None:
        limits = {
            "complexity": (0.0, 1e4, False), "quality_weight": (0.0, 1.0, False), "rtt_s": (0.0, 3600.0, False),
            "bandwidth_mbit_s": (0.0, 1e6, True), "host_queue": (0.0, 1e6, False), "host_utilisation": (0.0, 1.0, False),
            "device_steps_per_second": (0.0, 1e4, True), "device_load": (0.0, 1.0, False),
        }
        for name, (lo, hi, lo_open) in limits.items():
            object.__setattr__(self, name, _number(f"context {name}", getattr(self, name), lo, hi, lo_open=lo_open))
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or not 1 <= self.steps <= 10_000:
            raise BanditError(f"context steps is {self.steps!r}; expected an integer in [1, 10000]")
        object.__setattr__(self, "steps", int(self.steps))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> "BanditContext":
        if not isinstance(obj, dict) or set(obj) != {f.name for f in fields(cls)}:
            raise BanditError(f"bandit context is {obj!r}; expected an object with keys {sorted(f.name for f in fields(cls))}")
        return cls(**obj)


def prompt_complexity(prompt: str) -> float:
    """Attributes a prompt asks for: ``parse_prompt(prompt).complexity`` for world captions (4..12);
    for other prompts half their word count (world captions have about two words per attribute)."""
    from relaydiff.world import parse_prompt

    try:
        return float(parse_prompt(prompt).complexity)
    except ValueError:
        return len(prompt.split()) / 2.0


def features(ctx: BanditContext, latency_scale_s: float) -> np.ndarray:
    """The LinUCB feature vector of a context (names in FEATURE_NAMES); latencies are in units of the scale.

    1. bias, w, complexity c / 12 and w * c: the quality term w * quality(arm, c);
    2. (1 - w) times each latency driver: RTT, seconds to move 1 MB, host queue / 10, host utilisation,
       device-only compute N / speed and that times the device load: the (1 - w) * latency term.
    """
    w, c = ctx.quality_weight, ctx.complexity / COMPLEXITY_SCALE
    v = 1.0 - w
    s = latency_scale_s
    device_compute = ctx.steps / ctx.device_steps_per_second / s
    mb_transfer = 8.0 / ctx.bandwidth_mbit_s / s
    return np.array([
        1.0, w, c, w * c, v * ctx.rtt_s / s, v * mb_transfer, v * ctx.host_queue / 10.0, v * ctx.host_utilisation,
        v * device_compute, v * device_compute * ctx.device_load,
    ])


# -- config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """A relay configuration: hand over at round(fraction * N) to the device model ``variant``, which runs
    round(budget * (N - k)) of its steps as full UNet passes (at least 1; budget 1 = every step, no caching)."""

    fraction: float  # 0 = device-only, 1 = host-only
    variant: str  # device model variant name
    budget: float = 1.0  # share of the device's N - k steps run as full passes, in (0, 1]

    @property
    def name(self) -> str:
        base = f"{self.fraction:g}@{self.variant}"
        return base if self.budget == 1.0 else f"{base}/b{self.budget:g}"  # uncached arms keep their old names

    def relay_step(self, steps: int) -> int:
        return min(max(round(self.fraction * steps), 0), steps)

    def device_budget(self, steps: int) -> int | None:
        """The cache budget B in [1, N - k] this arm gives the device, or None (no caching, or no device steps)."""
        m = steps - self.relay_step(steps)
        if self.budget >= 1.0 or m <= 0:
            return None
        return max(1, min(m, round(self.budget * m)))


@dataclass(frozen=True)
class BanditConfig:
    """Everything that defines a bandit; saved with its state so that a state file alone rebuilds it."""

    fractions: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # relay fractions of N, the arms' first axis
    variants: tuple[str, ...] = ("device",)  # device model variant names, the arms' second axis
    budgets: tuple[float, ...] = (1.0,)  # device budgets as shares of N - k in (0, 1], the arms' third axis (1 = no caching)
    alpha: float = 0.3  # LinUCB exploration: width of the confidence bonus
    l2_lambda: float = 1.0  # ridge regularisation of each arm's linear model
    latency_scale_s: float = 30.0  # latency normalisation of the reward (a latency >= this scores 0)
    seed: int = 0  # seed of mabwiser's generator (LinUCB itself draws nothing; ties go to the first arm)
    max_history: int = 5000  # most observations the model covers (and the state keeps); the oldest half is forgotten beyond it
    prior_weight: int = 2  # synthetic observations per arm and prior weight level (0: no prior)
    default_rtt_s: float = 0.05  # RTT used when the host has not measured one
    default_bandwidth_mbit_s: float = 20.0  # bandwidth used when the host has not measured one
    default_device_steps_per_second: float = 1.0  # device speed used when the device announced none
    default_device_load: float = 0.0  # device load used when the device reported none

    def __post_init__(self) -> None:
        fr = self.fractions
        if not isinstance(fr, (tuple, list)) or not fr:
            raise BanditError(f"BanditConfig.fractions is {fr!r}; expected a non-empty list of numbers in [0, 1]")
        object.__setattr__(self, "fractions", tuple(_number("BanditConfig.fractions item", f, 0.0, 1.0) for f in fr))
        if len(set(self.fractions)) != len(self.fractions):
            raise BanditError(f"BanditConfig.fractions {self.fractions!r} has duplicates")
        va = self.variants
        if isinstance(va, str) or not isinstance(va, (tuple, list)) or not va or len(set(va)) != len(va):
            raise BanditError(f"BanditConfig.variants is {va!r}; expected a non-empty list of distinct names")
        for v in va:
            if not isinstance(v, str) or not _VARIANT.fullmatch(v):
                raise BanditError(f"BanditConfig.variants item is {v!r}; expected a name matching {_VARIANT.pattern}")
        object.__setattr__(self, "variants", tuple(va))
        bu = self.budgets
        if not isinstance(bu, (tuple, list)) or not bu:
            raise BanditError(f"BanditConfig.budgets is {bu!r}; expected a non-empty list of numbers in (0, 1]")
        object.__setattr__(self, "budgets", tuple(_number("BanditConfig.budgets item", b, 0.0, 1.0, lo_open=True) for b in bu))
        if len(set(self.budgets)) != len(self.budgets):
            raise BanditError(f"BanditConfig.budgets {self.budgets!r} has duplicates")
        for name in ("alpha", "l2_lambda", "latency_scale_s", "default_bandwidth_mbit_s", "default_device_steps_per_second"):
            _number(f"BanditConfig.{name}", getattr(self, name), 0.0, lo_open=True)
        _number("BanditConfig.default_rtt_s", self.default_rtt_s, 0.0)
        _number("BanditConfig.default_device_load", self.default_device_load, 0.0, 1.0)
        for name, lo in (("seed", 0), ("max_history", 1), ("prior_weight", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise BanditError(f"BanditConfig.{name} is {value!r}; expected an integer >= {lo}")

    @property
    def arms(self) -> tuple[Arm, ...]:
        return tuple(Arm(f, v, b) for v in self.variants for b in self.budgets for f in self.fractions)

    @staticmethod
    def prior_fraction(quality_weight: float) -> float:
        """The fraction the prior favours for weight w: 0.2 + 0.6 w (FixedPolicy's default)."""
        return 0.2 + 0.6 * quality_weight

    def prior_reward(self, arm: Arm, quality_weight: float) -> float:
        """Synthetic reward of the prior: 0.6 at the favoured fraction, falling 0.3 per unit of distance; a cached
        arm (budget b < 1) loses 0.1 (1 - b) w: caching trades a little quality for device time, and until feedback
        says otherwise the uncached arm of a fraction is preferred."""
        return 0.6 - 0.3 * abs(arm.fraction - self.prior_fraction(quality_weight)) - 0.1 * (1.0 - arm.budget) * (0.5 + quality_weight)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, obj: Any) -> "BanditConfig":
        known = {f.name for f in fields(cls)}
        if not isinstance(obj, dict) or not set(obj) <= known:
            raise BanditError(f"bandit config is {obj!r}; expected an object with keys among {sorted(known)}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()}
        return cls(**values)


@dataclass(frozen=True)
class Observation:
    """One finished request: its context, the arm played and the reward it earned."""

    context: BanditContext
    arm: Arm
    reward: float

    def to_json(self) -> dict[str, Any]:
        return {"context": self.context.to_json(), "fraction": self.arm.fraction, "variant": self.arm.variant,
                "budget": self.arm.budget, "reward": self.reward}

    def to_line(self) -> str:
        """One JSON Lines line (with its newline) of the state file."""
        return json.dumps(self.to_json()) + "\n"


# -- the policy -----------------------------------------------------------------------------


class BanditPolicy:
    """LinUCB over (relay fraction x device variant x device budget) arms; a :class:`~relaydiff.host.policy.ContextualPolicy`
    and a :class:`~relaydiff.host.policy.BudgetPolicy` (the controller sends the chosen budget in the relay state).

    Use :meth:`choose_arm` / :meth:`record` directly (simulations), or let the
    :class:`~relaydiff.host.controller.HostServer` call :meth:`choose_in` / :meth:`observe`.
    The controller applies k and the budget (in the relay state); with several variants configured, the variant
    part of the arm is recorded but not yet sent to the device (the protocol has no field for it).
    """

    MAX_PENDING = 10_000  # chosen requests waiting for Feedback; the oldest are dropped beyond it

    def __init__(self, config: BanditConfig | None = None, *, state_path: str | Path | None = None,
                 autosave: bool = True) -> None:
        """
        Args:
            config: see :class:`BanditConfig`.
            state_path: if given, the state is kept there (JSON Lines; see :meth:`flush`).
            autosave: with a state path, :meth:`record` also flushes (on the caller's thread); False leaves
                :meth:`flush` to the caller (the host server calls it in a worker thread, off its event loop).
        """
        self.config = config if config is not None else BanditConfig()
        if not isinstance(self.config, BanditConfig):
            raise TypeError(f"config must be a BanditConfig, got {type(self.config).__name__}")
        self.state_path = Path(state_path) if state_path is not None else None
        self.autosave = bool(autosave)
        self._arms = {a.name: a for a in self.config.arms}
        self.history: list[Observation] = []  # the observations the model covers, oldest first
        self._pending: OrderedDict[tuple[str, str], tuple[BanditContext, Arm]] = OrderedDict()
        self._lock = threading.Lock()  # guards history and the unsaved bookkeeping between record() and flush()
        self._write_lock = threading.Lock()  # one flush at a time
        self._unsaved: list[Observation] = []  # recorded since the last flush (appended on the next one)
        self._compact = True  # the next flush rewrites the whole file (nothing written yet, or the window moved)
        self._journal_lines = 0  # observation lines appended after the file's first line
        self._refit()

    @property
    def half_window(self) -> int:
        """Observations the model keeps when its window moves: ceil(max_history / 2)."""
        return (self.config.max_history + 1) // 2

    # -- model ----------------------------------------------------------------------------

    def _prior(self) -> tuple[list[str], list[float], list[np.ndarray]]:
        cfg = self.config
        decisions, rewards, contexts = [], [], []
        for w in (0.0, 0.5, 1.0):
            ctx = self._default_context(complexity=6.0, quality_weight=w, steps=25)
            x = features(ctx, cfg.latency_scale_s)
            for arm in cfg.arms:
                for _ in range(cfg.prior_weight):
                    decisions.append(arm.name)
                    rewards.append(cfg.prior_reward(arm, w))
                    contexts.append(x)
        return decisions, rewards, contexts

    def _fresh(self) -> Any:
        """A mabwiser LinUCB fitted on the prior only."""
        from mabwiser.mab import MAB, LearningPolicy

        cfg = self.config
        mab = MAB(list(self._arms), LearningPolicy.LinUCB(alpha=cfg.alpha, l2_lambda=cfg.l2_lambda), seed=cfg.seed, n_jobs=1)
        decisions, rewards, contexts = self._prior()
        if not decisions:  # no prior: fit on zero rows to initialise the per-arm models
            mab.fit(np.array([], dtype=object), np.zeros(0), np.zeros((0, len(FEATURE_NAMES))))
        else:
            mab.fit(np.array(decisions, dtype=object), np.array(rewards), np.stack(contexts))
        return mab

    def _refit(self) -> None:
        """Rebuild both models from the prior and the kept history, in order (as when the observations came).

        Used at construction and load only; recording never refits (see the module docstring)."""
        while len(self.history) > self.config.max_history:  # a file from a larger window: move it as record() would
            del self.history[: self.half_window]
        self._mab, self._shadow = self._fresh(), self._fresh()
        for i, obs in enumerate(self.history):
            self._learn(self._mab, obs)
            if i >= self.half_window:
                self._learn(self._shadow, obs)

    def _learn(self, mab: Any, obs: Observation) -> None:
        x = features(obs.context, self.config.latency_scale_s)[None, :]
        mab.partial_fit(np.array([obs.arm.name], dtype=object), np.array([obs.reward]), x)

    def expectations(self, context: BanditContext) -> dict[Arm, float]:
        """Each arm's upper confidence bound of the reward in ``context``."""
        if not isinstance(context, BanditContext):
            raise TypeError(f"context must be a BanditContext, got {type(context).__name__}")
        x = features(context, self.config.latency_scale_s)[None, :]
        ucb = self._mab.predict_expectations(x)
        return {arm: float(ucb[name]) for name, arm in self._arms.items()}

    def choose_arm(self, context: BanditContext, *, variants: tuple[str, ...] | None = None) -> Arm:
        """The arm with the highest upper confidence bound (ties: the first in config order).

        Args:
            variants: restrict to these device variants (e.g. those the device has); default all.
        Raises:
            BanditError: an unknown variant.
        """
        allowed = self.config.variants if variants is None else tuple(variants)
        for v in allowed:
            self._check_variant(v)
        ucb = self.expectations(context)
        candidates = [a for a in self.config.arms if a.variant in allowed]
        if not candidates:
            raise BanditError(f"variants is {variants!r}; expected at least one of {list(self.config.variants)}")
        return max(candidates, key=lambda a: ucb[a])  # max keeps the first of equal values

    def record(self, context: BanditContext, arm: Arm, reward_value: float) -> None:
        """Learn from one finished request (and save the state when a state path is set).

        Raises:
            BanditError: an arm not configured, a reward outside [0, 1].
        """
        if not isinstance(context, BanditContext):
            raise TypeError(f"context must be a BanditContext, got {type(context).__name__}")
        arm = self._check_arm(arm)
        obs = Observation(context, arm, _number("reward", reward_value, 0.0, 1.0))
        half = self.half_window
        with self._lock:
            self.history.append(obs)
            self._unsaved.append(obs)
            self._learn(self._mab, obs)
            if len(self.history) > half:
                self._learn(self._shadow, obs)  # the shadow covers history[half:]
            if len(self.history) > self.config.max_history:  # the window is full: the shadow takes over
                del self.history[:half]
                self._mab, self._shadow = self._shadow, self._fresh()
                for o in self.history[half:]:  # at most one observation
                    self._learn(self._shadow, o)
                self._compact = True
        if self.state_path is not None and self.autosave:
            self.flush()

    def _check_variant(self, variant: Any) -> str:
        if variant not in self.config.variants:
            raise BanditError(f"device variant is {variant!r}; expected one of {list(self.config.variants)}")
        return variant

    def _check_arm(self, arm: Any) -> Arm:
        if not isinstance(arm, Arm):
            raise TypeError(f"arm must be an Arm, got {type(arm).__name__}")
        self._check_variant(arm.variant)
        if arm.name not in self._arms:
            if arm.fraction not in self.config.fractions:
                raise BanditError(f"relay fraction is {arm.fraction!r}; expected one of {list(self.config.fractions)}")
            raise BanditError(f"device budget is {arm.budget!r}; expected one of {list(self.config.budgets)}")
        return self._arms[arm.name]

    # -- the Policy protocol ----------------------------------------------------------------

    def _default_context(self, *, complexity: float, quality_weight: float, steps: int) -> BanditContext:
        cfg = self.config
        return BanditContext(
            complexity=complexity, quality_weight=quality_weight, rtt_s=cfg.default_rtt_s,
            bandwidth_mbit_s=cfg.default_bandwidth_mbit_s, host_queue=0.0, host_utilisation=0.0,
            device_steps_per_second=cfg.default_device_steps_per_second, device_load=cfg.default_device_load, steps=steps,
        )

    def context(self, request: GenerateRequest, capabilities: DeviceCapabilities | None, steps: int,
                conditions: Conditions | None = None) -> BanditContext:
        """The context of a request: its prompt and weight, the device's speed, the serving conditions
        (unmeasured ones take the config's defaults). Raises BanditError for bad values."""
        cfg = self.config
        cond = conditions if conditions is not None else Conditions()
        sps = capabilities.steps_per_second if capabilities is not None else cfg.default_device_steps_per_second
        return BanditContext(
            complexity=prompt_complexity(request.prompt), quality_weight=request.quality_preference,
            rtt_s=cfg.default_rtt_s if cond.rtt_s is None else cond.rtt_s,
            bandwidth_mbit_s=cfg.default_bandwidth_mbit_s if cond.bandwidth_mbit_s is None else cond.bandwidth_mbit_s,
            host_queue=cond.host_queue, host_utilisation=cond.host_utilisation, device_steps_per_second=sps,
            device_load=cfg.default_device_load if cond.device_load is None else cond.device_load, steps=steps,
        )

    def choose_in(self, request: GenerateRequest, capabilities: DeviceCapabilities | None, steps: int,
                  conditions: Conditions) -> int:
        ctx = self.context(request, capabilities, steps, conditions)
        arm = self.choose_arm(ctx)
        self._pending[(request.request_id, request.prompt)] = (ctx, arm)
        while len(self._pending) > self.MAX_PENDING:
            self._pending.popitem(last=False)
        return arm.relay_step(steps)

    def choose(self, request: GenerateRequest, capabilities: DeviceCapabilities | None, steps: int) -> int:
        return self.choose_in(request, capabilities, steps, Conditions())

    def device_budget(self, request: GenerateRequest, relay_step: int, steps: int) -> int | None:
        """The cache budget B of the arm chosen for ``request`` (None: no caching, or no choice pending)."""
        chosen = self._pending.get((request.request_id, request.prompt))
        if chosen is None or chosen[1].relay_step(steps) != relay_step:
            return None
        return chosen[1].device_budget(steps)

    def observe(self, request: GenerateRequest, relay_step: int, feedback: Feedback) -> None:
        """Learn from the Feedback of a request this policy chose k for (others are ignored)."""
        chosen = self._pending.pop((request.request_id, request.prompt), None)
        if chosen is None:
            return
        ctx, arm = chosen
        if arm.relay_step(ctx.steps) != relay_step:  # k was overridden: credit the nearest configured fraction
            f = min(self.config.fractions, key=lambda f: abs(f - relay_step / ctx.steps))
            arm = self._arms[Arm(f, arm.variant, arm.budget).name]
        r = reward(feedback.quality, feedback.latency_s, ctx.quality_weight, self.config.latency_scale_s)
        self.record(ctx, arm, r)

    # -- persistence --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The whole state as one JSON object (the first line of a compacted state file)."""
        with self._lock:
            return self._header(list(self.history))

    def _header(self, observations: list[Observation]) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "config": self.config.to_json(),
                "features": list(FEATURE_NAMES), "observations": [o.to_json() for o in observations]}

    def save(self, path: str | Path) -> Path:
        """Write the config and observation history as one JSON object (atomically: temp file, then rename)."""
        with self._lock:
            snapshot = list(self.history)
        return _write_atomic(Path(path), json.dumps(self._header(snapshot)) + "\n")

    @property
    def dirty(self) -> bool:
        """Observations recorded since the last :meth:`flush` (or nothing written yet)."""
        return self.state_path is not None and (bool(self._unsaved) or self._compact)

    def flush(self) -> bool:
        """Bring the state file up to date: append the new observations, or compact it (see the module docstring).

        Thread-safe against :meth:`record`; True when something was written.

        Raises:
            OSError: the file cannot be written (the unsaved observations are kept for the next flush).
        """
        if self.state_path is None:
            return False
        with self._write_lock:
            with self._lock:
                compact = self._compact or self._journal_lines + len(self._unsaved) > self.config.max_history
                pending, self._unsaved, self._compact = self._unsaved, [], False
                snapshot = list(self.history) if compact else []
            if not compact and not pending:
                return False
            try:
                if compact:
                    _write_atomic(self.state_path, json.dumps(self._header(snapshot)) + "\n")
                    self._journal_lines = 0
                else:
                    with self.state_path.open("a", encoding="utf-8") as f:
                        f.write("".join(o.to_line() for o in pending))
                    self._journal_lines += len(pending)
            except OSError:
                with self._lock:
                    self._unsaved = pending + self._unsaved
                    self._compact = self._compact or compact
                raise
            return True

    @classmethod
    def load(cls, path: str | Path, *, state_path: str | Path | None = None, autosave: bool = True) -> "BanditPolicy":
        """Rebuild a bandit from a file written by :meth:`save` or :meth:`flush` (same config, history and model).

        Args:
            state_path / autosave: where the loaded bandit keeps its state from now on (see the constructor).
        Raises:
            BanditError: a missing, oversized or malformed file, or values that fail validation.
        """
        path = Path(path)
        if not path.is_file():
            raise BanditError(f"bandit state file not found: '{path}'")
        if path.stat().st_size > MAX_STATE_BYTES:
            raise BanditError(f"bandit state file '{path}' is {path.stat().st_size} bytes; the cap is {MAX_STATE_BYTES}")
        try:
            lines = path.read_bytes().decode("utf-8").splitlines()
            obj = json.loads(lines[0] if lines else "")
            appended = [json.loads(line) for line in lines[1:] if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BanditError(f"bandit state file '{path}' is not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("format") != STATE_FORMAT or obj.get("version") != STATE_VERSION:
            raise BanditError(f"'{path}' is not a {STATE_FORMAT} version {STATE_VERSION} state file")
        if obj.get("features") != list(FEATURE_NAMES):
            raise BanditError(f"'{path}' has features {obj.get('features')!r}; this version uses {list(FEATURE_NAMES)}")
        policy = cls(BanditConfig.from_json(obj.get("config")), state_path=state_path, autosave=autosave)
        observations = obj.get("observations")
        if not isinstance(observations, list):
            raise BanditError(f"'{path}' observations is {observations!r}; expected a list")
        history = []
        for o in observations + appended:
            if not isinstance(o, dict) or not {"context", "fraction", "variant", "reward"} <= set(o) <= _OBSERVATION_KEYS:
                raise BanditError(f"'{path}' has an observation {o!r}; expected keys context, fraction, variant, reward "
                                  "(and budget)")
            budget = _number("observation budget", o.get("budget", 1.0), 0.0, 1.0, lo_open=True)  # files before budgets: 1
            arm = policy._check_arm(Arm(_number("observation fraction", o["fraction"], 0.0, 1.0), o["variant"], budget))
            history.append(Observation(BanditContext.from_json(o["context"]), arm, _number("reward", o["reward"], 0.0, 1.0)))
        policy.history = history
        policy._refit()
        if state_path is not None and Path(state_path).resolve() == path.resolve():
            policy._compact = False  # the file already holds this history: keep appending to it
            policy._journal_lines = len(appended)
        return policy


def _write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
