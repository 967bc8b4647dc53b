"""Evaluation labels: ImageNet wnid folders mapped to the standard 1000-class order; near-chance teachers warned."""
from __future__ import annotations

import pytest
from PIL import Image
from safetensors.torch import save_file

from compress.recipe import parse_recipe
from compress.run.pipeline import apply

WNIDS = ["n01443537", "n01484850", "n01491361"]  # ImageNet classes 1, 2, 3


def _folder(root, names):
    for name, colour in zip(names, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), colour).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("wnid", [True, False])
def test_wnid_folders_map_to_imagenet_order_else_near_chance_warns(tmp_path, wnid):
    import user_models

    save_file(user_models.colour_probe().state_dict(), str(tmp_path / "w.safetensors"))
    data = _folder(tmp_path / "val", WNIDS if wnid else ["a_fish", "b_shark", "c_hen"])
    recipe = {"version": 1, "model": {"arch": "user_models:colour_probe", "img_size": 16},
              "export": {"formats": ["safetensors"]}, "report": {"latency": None, "eval_data": str(data)}}
    logs = []
    rep = apply(parse_recipe(recipe), str(tmp_path / "w.safetensors"), tmp_path / "out", log=logs.append)
    ev, md = rep["summary"]["eval"], (tmp_path / "out" / "report.md").read_text()
    if wnid:  # sorted folder positions (0, 1, 2) would score 0%: the model's classes are 1, 2, 3
        assert ev["teacher_top1"] == 1.0 and "ImageNet wnids" in ev["labels"] and ev["labels"] in md
        assert "warning" not in ev
    else:
        assert ev["teacher_top1"] == 0.0 and "labels" not in ev
        assert "under twice chance" in ev["warning"] and "may not match" in md
        assert sum("under twice chance" in line for line in logs) == 1
