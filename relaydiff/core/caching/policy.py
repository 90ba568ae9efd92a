"""The learned caching schedule (ReCache, Oganov et al. 2026): a small policy scores every device step; the B
best-scored steps recompute.

Inputs per device step j of a hand-off at k (m = N - k steps), all known before the device half starts, so
the schedule is fixed up front and one policy serves every budget and hand-off point:

    budget fraction B/m, device position j/m, trajectory position (k + j)/N, hand-off fraction k/N,
    the noise level log SNR(t_{k+j}) / 10, the sampler's step in log SNR to the next grid point, whether j is
    a step of the uniform schedule of budget B and its phase j B / m mod 1 within the uniform interval.

The score is ``prior * uniform_member + MLP(features)`` with a learned scalar ``prior`` (initially 2): a
score per step followed by top-B can only express spread-out schedules through such features (a smooth
function of position alone selects a contiguous block), so the policy starts near the uniform schedule
and learns where to deviate from it.

Sampling (training) is a Plackett-Luce draw of B - 1 steps without replacement from steps 1..m-1 (step 0 is
always full), done with the Gumbel-top-k trick (Kool et al. 2019), so its log-probability is
``sum_r [s_(r) - logsumexp(s over the steps not yet drawn)]``; evaluation takes the top B - 1 scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from relaydiff.core.caching.denoiser import check_mechanism
from relaydiff.core.errors import RelaydiffError

log = logging.getLogger(__name__)

POLICY_FORMAT = "relaydiff-cache-policy/1"
FEATURES = ("budget_fraction", "device_position", "trajectory_position", "handoff_fraction", "log_snr", "log_snr_step",
            "uniform_member", "uniform_phase")
_UNIFORM = FEATURES.index("uniform_member")
MAX_POLICY_BYTES = 1 << 20


@dataclass(frozen=True)
class PolicyConfig:
    """Everything needed to rebuild a policy and to check it fits a device model (saved as its JSON)."""

    family_id: str  # the family whose device UNet the policy was trained on
    unet_config_hash: str  # hash of that UNet's config.json (its architecture)
    unet_weights_hash: str  # hash of its weights file (a mismatch means the policy was trained on other weights)
    mechanism: str  # "reuse" or "forecast"
    cache_branch: int  # skip branch of the split
    hidden: int = 32  # width of the two hidden layers
    features: tuple[str, ...] = FEATURES  # input features, in order
    steps: int = 25  # N the policy was trained with
    sampler: str = "ddim"
    guidance_scale: float = 5.0
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained (seeds, minutes, episodes, reward)
    format: str = POLICY_FORMAT

    def to_json(self) -> str:
        d = asdict(self)
        d["features"] = list(self.features)
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> PolicyConfig:
        """Parse a policy JSON; raises RelaydiffError naming ``where`` and the bad field."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RelaydiffError(f"'{where}' is not valid JSON: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != POLICY_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise RelaydiffError(f"'{where}' is not a cache policy: format {got!r}, expected {POLICY_FORMAT!r}")
        kinds = {"family_id": str, "unet_config_hash": str, "unet_weights_hash": str, "mechanism": str,
                 "cache_branch": int, "hidden": int, "steps": int, "sampler": str}
        for key, kind in kinds.items():
            if not isinstance(d.get(key), kind) or isinstance(d.get(key), bool):
                raise RelaydiffError(f"'{where}': {key!r} must be a {kind.__name__}, got {d.get(key)!r}")
        if tuple(d.get("features", ())) != FEATURES:
            raise RelaydiffError(f"'{where}': features {d.get('features')!r}; this version computes {list(FEATURES)}")
        if not 1 <= d["hidden"] <= 1024:
            raise RelaydiffError(f"'{where}': hidden {d['hidden']} outside [1, 1024]")
        check_mechanism(d["mechanism"])
        return cls(family_id=d["family_id"], unet_config_hash=d["unet_config_hash"], unet_weights_hash=d["unet_weights_hash"],
                   mechanism=d["mechanism"], cache_branch=d["cache_branch"], hidden=d["hidden"], features=FEATURES,
                   steps=d["steps"], sampler=d["sampler"], guidance_scale=float(d.get("guidance_scale", 5.0)),
                   training=dict(d.get("training") or {}))


class SchedulePolicy(torch.nn.Module):
    """A two-hidden-layer MLP from per-step features to a score."""

    def __init__(self, n_features: int = len(FEATURES), hidden: int = 32, prior: float = 2.0) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(n_features, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1),
        )
        self.prior = torch.nn.Parameter(torch.tensor(float(prior)))  # weight of the uniform-schedule indicator

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., m, F) features -> (..., m) scores."""
        return self.prior * features[..., _UNIFORM] + self.net(features).squeeze(-1)


def step_features(timesteps: torch.Tensor, k: int, budget: int, scheduler_config: dict[str, Any]) -> torch.Tensor:
    """(m, F) policy inputs for the device steps [k, N) of the grid ``timesteps`` under budget B."""
    from relaydiff.core.student import schedule_alphas

    n = len(timesteps)
    m = n - k
    ac, final = schedule_alphas(scheduler_config)
    a = torch.stack([ac[int(t)] for t in timesteps] + [final]).double().clamp(1e-8, 1 - 1e-8)
    snr = torch.log(a / (1 - a)).float()
    j = torch.arange(m, dtype=torch.float32)
    uniform = torch.zeros(m)
    uniform[[math.floor(i * m / budget) for i in range(budget)]] = 1.0  # as relaydiff.core.caching.budget.uniform_mask
    cols = [
        torch.full((m,), budget / m), j / m, (k + j) / n, torch.full((m,), k / n),
        snr[k:n] / 10, (snr[k + 1 : n + 1] - snr[k:n]), uniform, torch.remainder(j * budget / m, 1.0),
    ]
    return torch.stack(cols, dim=1)


def top_b_mask(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """(m,) bool: step 0 and the B - 1 best-scored of steps 1..m-1."""
    m = scores.shape[-1]
    mask = torch.zeros(m, dtype=torch.bool)
    mask[0] = True
    if budget > 1:
        mask[1 + torch.topk(scores[1:], budget - 1).indices] = True
    return mask


def sample_mask(scores: torch.Tensor, budget: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A Plackett-Luce (Gumbel-top-k) draw of B - 1 of steps 1..m-1: (mask (m,), log-probability of the draw)."""
    m = scores.shape[-1]
    cand = scores[1:]
    mask = torch.zeros(m, dtype=torch.bool)
    mask[0] = True
    if budget <= 1:
        return mask, scores.sum() * 0.0
    u = torch.rand(cand.shape, generator=generator).clamp(1e-12, 1 - 1e-12)
    order = torch.argsort(cand.detach() - torch.log(-torch.log(u)), descending=True)[: budget - 1]
    logp = scores.new_zeros(())
    drawn = torch.zeros_like(cand)  # 0 for steps still available, -inf once drawn (out of place: autograd)
    for idx in order:
        logp = logp + cand[idx] - torch.logsumexp(cand + drawn, dim=0)
        drawn = drawn.index_fill(0, idx.reshape(1), float("-inf"))
    mask[1 + order] = True
    return mask, logp


def file_hash(path: Path) -> str:
    """sha256 (first 16 hex digits) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def unet_identity(model: Any) -> tuple[str, str]:
    """(config hash, weights hash) of a loaded model's UNet folder."""
    from relaydiff.core.family import read_json

    folder = model.ref.root / model.ref.unet_subfolder
    config = {k: v for k, v in read_json(folder / "config.json").items() if not k.startswith("_")}
    cfg_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    weights = sorted(folder.glob("*.safetensors"))
    return cfg_hash, (file_hash(weights[0]) if weights else "none")


def policy_paths(path: Path) -> tuple[Path, Path]:
    """(JSON, safetensors) of a policy given either file or their common stem."""
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_suffix(".json"), stem.with_suffix(".safetensors")


def save_policy(path: Path, policy: SchedulePolicy, config: PolicyConfig) -> tuple[Path, Path]:
    """Write ``<stem>.safetensors`` (weights) and ``<stem>.json`` (config), each atomically."""
    from safetensors.torch import save_file

    js, st = policy_paths(path)
    js.parent.mkdir(parents=True, exist_ok=True)
    tmp = st.with_suffix(".safetensors.tmp")
    save_file({k: v.detach().contiguous() for k, v in policy.state_dict().items()}, str(tmp))
    tmp.replace(st)
    tmp_js = js.with_suffix(".json.tmp")
    tmp_js.write_text(config.to_json())
    tmp_js.replace(js)
    return js, st


def load_policy(path: Path) -> tuple[SchedulePolicy, PolicyConfig]:
    """Read a policy saved by :func:`save_policy`; malformed or oversized files are RelaydiffErrors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    js, st = policy_paths(Path(path))
    for p in (js, st):
        if not p.is_file():
            raise RelaydiffError(f"cache policy file not found: '{p}'")
        if p.stat().st_size > MAX_POLICY_BYTES:
            raise RelaydiffError(f"cache policy file '{p}' is {p.stat().st_size} bytes; the cap is {MAX_POLICY_BYTES}")
    config = PolicyConfig.from_json(js.read_text(), str(js))
    policy = SchedulePolicy(len(config.features), config.hidden)
    try:
        weights = load_file(str(st))
    except (SafetensorError, OSError) as exc:
        raise RelaydiffError(f"'{st}' is not a readable safetensors file: {exc}") from None
    want = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if want != got:
        raise RelaydiffError(f"'{st}' holds tensors {got}; a policy with hidden={config.hidden} needs {want}")
    if not all(bool(torch.isfinite(v).all()) for v in weights.values()):
        raise RelaydiffError(f"'{st}' holds non-finite weights")
    policy.load_state_dict(weights)
    policy.eval()
    return policy, config


def check_policy_for(config: PolicyConfig, model: Any, where: str) -> None:
    """Refuse a policy trained for another family or UNet architecture; warn on other weights."""
    if config.family_id != model.family_id:
        raise RelaydiffError(
            f"cache policy '{where}' was trained for family {config.family_id!r}; the device model is family {model.family_id!r}"
        )
    cfg_hash, weights_hash = unet_identity(model)
    if config.unet_config_hash != cfg_hash:
        raise RelaydiffError(
            f"cache policy '{where}' was trained for a device UNet with config hash {config.unet_config_hash!r}; "
            f"this device UNet ({model.ref.label}) has {cfg_hash!r}"
        )
    levels = len(model.unet.down_blocks)
    if not 0 <= config.cache_branch < levels:
        raise RelaydiffError(f"cache policy '{where}': cache branch {config.cache_branch} is outside [0, {levels - 1}]")
    if config.unet_weights_hash != weights_hash:
        log.warning("cache policy %s was trained on other weights of this UNet (%s vs %s); retrain it with `relaydiff cache train`",
                    where, config.unet_weights_hash, weights_hash)


def learned_mask(policy: SchedulePolicy, timesteps: torch.Tensor, k: int, budget: int, scheduler_config: dict[str, Any]) -> torch.Tensor:
    """(m,) bool: the policy's schedule for budget B at hand-off k."""
    with torch.no_grad():
        scores = policy(step_features(timesteps, k, budget, scheduler_config))
    return top_b_mask(scores, budget)


def entropy_of(scores: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(scores over steps 1..m-1): the regulariser that keeps the draw from collapsing early."""
    p = torch.log_softmax(scores[1:], dim=0)
    return -(p.exp() * p).sum() if scores.shape[-1] > 2 else scores.sum() * 0.0

