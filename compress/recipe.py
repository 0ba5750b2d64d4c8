"""The recipe: plain data that says what to do to a model. The CLI only builds one; every output holds it."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compress.compensate import CompensateConfig
from compress.errors import CompressError
from compress.factorize import FactorizeConfig
from compress.methods import METHODS, config_type, method_name
from compress.quantize import GridConfig, LearnedConfig
from compress.search import Form

# Keys of the recipe files written before per-method configs (one Quantize/Factorize/Compensate for every method),
# with the defaults they always carried: a key the method's config lacks is dropped when it holds its default.
LEGACY_DEFAULTS = {"act_order": False, "static_groups": False, "damp": 0.01, "rank": None, "iterations": 200,
                   "lr": 1e-3, "seed": 0, "window": 2, "overlap": 1, "beta": None, "beta_min": 0.25, "beta_max": 0.75}
# Keys added to the configs since recipes were first written, with the value a recipe without them ran with.
ADDED_KEYS = {"clip": "minmax", "ridge": 0.0, "start": "rtn"}
STAGE_TYPES = {"factorize": FactorizeConfig, "quantize": GridConfig, "compensate": CompensateConfig}


@dataclass(frozen=True)
class Calibration:
    """`nsamples` windows of `seqlen` tokens drawn with `seed` from `source` (None: the bundled corpus).

    seqlen None: the smaller of 2048 and the model's maximum positions.
    """

    source: str | None = None
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.nsamples < 1:
            raise CompressError(f"nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise CompressError(f"seqlen must be >= 2, got {self.seqlen}")


GRAM_DTYPE_CHOICES = ("auto", "float64", "float32")


@dataclass(frozen=True)
class Recipe:
    """Stages run in this order on every targeted linear: factorize, then quantize (the factors, if any),
    then compensate the quantization error (only without factorize). Each stage holds one method's config
    (compress.methods.METHODS); its type says which method runs.

    include / exclude: regular expressions over full module names; by default every linear inside
    the decoder blocks is compressed (embeddings and the LM head stay as they are).
    true_sequential: inside a block, compress the linears group by group in the order data flows, each group's
    statistics captured with the earlier groups already compressed (False: all from the uncompressed block).
    bpw: a size budget in bits per weight over the targeted linears: each layer's form (bits, group size,
    compensation rank) is searched (compress.search), the quantize and compensate stages giving the methods.
    forms: {layer name: {bits, group_size, rank}}, the forms a search chose; a recipe holding them replays them.
    gram_dtype: the precision of the input statistics: "float64", "float32", or "auto" (float64 unless a capture
    step's Grams would take more than half of the device's memory; then the widest are float32, see
    compress.linalg.gram_dtypes, and the report names them).
    """

    factorize: FactorizeConfig | None = None
    quantize: GridConfig | None = None
    compensate: CompensateConfig | None = None
    calibration: Calibration = field(default_factory=Calibration)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    true_sequential: bool = True
    bpw: float | None = None
    forms: dict[str, dict] = field(default_factory=dict)
    gram_dtype: str = "auto"

    def __post_init__(self):
        if self.gram_dtype not in GRAM_DTYPE_CHOICES:
            raise CompressError(f"gram_dtype must be one of {', '.join(GRAM_DTYPE_CHOICES)}, got {self.gram_dtype!r}")
        for stage, kind in STAGE_TYPES.items():
            config = getattr(self, stage)
            if config is not None and not isinstance(config, kind):
                raise CompressError(f"recipe.{stage} must be a {stage} method's config "
                                    f"({', '.join(c.__name__ for c, _ in METHODS[stage].values())}), got {config!r}")
        if self.factorize is None and self.quantize is None and self.compensate is None:
            raise CompressError("nothing to do: give a rank budget (--rank-budget), a bit width (--wbits), or both")
        if self.compensate is not None and self.factorize is not None:
            raise CompressError("compensation corrects a quantized weight: use it with --wbits "
                                "and without --rank-budget")
        if self.factorize is not None and isinstance(self.quantize, LearnedConfig):
            raise CompressError(f"{method_name(self.quantize)} learns the quantized weights of whole blocks: "
                                "use it without --rank-budget")
        if self.bpw is not None or self.forms:
            self._check_forms()
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def _check_forms(self) -> None:
        if self.bpw is not None and not 0 < self.bpw <= 16:
            raise CompressError(f"--bpw must be in (0, 16], got {self.bpw:g}")
        if self.factorize is not None:
            raise CompressError("--bpw searches quantized and compensated forms per layer: use it without "
                                "--rank-budget")
        if self.quantize is None or isinstance(self.quantize, LearnedConfig):
            raise CompressError("--bpw needs a layer quantizer (--quantize rtn, gptq or gptaq): learned quantizers "
                                "learn whole blocks on one grid")
        for name, form in self.forms.items():
            try:
                Form.from_dict(form)
            except (KeyError, TypeError, ValueError):
                raise CompressError(f"recipe.forms: {name} needs bits, group_size and rank, got {form!r}") from None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for stage in STAGE_TYPES:
            config = getattr(self, stage)
            if config is not None:
                data[stage] = {"method": method_name(config), **dataclasses.asdict(config)}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        """A recipe from its dict. One without `true_sequential` was written before per-method configs: its stages
        may carry other methods' default keys (dropped), and it replays as it ran, without true-sequential."""
        _known_keys("recipe", data, cls)
        kwargs = dict(data)
        legacy = "true_sequential" not in data
        for stage in STAGE_TYPES:
            if kwargs.get(stage) is not None:
                kwargs[stage] = _stage_config(stage, kwargs[stage], legacy)
        if kwargs.get("calibration") is not None:
            if not isinstance(kwargs["calibration"], dict):
                raise CompressError(f"recipe: 'calibration' must be a mapping, got {kwargs['calibration']!r}")
            _known_keys("recipe.calibration", kwargs["calibration"], Calibration)
            kwargs["calibration"] = Calibration(**kwargs["calibration"])
        else:
            kwargs.pop("calibration", None)
        if legacy:
            kwargs["true_sequential"] = False
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a .json, .yaml or .yml file."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CompressError(f"cannot read recipe {path}: {exc}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise CompressError(f"recipe {path} must hold a mapping at the top level")
        return cls.from_dict(data)


def _stage_config(stage: str, data: object, legacy: bool):
    """The config of one stage from {method: name, field: value, ...}."""
    if not isinstance(data, dict):
        raise CompressError(f"recipe: '{stage}' must be a mapping, got {data!r}")
    fields = dict(data)
    name = fields.pop("method", None)
    if name not in METHODS[stage]:
        raise CompressError(f"recipe.{stage}: unknown method {name!r} (choose from {', '.join(METHODS[stage])})")
    kind = config_type(stage, name)
    own = {f.name for f in dataclasses.fields(kind)}
    if legacy:
        stale = [key for key in fields if key not in own and key in LEGACY_DEFAULTS]
        changed = [key for key in stale if fields[key] != LEGACY_DEFAULTS[key]]
        if changed:
            raise CompressError(f"recipe.{stage}: {', '.join(changed)} do(es) not apply to {name} (an old recipe "
                                f"file?); remove the key(s) and add `true_sequential: false` to replay it as it ran")
        # None stood for "the method's default" (LRQ's and CBQ's rank)
        fields = {key: value for key, value in fields.items()
                  if key not in stale and not (value is None and getattr(kind, key, None) is not None)}
    _known_keys(f"recipe.{stage} ({name})", fields, kind)
    fields = {**{key: value for key, value in ADDED_KEYS.items() if key in own}, **fields}
    return kind(**fields)


def _known_keys(where: str, data: dict, kind: type) -> None:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise CompressError(f"{where}: unknown key(s) {', '.join(unknown)}")
