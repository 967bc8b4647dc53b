"""`compress inspect`: what a checkpoint is, and what each pass would do to it (measured on a copy)."""
from __future__ import annotations

import copy

from ..core.errors import InputError
from ..core.registry import PassContext, all_passes
from ..load.model import Loaded
from ..measure.metrics import count_flops, count_params

# Representative configurations per pass, each applied to a copy to measure its effect; the first
# is reported under the pass name, the others under "name mode".
PROBES = {
    "qk_merge": [{"mode": "exact", "allow_growth": True}, {"mode": "symmetric", "rank": 1, "allow_growth": True}],
    "vo": [{"mode": "fold", "allow_growth": True}, {"mode": "remove"}],
    "mlp_strip": [{"blocks": "all"}],
    "attn_diffusion": [{}],
    "crate": [{"mode": "mssa"}],
    "lowrank": [{"target": 0.5, "layers": ["attn", "mlp", "conv"]}],
    "tie_rowcol": [{"blocks": "all"}],
    "width": [{"target": 0.5, "scope": "model", "allocate": "uniform"}],
    "token_merge": [{"target": 0.5}],
}


def _probes(name: str, heads_dim: int | None) -> list[tuple[str, dict]]:
    out = []
    for i, probe in enumerate(PROBES.get(name, [{}])):
        if probe.get("mode") == "symmetric" and heads_dim:
            probe = {**probe, "rank": heads_dim}  # rank = head size, the design's reference point
        out.append((name if i == 0 else f"{name} {probe['mode']}", probe))
    return out


def inspect_model(loaded: Loaded) -> dict:
    model, adapter = loaded.model, loaded.adapter
    size = tuple(loaded.data_cfg["input_size"])
    params, flops = count_params(model), count_flops(model, size)
    info = {"source": loaded.source, "family": adapter.family, "adapter": adapter.name, "input_size": list(size),
            **adapter.describe(model), "params": params, "flops": flops, "passes": {}}
    import torch

    calib = torch.randn((2, *size), generator=torch.Generator().manual_seed(0))  # passes that fit need non-degenerate inputs
    head = info["width"] // info["heads"] if adapter.family == "vit" else None
    for name, spec in sorted(all_passes().items()):
        if adapter.family not in spec.families:
            info["passes"][name] = {"applies": False, "why": f"needs family {'/'.join(sorted(spec.families))}"}
            continue
        for label, probe in _probes(name, head):
            try:  # a pass with required settings and no probe here says so rather than failing the whole inspect
                cfg = spec.config_cls.model_validate(probe)
            except ValueError as e:
                info["passes"][label] = {"applies": False, "why": f"no probe settings for it here ({str(e).splitlines()[0]})"}
                continue
            try:
                m = spec.fn(copy.deepcopy(model), adapter, cfg, PassContext(calib)).model
            except InputError as e:
                info["passes"][label] = {"applies": False, "why": str(e)}
                continue
            p, f = count_params(m), count_flops(m, size)
            info["passes"][label] = {"applies": True, "probe": cfg.model_dump(mode="json", exclude_none=True), "exact": cfg.is_exact(),
                                     "params": p, "flops": f, "params_change": p / params - 1, "flops_change": f / flops - 1}
    return info


def format_inspect(info: dict) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in info.items() if k in ("blocks", "width", "heads", "tokens", "stages", "block_type", "num_classes"))
    lines = [f"{info['source']['path']}: {info['source']['arch']} ({info['adapter']}, family {info['family']})",
             f"  {extra}; input {info['input_size']}",
             f"  params {info['params']:,}; FLOPs/image {info['flops']:,}", "", f"  {'pass':<19} effect (measured on a copy)"]
    for name, p in info["passes"].items():
        if not p["applies"]:
            lines.append(f"  {name:<19} does not apply: {p['why']}")
        else:
            lines.append(f"  {name:<19} {p['probe']}: params {100 * p['params_change']:+.1f}%, FLOPs {100 * p['flops_change']:+.1f}%"
                         f" ({'exact' if p['exact'] else 'approximate'})")
    return "\n".join(lines)
