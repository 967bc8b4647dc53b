"""width 0.5 (`scope: model`) by the traced channel graph on the CNNs of issue #43, 64 px, random weights: the FLOP
share reached, the exit code and the ONNX parity of each, one CLI run per model (a measurement, not a test).

    python -m benchmarks.width_graph [--only NAME,...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import coverage as cov

TIMM = ["resnetv2_50", "resnext50_32x4d", "seresnext26d_32x4d", "resnet50_gn", "resnest14d", "mobilenetv3_small_100",
        "efficientnet_b0", "regnety_008", "convnext_atto", "densenet121"]
TV = ["mobilenet_v2", "efficientnet_b0", "regnet_y_800mf", "convnext_tiny", "resnext50_32x4d"]


def _build_tv_factory(case: cov.Case, folder: Path) -> tuple[Path, str]:
    """A torchvision classification model through `module:factory` (the torchvision source reads ResNets and ViTs)."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    model = getattr(torchvision.models, case.name)(num_classes=10).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder / "model.safetensors", (f"model: {{arch: 'torchvision.models:{case.name}', kwargs: {{num_classes: 10}}, "
                                           f"img_size: {cov.PX}}}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    cov.BUILD["tv-factory"] = _build_tv_factory
    cov._class_name = lambda ckpt, case: case.name  # the row's class is not needed here
    cases = [cov.Case(n, "timm", "other", {"num_classes": 10}) for n in TIMM]
    cases += [cov.Case(n, "tv-factory", "other") for n in TV]
    only = {s for s in args.only.split(",") if s}
    rows = []
    for case in cases:
        if only and case.name not in only and f"{case.source}:{case.name}" not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = cov.run_case(case, ["width"], Path(tmp), log=print)
            cell = row["cells"].get("width", {})
            report = Path(tmp) / "out_width" / "report.json"
            if cell.get("rc") == 0 and report.is_file():
                rep = json.loads(report.read_text())
                cell["parity"] = rep["artifacts"]["onnx"]["parity"]["rel_diff"]
                cell["change"] = rep["passes"][0]["changes"][0]
        rows.append({"model": f"{'timm' if case.source == 'timm' else 'torchvision'}:{case.name}", **cell,
                     **({"build_error": row["build_error"]} if "build_error" in row else {})})
        print(json.dumps(rows[-1]), flush=True)
    print("| model | exit | FLOP share | ONNX rel. diff | seconds |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r.get('rc', 'build')} | {r.get('flops', float('nan')):.3f} | "
              f"{r.get('parity', float('nan')):.1e} | {r.get('seconds', '')} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
