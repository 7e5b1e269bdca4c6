"""The GPUs a plan targets: one small table (gpus.yaml beside this file) that users extend with
`--gpu custom --gpu-spec FILE`, and the alpha-beta cost of moving bytes over its links."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sparse_train.errors import UsageError

TABLE = Path(__file__).with_name("gpus.yaml")


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_tflops: float  # dense bf16
    achievable_fraction: float  # of the peak, for a step's matmuls (the one calibration constant)
    memory_gb: float
    intra_node_gbps: float  # per GPU, one direction
    inter_node_gbps: float  # per GPU (its NIC), one direction
    intra_node_latency_us: float
    inter_node_latency_us: float

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def achievable_flops(self) -> float:
        return self.peak_tflops * 1e12 * self.achievable_fraction

    def transfer_s(self, nbytes: float, messages: int, inter_node: bool) -> float:
        """alpha * messages + bytes / bandwidth over one GPU's link (intra- or inter-node)."""
        if inter_node:
            return messages * self.inter_node_latency_us * 1e-6 + nbytes / (self.inter_node_gbps * 1e9)
        return messages * self.intra_node_latency_us * 1e-6 + nbytes / (self.intra_node_gbps * 1e9)


def known_gpus() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(TABLE.read_text())


def gpu_spec(name: str, spec_file: Path | None = None) -> GPUSpec:
    """The figures of GPU `name` from the table, or (`custom`) from `spec_file`; one-line errors."""
    if name == "custom":
        if spec_file is None:
            raise UsageError("--gpu custom needs --gpu-spec FILE (a YAML mapping of the fields in gpus.yaml)")
        try:
            fields = yaml.safe_load(Path(spec_file).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise UsageError(f"--gpu-spec {spec_file}: cannot read it ({str(err).splitlines()[0]})") from None
        return _spec("custom", fields, f"--gpu-spec {spec_file}")
    table = known_gpus()
    if name not in table:
        raise UsageError(f"--gpu {name}: unknown GPU; known: {', '.join(table)}, or custom with --gpu-spec FILE")
    return _spec(name, table[name], f"{TABLE.name}:{name}")


def _spec(name: str, fields: Any, where: str) -> GPUSpec:
    wanted = [f.name for f in dataclasses.fields(GPUSpec) if f.name != "name"]
    if not isinstance(fields, dict):
        raise UsageError(f"{where}: must be a mapping of {', '.join(wanted)}")
    missing, extra = [k for k in wanted if k not in fields], sorted(set(fields) - set(wanted))
    if missing or extra:
        what = f"missing {', '.join(missing)}" if missing else f"unknown field {extra[0]}"
        raise UsageError(f"{where}: {what} (fields: {', '.join(wanted)})")
    values = {}
    for key in wanted:
        value = fields[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise UsageError(f"{where}: {key} must be a positive number, got {value!r}")
        values[key] = float(value)
    if values["achievable_fraction"] > 1:
        raise UsageError(f"{where}: achievable_fraction must be <= 1, got {values['achievable_fraction']}")
    return GPUSpec(name, **values)
