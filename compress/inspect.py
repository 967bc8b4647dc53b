"""`compress inspect`: what a checkpoint is, and what each pass would do to it (measured on a copy)."""
from __future__ import annotations

import copy

from .errors import InputError
from .load import Loaded
from .metrics import count_flops, count_params
from .registry import PassContext, all_passes

# One representative configuration per pass, applied to a copy to measure its effect.
PROBES = {
    "qk_merge": {"mode": "exact", "allow_growth": True},
    "vo": {"mode": "fold", "allow_growth": True},
    "mlp_strip": {"blocks": "all"},
    "lowrank": {"target": 0.5, "layers": ["attn", "mlp", "conv"]},
}


def inspect_model(loaded: Loaded) -> dict:
    model, adapter = loaded.model, loaded.adapter
    size = tuple(loaded.data_cfg["input_size"])
    params, flops = count_params(model), count_flops(model, size)
    info = {"source": loaded.source, "family": adapter.family, "adapter": adapter.name, "input_size": list(size),
            **adapter.describe(model), "params": params, "flops": flops, "passes": {}}
    import torch

    calib = torch.zeros((2, *size))
    for name, spec in sorted(all_passes().items()):
        if adapter.family not in spec.families:
            info["passes"][name] = {"applies": False, "why": f"needs family {'/'.join(sorted(spec.families))}"}
            continue
        cfg = spec.config_cls.model_validate(PROBES.get(name, {}))
        try:
            m = spec.fn(copy.deepcopy(model), adapter, cfg, PassContext(calib)).model
        except InputError as e:
            info["passes"][name] = {"applies": False, "why": str(e)}
            continue
        p, f = count_params(m), count_flops(m, size)
        info["passes"][name] = {"applies": True, "probe": cfg.model_dump(mode="json"), "exact": cfg.is_exact(),
                                "params": p, "flops": f, "params_change": p / params - 1, "flops_change": f / flops - 1}
    return info


def format_inspect(info: dict) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in info.items() if k in ("blocks", "width", "heads", "tokens", "stages", "block_type", "num_classes"))
    lines = [f"{info['source']['path']}: {info['source']['arch']} ({info['adapter']}, family {info['family']})",
             f"  {extra}; input {info['input_size']}",
             f"  params {info['params']:,}; FLOPs/image {info['flops']:,}", "", "  pass        effect (measured on a copy)"]
    for name, p in info["passes"].items():
        if not p["applies"]:
            lines.append(f"  {name:<11} does not apply: {p['why']}")
        else:
            lines.append(f"  {name:<11} {p['probe']}: params {100 * p['params_change']:+.1f}%, FLOPs {100 * p['flops_change']:+.1f}%"
                         f" ({'exact' if p['exact'] else 'approximate'})")
    return "\n".join(lines)
