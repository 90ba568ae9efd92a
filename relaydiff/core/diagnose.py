"""Latent diagnostic (RISE Fig. 2): per-step latent intensity ||x_t||_2 for host-only, relay and device-only
trajectories of the same seed, and the relative deviation of the relay from host-only after the hand-off."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from relaydiff.core.family import LoadedModel
from relaydiff.core.relay import RelayRequest, relay


@dataclass(frozen=True)
class Diagnostic:
    """Per-step latent norms of three trajectories that share prompt, seed, sampler and grid."""

    prompt: str
    sampler: str
    steps: int
    relay_step: int
    host_only: list[float]  # ||x_t||_2 after each step, host model throughout
    relay: list[float]  # host for steps [0, k), device for [k, N)
    device_only: list[float]  # device model throughout
    relative_deviation: list[float]  # |relay - host_only| / host_only per step (0 before the hand-off)
    final_latent_rel_l2: float  # ||z_relay - z_host|| / ||z_host|| at the end of the trajectory

    @property
    def max_deviation_after_handoff(self) -> float:
        tail = self.relative_deviation[self.relay_step :]
        return max(tail) if tail else 0.0

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["max_deviation_after_handoff"] = self.max_deviation_after_handoff
        return d


def run_diagnostic(host: LoadedModel, device: LoadedModel, req: RelayRequest, *, progress: bool = False) -> Diagnostic:
    """Run host-only, relay at ``req.relay_step`` and device-only with the same seed and record latent norms."""
    from dataclasses import replace

    n = req.steps
    host_only = relay(host, host, replace(req, relay_step=n), progress=progress)
    relayed = relay(host, device, req, progress=progress)
    device_only = relay(device, device, replace(req, relay_step=0), progress=progress)
    dev = [abs(r - h) / max(h, 1e-12) for r, h in zip(relayed.norms, host_only.norms)]
    final = float((relayed.latents - host_only.latents).norm() / host_only.latents.norm().clamp_min(1e-12))
    return Diagnostic(req.prompt, req.sampler, n, req.relay_step, host_only.norms, relayed.norms, device_only.norms, dev, final)


def write_outputs(diag: Diagnostic, out_dir: Path) -> dict[str, str]:
    """Write diagnostic.json, diagnostic.csv and diagnostic.png into ``out_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: str(out_dir / f"diagnostic.{k}") for k in ("json", "csv", "png")}
    Path(paths["json"]).write_text(json.dumps(diag.to_json(), indent=2) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "host_only_norm", "relay_norm", "device_only_norm", "relative_deviation"])
        for i in range(diag.steps):
            w.writerow([i + 1, diag.host_only[i], diag.relay[i], diag.device_only[i], diag.relative_deviation[i]])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = list(range(1, diag.steps + 1))
    a.plot(x, diag.host_only, label="host only", lw=2)
    a.plot(x, diag.relay, label=f"relay (k={diag.relay_step})", ls="--")
    a.plot(x, diag.device_only, label="device only", ls=":")
    a.axvline(diag.relay_step + 0.5, color="gray", lw=0.8)
    a.set_xlabel("denoising step")
    a.set_ylabel("latent intensity ||x_t||2")
    a.legend()
    b.plot(x, [100 * v for v in diag.relative_deviation], color="C1")
    b.axvline(diag.relay_step + 0.5, color="gray", lw=0.8)
    b.set_xlabel("denoising step")
    b.set_ylabel("relay vs host-only deviation (%)")
    fig.suptitle(f"{diag.sampler}, {diag.steps} steps, hand-off after step {diag.relay_step}: {diag.prompt!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths
