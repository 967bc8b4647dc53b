"""The recipe: YAML parsed once, here, into typed pydantic models; unknown keys are errors."""
from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from . import passes as _passes  # noqa: F401  (registers the passes)
from .core import yaml_strict
from .core.errors import InputError, not_a_file
from .core.registry import PassConfig, all_passes, get_pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


MAX_SIDE = 4096  # an input side beyond this is a typo, not a model: refuse it before anything is allocated


class PreprocessSpec(_Strict):
    """How the model expects its images, where the checkpoint does not say it (bare weights, your own model)."""

    input_size: Optional[list[PositiveInt]] = Field(None, min_length=3, max_length=3, description="[channels, height, width]")
    mean: Optional[list[float]] = Field(None, min_length=1, max_length=3, description="one value per channel")
    std: Optional[list[PositiveFloat]] = Field(None, min_length=1, max_length=3, description="one value per channel")
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = None
    crop_pct: Optional[float] = Field(None, gt=0, le=1, description="resize to side/crop_pct, centre-crop side")

    @model_validator(mode="after")
    def _consistent(self):
        if self.input_size is not None:
            c, h, w = self.input_size
            if c not in (1, 3):
                raise ValueError(f"input_size channels must be 1 or 3 (got {c})")
            if h != w:
                raise ValueError(f"input_size must be square (got {h}x{w})")
            if h > MAX_SIDE:
                raise ValueError(f"input side {h} is beyond {MAX_SIDE}; check the value")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and self.input_size is not None and len(v) != self.input_size[0]:
                raise ValueError(f"{name} has {len(v)} values for {self.input_size[0]} channels")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError("mean and std need the same number of values")
        return self


class ModelSpec(_Strict):
    """Architecture for a bare weights file (a checkpoint directory's config.json says it itself)."""

    arch: str = Field(description="timm:NAME (or a bare timm name)")
    num_classes: Optional[PositiveInt] = None
    img_size: Optional[int] = Field(None, ge=1, le=MAX_SIDE)
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra model constructor arguments")
    weights_key: Optional[str] = Field(None, description="which weights in a container: ema, plain, or a key such as state_dict_ema")
    preprocess: Optional[PreprocessSpec] = None

    @model_validator(mode="after")
    def _size(self):
        p = self.preprocess
        if p is not None and p.input_size is not None:
            if self.img_size is not None and self.img_size != p.input_size[1]:
                raise ValueError(f"img_size {self.img_size} and preprocess.input_size {p.input_size} disagree; set one")
            self.img_size = p.input_size[1]
        return self


class CalibrationSpec(_Strict):
    data: Optional[Path] = Field(None, description="ImageFolder dir or zip; when absent the run's other images "
                                 "(--data, distill.data); `random`: seeded N(0,1) inputs, asked for explicitly")
    random: bool = Field(False, description="set by `data: random`: fit on random inputs (not a fidelity figure)")
    images: PositiveInt = 16
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _random(cls, v):
        if isinstance(v, dict) and v.get("data") == "random":
            v = {**v, "data": None, "random": True}
        return v


def _as_list(v):
    """Accept a scalar where a list is expected ('none' means an empty list)."""
    if v is None or v == "none":
        return []
    return [v] if isinstance(v, str) else v


class ExportSpec(_Strict):
    """fp32 model.onnx / model.safetensors are always written; `precision` and `quantize` add variants."""

    formats: list[Literal["safetensors", "onnx"]] = Field(default_factory=lambda: ["safetensors", "onnx"], min_length=1)
    precision: Annotated[list[Literal["fp32", "fp16"]], BeforeValidator(_as_list)] = Field(
        default_factory=lambda: ["fp32"], description="fp16 adds model.fp16.onnx and model.fp16.safetensors")
    quantize: Annotated[list[Literal["int8_dynamic", "int8_static"]], BeforeValidator(_as_list)] = Field(
        default_factory=list, description="none, or int8 ONNX variants (static calibrates on calibration.data)")
    slim: Union[bool, Literal["auto"]] = Field(
        "auto", description="onnxslim the graphs, kept only when outputs stay within parity_tol; auto: only files up to "
        "512 MB (onnxslim holds about 6x the file in memory: +1.07 GB for ViT-B's 176 MB student)")
    opset: int = Field(18, ge=14, le=21)
    dynamic_batch: bool = True
    parity_tol: PositiveFloat = Field(1e-4, description="fp32: max |ONNX - PyTorch| relative to the logit scale")
    fp16_tol: PositiveFloat = Field(1e-2, description="fp16: the same bound")
    int8_min_agreement: float = Field(0.9, ge=0, le=1, description="int8: top-1 agreement with PyTorch on calibration")
    int8_max_kl: Optional[PositiveFloat] = Field(
        None, description="int8_static accuracy control: the calibration method (minmax/entropy/percentile) with the "
        "lowest KL to model.onnx on held-out calibration images, and the most sensitive layers kept float until the "
        "file's KL is at most this; null: the bound below, else plain minmax calibration of every layer")
    int8_max_disagreement: Optional[Annotated[float, Field(gt=0, lt=1)]] = Field(
        None, description="int8_static accuracy control on the share of held-out images whose top-1 changes from "
        "model.onnx (a changed prediction moves top-1 by at most one image); null: half of target/gates.max_top1_drop "
        "when one is set (compress/export/quant.py QUANT_SHARE). int8_max_kl, when set, wins")
    int8_qat_steps: int = Field(0, ge=0, description="int8_static: when the file (float layers included) misses its "
                                "bound, fine-tune the student this many steps with fake int8 weights and inputs in the "
                                "forward, distilling as distill: does, and quantize again; kept when closer. 0: off")
    int8_dynamic_convs: bool = Field(False, description="int8_dynamic also quantizes convolutions (ConvInteger: "
                                     "needs onnxruntime >= 1.24, several times slower on ResNets); default MatMul only")
    min_runtime: Optional[Literal["1.16", "1.17", "1.18"]] = Field(
        "1.16", description="oldest onnxruntime every ONNX file must also run on (an isolated, cached install); "
                            "null = the installed one only")
    min_runtime_check: Literal["require", "warn"] = Field(
        "require", description="min_runtime not prepared (`compress runtime prepare`): fail (require) or skip with a warning")
    external_data_mb: float = Field(1800, ge=0, description="an ONNX file (model.onnx or a variant) whose weights exceed "
                                    "this goes out as NAME.onnx + NAME.onnx.data (protobuf cannot hold 2 GiB in one file)")

    @model_validator(mode="after")
    def _int8_control(self):
        if self.int8_max_kl is not None and self.int8_max_disagreement is not None:
            raise ValueError("int8_max_kl and int8_max_disagreement both bound the int8_static file; set one")
        return self


class LatencySpec(_Strict):
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 8], min_length=1)
    threads: PositiveInt = 2
    warmup: int = Field(5, ge=0)
    runs: PositiveInt = 30


class ReportSpec(_Strict):
    eval_data: Optional[Path] = Field(None, description="ImageFolder dir or zip for top-1 and teacher agreement")
    eval_images: Optional[PositiveInt] = Field(1000, description="evenly spaced subset; null = all")
    latency: Optional[LatencySpec] = Field(default_factory=LatencySpec, description="null skips latency")


class DistillSpec(_Strict):
    """Knowledge distillation after the passes; teacher = the loaded model. Absent section: no fine-tune."""

    data: Optional[Path] = Field(None, description="ImageFolder dir or zip (labels optional); else --data")
    steps: Optional[PositiveInt] = Field(None, description="optimizer steps (default 500 when epochs is not set)")
    epochs: Optional[PositiveFloat] = Field(None, description="alternative to steps: passes over the data")
    limit: Optional[PositiveInt] = Field(None, description="use an evenly spaced subset of this many images")
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 5e-4
    lr_scale: Literal["start_kl", "none"] = Field(
        "start_kl", description="start_kl: the lr times clip(sqrt(KL0), 0.1, 1), KL0 = the student's KL to the teacher at "
        "the start (held-out images, else calibration): a near-exact student needs small steps")
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(50, ge=0)
    temperature: PositiveFloat = 2.0
    feature_weight: float = Field(0.0, ge=0, description="MSE between teacher and student block outputs")
    label_weight: float = Field(0.0, ge=0, description="cross-entropy on labels (needs class folders)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    workers: int = Field(2, ge=0, description="data loader processes")
    checkpoint_every: Optional[PositiveInt] = Field(100, description="steps between resumable checkpoints; null: none")
    batchnorm: Literal["auto", "train", "frozen"] = Field(
        "auto", description="frozen: BatchNorm layers keep their running statistics while their weights train (train "
        "mode would normalise by batch statistics and overwrite them); auto: frozen when a pass fitted them (width "
        "on a ResNet), else train")
    holdout_images: int = Field(256, ge=0, description="seeded training images scored every steps/15 steps; the "
                                "weights with the lowest KL to the teacher there are kept (the start included). 0: off")

    @model_validator(mode="after")
    def _one_length(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set steps or epochs, not both")
        return self


class Gates(_Strict):
    """Targets the run must meet, else it fails (exit 4) and publishes nothing."""

    max_size_ratio: Optional[PositiveFloat] = Field(None, description="student/teacher ONNX bytes")
    max_params_ratio: Optional[PositiveFloat] = None
    max_flops_ratio: Optional[PositiveFloat] = None
    min_speedup: Optional[PositiveFloat] = Field(None, description="teacher/student p50 latency at the largest batch")
    max_top1_drop: Optional[float] = Field(None, description="percentage points; needs report.eval_data")
    min_agreement: Optional[float] = Field(None, ge=0, le=1, description="top-1 agreement with the teacher")
    speedup_batch: Optional[PositiveInt] = Field(None, description="batch size min_speedup reads; null = the largest timed")
    variant: Optional[Literal["fp16", "int8_dynamic", "int8_static"]] = Field(
        None, description="the ONNX variant the speed/size/accuracy gates read (the file that ships); null = model.onnx")
    accuracy: Literal["interval", "point"] = Field(
        "interval", description="max_top1_drop holds on the upper end of the drop's paired 95% interval over the eval "
        "images (interval), or on the measured drop alone (point: a draw that another set of images may not repeat)")


class TargetSpec(_Strict):
    """What the result must achieve; the planner (compress/planner/search.py) chooses passes and export variant to get there."""

    speedup: Optional[PositiveFloat] = Field(None, description="teacher/student ONNX p50 latency at `batch`")
    batch: PositiveInt = Field(8, description="batch size the speedup / latency_ms target is measured at")
    latency_ms: Optional[PositiveFloat] = Field(None, description="student ONNX p50 latency at `batch`")
    flops: Optional[Annotated[float, Field(gt=0, le=1)]] = Field(None, description="FLOPs as a fraction of the teacher's")
    params: Optional[Annotated[float, Field(gt=0, le=1)]] = Field(None, description="parameters as a fraction of the teacher's")
    size_mb: Optional[PositiveFloat] = Field(None, description="size of the ONNX file that ships, in MB (1e6 bytes)")
    max_top1_drop: Optional[Annotated[float, Field(ge=0)]] = Field(
        None, description="percentage points after distillation (a gate; needs report.eval_data)")
    variants: list[Literal["fp32", "int8_dynamic", "int8_static"]] = Field(
        default_factory=lambda: ["fp32", "int8_dynamic", "int8_static"], min_length=1,
        description="export variants the plan may ship (int8_static only with real calibration images)")
    attempts: PositiveInt = Field(1, description="candidates tried in turn when the accuracy gate is missed")

    @model_validator(mode="after")
    def _consistent(self):
        if self.speedup is not None and self.latency_ms is not None:
            raise ValueError("give speedup or latency_ms, not both (they are the same measurement)")
        if all(v is None for v in (self.speedup, self.latency_ms, self.flops, self.params, self.size_mb)):
            raise ValueError("name what to reach: speedup, latency_ms, flops, params or size_mb")
        return self


@dataclass(frozen=True)
class PassStep:
    name: str
    config: PassConfig


class Recipe(_Strict):
    version: Literal[1]
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9._-]+$")
    model: Optional[ModelSpec] = None
    passes: list[Any] = Field(default_factory=list, description="ordered list of {pass_name: {config}}")
    skip_inapplicable: bool = Field(False, description="skip passes that do not apply to the model's family instead of failing")
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    distill: Optional[DistillSpec] = None
    export: ExportSpec = Field(default_factory=ExportSpec)
    report: ReportSpec = Field(default_factory=ReportSpec)
    gates: Gates = Field(default_factory=Gates)
    target: Optional[TargetSpec] = Field(None, description="plan the passes to meet this (compress plan); on top of passes:")

    def __init__(self, **data):
        """`compress.Recipe(version=1, passes=[...])` in Python: the checks and one-line messages of a YAML recipe
        (an InputError, exit 2), and passes validated into their configs. parse_recipe comes through here too."""
        _check_keys(data, Recipe, "")
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise InputError(f"recipe: {_fmt(e, '')}") from None
        self.passes = [s if isinstance(s, PassStep) else _parse_step(i, s) for i, s in enumerate(self.passes)]

    @model_validator(mode="after")
    def _target_fits(self):
        t, g = self.target, self.gates
        ex = self.export
        if ex.int8_qat_steps and "int8_static" not in ex.quantize and (t is None or "int8_static" not in t.variants):
            raise ValueError(f"export.int8_qat_steps {ex.int8_qat_steps} fine-tunes for the int8_static file, which "
                             "is not exported; add int8_static to export.quantize or set it to 0")
        if self.export.int8_qat_steps and self.distill is None:
            raise ValueError("export.int8_qat_steps fine-tunes with the distill: section's data and settings; add a "
                             "distill: section or set it to 0")
        bounds = (self.export.int8_max_kl, self.export.int8_max_disagreement, g.max_top1_drop, t and t.max_top1_drop)
        if self.export.int8_qat_steps and all(b is None for b in bounds):
            raise ValueError("export.int8_qat_steps needs a bound to aim for: set export.int8_max_kl, "
                             "export.int8_max_disagreement or a max_top1_drop (target or gates)")
        if t is None:
            return self
        if (t.speedup or t.latency_ms) and self.report.latency is None:
            raise ValueError("target speedup/latency_ms is measured with onnxruntime, but report.latency is null; "
                             "give report.latency settings or drop the speed target")
        if (t.speedup or t.latency_ms or t.size_mb) and "onnx" not in self.export.formats:
            raise ValueError("target speedup/latency_ms/size_mb is measured on the ONNX file; add onnx to export.formats")
        if t.max_top1_drop is not None and self.report.eval_data is None:
            raise ValueError("target.max_top1_drop needs report.eval_data (labelled test images); add it or drop it")
        for key, mine in (("max_top1_drop", t.max_top1_drop), ("min_speedup", t.speedup), ("max_flops_ratio", t.flops),
                          ("max_params_ratio", t.params)):
            theirs = getattr(g, key)
            if mine is not None and theirs is not None and theirs != mine:
                raise ValueError(f"target and gates.{key} disagree ({mine} vs {theirs}); state it once, in target")
        return self

    def calibration_source(self, data=None):
        """Where calibration images come from: --data, else calibration.data, else distill.data (any images the run is
        given); None: random inputs."""
        if data is not None or self.calibration.data is not None or self.calibration.random:
            return data if data is not None else self.calibration.data
        return self.distill.data if self.distill is not None else None

    def check_calibration(self, data=None) -> None:
        """Refuse, in one line, data-fitted passes (and the planner) with no images at all, unless random inputs are
        asked for: fitted on noise they lose many points while the run reports agreement on that noise."""
        if self.calibration_source(data) is not None or self.calibration.random:
            return
        needs = [f"{s.name} ({why})" for s in self.steps if (why := s.config.needs_data())]
        if self.target is not None:
            needs.append("target (the planner fits and scores its candidates on calibration images)")
        if needs:
            raise InputError(f"no calibration images: {'; '.join(needs)}; give calibration.data, distill.data or "
                             "--data, or set calibration: {data: random} to fit on random inputs (not a fidelity figure)")

    @property
    def steps(self) -> list[PassStep]:
        return self.passes  # validated into PassStep by parse_recipe

    def resolved(self) -> dict:
        """The recipe with every default filled in, as plain data (written next to the model)."""
        d = self.model_dump(mode="json", exclude={"passes"} | ({"target"} if self.target is None else set()))
        d["passes"] = [{s.name: s.config.model_dump(mode="json")} for s in self.steps]
        return {"version": d.pop("version"), **d}


def _model_of(annotation) -> Optional[type[BaseModel]]:
    """The pydantic model class inside Optional[...] / list[...] annotations, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found:
            return found
    return None


def _check_keys(data: Any, cls: type[BaseModel], path: str) -> None:
    """Reject unknown keys with the key path, the allowed keys and the closest match."""
    if not isinstance(data, dict):
        return  # a type error: pydantic reports it
    allowed = list(cls.model_fields)
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"recipe: unknown key '{where}'{hint}; allowed here: {', '.join(allowed)}")
        sub = _model_of(cls.model_fields[key].annotation)
        if sub is not None:
            for item in value if isinstance(value, list) else [value]:
                _check_keys(item, sub, where)


def _fmt(err: ValidationError, prefix: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) if isinstance(x, str) else f"[{x}]" for x in e["loc"]).replace(".[", "[")
        where = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        msg = e["msg"].removeprefix("Value error, ")
        got = f" (got {e['input']!r})" if e["type"] not in ("missing", "value_error") and not isinstance(e["input"], dict) else ""
        parts.append(f"{where}: {msg}{got}" if where else f"{msg}{got}")  # a whole-recipe check names its keys
    return "; ".join(parts)


def _parse_step(i: int, item: Any) -> PassStep:
    where = f"passes[{i}]"
    if isinstance(item, str):
        item = {item: {}}
    if not isinstance(item, dict) or len(item) != 1:
        raise InputError(f"recipe: {where} must be one mapping like '- mlp_strip: {{blocks: [0, 1]}}'; got {item!r}")
    (name, cfg), = item.items()
    spec = get_pass(str(name))
    cfg = {} if cfg is None else cfg
    _check_keys(cfg, spec.config_cls, f"{where}.{name}")
    try:
        return PassStep(spec.name, spec.config_cls.model_validate(cfg))
    except ValidationError as e:
        raise InputError(f"recipe: {_fmt(e, f'{where}.{name}')}") from None


def parse_recipe(data: Any) -> Recipe:
    if not isinstance(data, dict):
        raise InputError(f"recipe: the top level must be a mapping with at least 'version: 1'; got {type(data).__name__}")
    _check_keys(data, Recipe, "")  # before any key reaches Recipe(**data): a YAML key may be a number
    return Recipe.model_validate(data)  # Recipe.__init__ checks, words the errors and validates the passes


def read_yaml(path: Path, what: str, hint: str) -> Any:
    """A YAML file's data, or one line naming the file, the line and the problem."""
    if not path.is_file():
        why = not_a_file(path)
        raise InputError(f"{what} {path} {why}; check the path ({hint})" if why else
                         f"{what} file not found: {path}; check the path ({hint})")
    try:
        return yaml_strict.load(path.read_text())
    except yaml_strict.AliasBombError as e:
        raise InputError(f"{what} {path}: {e}") from None
    except yaml_strict.DuplicateKeyError as e:  # the last would win silently: say which, where, and the fix
        raise InputError(f"{what} {path}: {e}; the second would silently replace the first: keep one") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(f"{what} {path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


def merge(base: dict, overrides: dict) -> dict:
    """Nested-dict update: overrides win key by key; lists and scalars are replaced whole."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    path = Path(path)
    data = read_yaml(path, "recipe", "recipes/ has examples")
    if data is None:
        raise InputError(f"recipe {path} is empty; start from one in recipes/ (it needs at least 'version: 1')")
    if overrides:
        if not isinstance(data, dict):
            raise InputError(f"recipe: the top level must be a mapping with at least 'version: 1'; got {type(data).__name__}")
        data = merge(data, overrides)
    recipe = parse_recipe(data)
    base = path.resolve().parent  # relative data paths are relative to the recipe file, not the cwd
    if recipe.calibration.data is not None and not recipe.calibration.data.is_absolute():
        recipe.calibration.data = (base / recipe.calibration.data).resolve()
    if recipe.report.eval_data is not None and not recipe.report.eval_data.is_absolute():
        recipe.report.eval_data = (base / recipe.report.eval_data).resolve()
    if recipe.distill is not None and recipe.distill.data is not None and not recipe.distill.data.is_absolute():
        recipe.distill.data = (base / recipe.distill.data).resolve()
    return recipe


def json_schema() -> dict:
    """JSON Schema for editors: the Recipe plus one alternative per registered pass."""
    schema = Recipe.model_json_schema()
    defs = schema.setdefault("$defs", {})
    options = []
    for name, spec in sorted(all_passes().items()):
        sub = spec.config_cls.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[spec.config_cls.__name__] = sub
        options.append({"type": "object", "properties": {name: {"$ref": f"#/$defs/{spec.config_cls.__name__}"}},
                        "required": [name], "additionalProperties": False, "description": spec.summary})
    schema["properties"]["passes"]["items"] = {"oneOf": options}
    return schema
