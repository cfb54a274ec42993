"""The launcher's side of defaults chosen from the machine (workers/tuning.py): kept out of launcher.py.

Worker 0 measures (the others wait for its file before loading their model, so nothing competes
for the cores while it times steps); each batcher starts once the file is there, with a config
carrying the chosen token budget and admission window. One file per stack, reused by restarts.
"""
from __future__ import annotations

from pathlib import Path

from common.config import StackConfig, write_config
from workers.tuning import TUNING_FILE_ENV, TUNING_MEASURE_ENV, Tuning, apply_tuning, summary, wait_tuning, wanted


class MachineDefaults:
    def __init__(self, cfg: StackConfig, workdir: Path, name: str = "stack"):
        self.want = wanted(cfg)
        self.enabled = any(self.want.values())
        self.workdir = Path(workdir)
        self.path = self.workdir / "tuning" / f"{name}.json"
        self.tuning: Tuning | None = None

    def worker_env(self, measures: bool) -> dict:
        """The environment a worker is started with: where the tuning goes, and whether it measures."""
        if not self.enabled:
            return {}
        return {TUNING_FILE_ENV: str(self.path), TUNING_MEASURE_ENV: "1" if measures else "0"}

    def batcher_config(self, cfg: StackConfig, config_path: Path, alive, timeout: float) -> Path:
        """The config file a batcher starts with: config_path when nothing is tuned, else (once the
        measuring worker has written its choice) a copy with the chosen budget and window."""
        if not self.enabled:
            return config_path
        if self.tuning is None:
            self.tuning = wait_tuning(self.path, timeout, alive)
        return write_config(apply_tuning(cfg, self.tuning), config_path.with_name(config_path.stem + "-tuned.json"))

    def state(self) -> dict | None:
        """stack.json's `tuning`: what was chosen and why (measured figures); None when nothing was."""
        return summary(self.tuning) if self.tuning is not None else None


def describe(tuning: dict | None) -> list[str]:
    """`switchyard status` lines for stack.json's `tuning`."""
    if not tuning:
        return []
    lines = [f"defaults chosen from the machine ({tuning['cores']} cores, measured in {tuning['measure_s']:.2f}s):"]
    for key in ("num_threads", "max_num_batched_tokens", "admission_window_ms"):
        if tuning.get(key) is not None:
            lines.append(f"  {key} = {tuning[key]:g}: {tuning['reasons'].get(key, '')}")
    if tuning["reasons"].get("error"):
        lines.append(f"  none chosen: {tuning['reasons']['error']}")
    return lines
