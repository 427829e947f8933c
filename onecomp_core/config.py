"""Run configuration: attrs classes, loadable from YAML/TOML/JSON or a dict, every field
validated with a message that names it. Each component's options come from its own ``Options``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from .calibration import STRATEGIES
from .errors import OnecompError


def _fail(field: str, msg: str):
    raise OnecompError(f"config field {field!r}: {msg}")


def group_size_value(v: Any, field: str = "group_size") -> int:
    """An int > 0, or -1 / 'channel' / 'per-channel' for one group per output row."""
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("channel", "per-channel", "per_channel", "-1"):
            return -1
        try:
            v = int(s)
        except ValueError:
            _fail(field, f"must be a positive integer or 'channel' (-1), got {v!r}")
    if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and v != -1):
        _fail(field, f"must be a positive integer or 'channel' (-1), got {v!r}")
    return v


def _int_in(lo: int, hi: int | None = None):
    def check(inst, attr, value):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(attr.name, f"must be an integer, got {value!r}")
        if value < lo or (hi is not None and value > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            _fail(attr.name, f"must be {rng}, got {value}")
    return check


STORE_DTYPES = ("auto", "float16", "bfloat16", "float32")


def _one_of(options):
    def check(inst, attr, value):
        if value not in options:
            _fail(attr.name, f"must be one of {', '.join(map(str, options))}, got {value!r}")
    return check


def _type(t, what):
    def check(inst, attr, value):
        if not isinstance(value, t) or isinstance(value, bool) and t is not bool:
            _fail(attr.name, f"must be {what}, got {value!r}")
    return check


def _opt_str(inst, attr, value):
    if value is not None and not isinstance(value, str):
        _fail(attr.name, f"must be a string, got {value!r}")


@attrs.define(frozen=True)
class CalibrationConfig:
    source: str | None = attrs.field(default=None, validator=_opt_str)
    num_samples: int = attrs.field(default=32, validator=_int_in(1))
    seq_len: int = attrs.field(default=512, validator=_int_in(8))
    strategy: str = attrs.field(default="concat_chunk", validator=_one_of(STRATEGIES))
    seed: int = attrs.field(default=0, validator=_int_in(0))
    text_field: str = attrs.field(default="text", validator=_type(str, "a string"))
    split: str = attrs.field(default="train", validator=_type(str, "a string"))
    cache: bool = attrs.field(default=True, validator=_type(bool, "true or false"))
    batch_size: int = attrs.field(default=0, validator=_int_in(0, 4096))    # samples per block forward; 0: by device
    refine_samples: int = attrs.field(default=0, validator=_int_in(0, 1 << 20))  # model refiners train on; 0: auto (runner.refine_counts)
    heldout: int = attrs.field(default=0, validator=_int_in(0, 4096))       # samples judging model refiners; 0: 10%
    stats_dtype: str = attrs.field(default="float32", validator=_one_of(("float32", "float64")))  # statistics' sums
    # the layer-wise pass's block forwards: auto = bfloat16 on a CPU with native bfloat16 matmuls; off = the compute dtype
    forward_dtype: str = attrs.field(default="auto", validator=_one_of(("auto", "bfloat16", "statistics", "off")))


def _names(inst, attr, value):
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        _fail(attr.name, f"must be a list of names, got {value!r}")


def _options_map(inst, attr, value):
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        _fail(attr.name, f"must map component names to option tables, got {value!r}")


def _bpw(inst, attr, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        _fail(attr.name, f"must be a positive number of bits per weight, got {value!r}")


def _bos_mode(inst, attr, value):
    if value not in ("auto", "yes", "no"):
        _fail(attr.name, f"must be auto (as the tokenizer does), yes or no, got {value!r}")


def _refine_mode(inst, attr, value):
    if value not in ("manual", "auto"):
        _fail(attr.name, f"must be 'manual' (the refiners listed) or 'auto' (the strongest that fit), got {value!r}")


def _duration(inst, attr, value):
    if value is None:
        return
    from .resources import parse_duration
    try:
        if parse_duration(value) <= 0:
            raise OnecompError("")
    except OnecompError:
        _fail(attr.name, f"must be a duration such as 45m, 2h or a positive number of seconds, got {value!r}")


def _size(inst, attr, value):
    if value is None:
        return
    from .resources import parse_size
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or parse_size(value) <= 0:
            raise OnecompError("")
    except OnecompError:
        _fail(attr.name, f"must be a size such as 6GiB, 500MB or a positive number of bytes, got {value!r}")


@attrs.define(frozen=True)
class BudgetConfig:
    """At most one of target_bpw, budget_bytes, fit_memory (a planner says which it takes);
    context and batch size the inference that fit_memory leaves room for."""
    target_bpw: float | None = attrs.field(default=None, validator=_bpw)
    budget_bytes: str | int | None = attrs.field(default=None, validator=_size)
    fit_memory: str | int | None = attrs.field(default=None, validator=_size)
    context: int = attrs.field(default=4096, validator=_int_in(1))
    batch: int = attrs.field(default=1, validator=_int_in(1))

    def given(self) -> list[str]:
        return [k for k in ("target_bpw", "budget_bytes", "fit_memory") if getattr(self, k) is not None]


@attrs.define(frozen=True)
class RunConfig:
    model: str = attrs.field(validator=_type(str, "a model folder, .gguf file or hub id"))
    out: str | None = attrs.field(default=None, validator=_opt_str)
    bits: int = attrs.field(default=4, validator=_int_in(1, 16))
    group_size: int = attrs.field(default=128, converter=group_size_value)
    symmetric: bool = attrs.field(default=False, validator=_type(bool, "true or false"))
    format: str = attrs.field(default="uniform", validator=_type(str, "a format name"))
    projector: str | None = attrs.field(default=None, validator=_opt_str)     # None: gptq where installed, else rtn
    preprocessors: tuple = attrs.field(default=(), converter=tuple, validator=_names)
    refiners: tuple = attrs.field(default=(), converter=tuple, validator=_names)
    refine: str = attrs.field(default="manual", validator=_refine_mode)    # auto: add the refiners that fit
    max_memory: str | int | None = attrs.field(default=None, validator=_size)         # default: the machine's
    time_budget: str | int | float | None = attrs.field(default=None, validator=_duration)
    spill_streams: str = attrs.field(default="auto", validator=_one_of(("auto", "always", "never")))   # to disk
    planner: str = attrs.field(default="uniform", validator=_type(str, "a planner name"))
    budget: BudgetConfig = attrs.field(factory=BudgetConfig)
    exports: tuple = attrs.field(default=(), converter=tuple, validator=_names)
    exclude: tuple = attrs.field(default=("lm_head",), converter=tuple, validator=_names)
    options: dict = attrs.field(factory=dict, validator=_options_map)
    calibration: CalibrationConfig = attrs.field(factory=CalibrationConfig)
    device: str = attrs.field(default="auto", validator=_type(str, "auto, cpu, cuda or cuda:N"))
    dtype: str = attrs.field(default="auto", validator=_type(str, "auto or a torch dtype name"))
    store_dtype: str = attrs.field(default="auto", validator=_one_of(STORE_DTYPES))   # unquantized tensors on disk
    overwrite: bool = attrs.field(default=False, validator=_type(bool, "true or false"))
    eval_text: str | None = attrs.field(default=None, validator=_opt_str)
    bos: str = attrs.field(default="auto", validator=_bos_mode)    # sequences start with BOS: as the tokenizer does
    eval_tokens: int = attrs.field(default=16384, validator=_int_in(2))
    eval_seq_len: int = attrs.field(default=512, validator=_int_in(2))

    def to_dict(self) -> dict:
        d = attrs.asdict(self, recurse=True)
        for k in ("preprocessors", "refiners", "exports", "exclude"):
            d[k] = list(getattr(self, k))
        return d

    def component_options(self, name: str) -> dict:
        return dict(self.options.get(name, {}))


LISTS = ("preprocessors", "refiners", "exports", "exclude")
ALIASES = {"corrections": "refiners"}          # older name of a config field
SECTIONS = {"calibration": CalibrationConfig, "budget": BudgetConfig}


def _section(d: dict, key: str, cls) -> None:
    """Turn ``d[key]`` into ``cls``; its fields may also be given flat at the top level."""
    sec = d.get(key, {})
    if key == "calibration" and isinstance(sec, str):
        sec = {"source": sec}
    if not isinstance(sec, dict):
        raise OnecompError(f"config field {key!r}: must be a table, got {sec!r}")
    sec = dict(sec)
    known = {a.name for a in attrs.fields(cls)}
    top = {a.name for a in attrs.fields(RunConfig)}
    for f in known:
        if f in d and f not in top:
            if f in sec:
                raise OnecompError(f"config field {f!r} is given twice, at the top level and under {key!r}; keep one")
            sec[f] = d.pop(f)
    bad = sorted(set(sec) - known)
    if bad:
        raise OnecompError(f"unknown {key} field(s) {', '.join(map(repr, bad))}; known: {', '.join(sorted(known))}")
    d[key] = cls(**sec)


def from_dict(d: dict) -> RunConfig:
    if not isinstance(d, dict):
        raise OnecompError(f"a config must be a table of fields, got {type(d).__name__}")
    d = dict(d)
    for old, new in ALIASES.items():
        if old in d:
            if new in d:
                raise OnecompError(f"config fields {old!r} and {new!r} name the same list; keep {new!r}")
            d[new] = d.pop(old)
    if "model" not in d:
        raise OnecompError("config field 'model' is required (a model folder, .gguf file or hub id)")
    for key, cls in SECTIONS.items():
        _section(d, key, cls)
    known = {a.name for a in attrs.fields(RunConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise OnecompError(f"unknown config field(s) {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
    for k in LISTS:
        if isinstance(d.get(k), str):
            d[k] = [d[k]]
    return RunConfig(**d)


def make_config(model=None, config=None, options=None, **fields) -> RunConfig:
    """The one place a run's configuration is put together: a config file (read here) or table,
    then ``options`` (component option tables merged over the file's), then keyword fields, which
    win over the file (None ignored). Calibration and budget fields may be given flat
    (``num_samples=16``, ``target_bpw=2.5``); ``calibration=FILE`` names the calibration source."""
    base = read_file(config) if isinstance(config, (str, Path)) else dict(config or {})
    if model is not None:
        base["model"] = str(model)
    if options:
        merged = dict(base.get("options", {}))
        for comp, kv in options.items():
            if "." in comp and not isinstance(kv, dict):          # {"gptq.damp": 0.05}, as --option writes it
                comp, key = comp.split(".", 1)
                kv = {key: kv}
            if not isinstance(kv, dict):
                raise OnecompError(f"options[{comp!r}] must be a table of that component's options, e.g. "
                                   f"options={{{comp!r}: {{'name': value}}}} or {{'{comp}.name': value}}")
            merged[comp] = {**merged.get(comp, {}), **kv}
        base["options"] = merged
    for old, new in ALIASES.items():        # a keyword list replaces the file's, whichever name either uses
        if fields.get(old) is not None:
            fields[new] = fields[old]
        fields.pop(old, None)
        if fields.get(new) is not None:
            base.pop(old, None)
    for key in ("calibration", "calibration_source"):      # the calibration text, by its path or id
        v = fields.pop(key, None)
        if v is not None:
            fields["source"] = str(v)
    for key, cls in SECTIONS.items():
        names = {a.name for a in attrs.fields(cls)}
        given = {f: fields.pop(f) for f in list(fields) if f in names}
        given = {f: v for f, v in given.items() if v is not None}
        if given:
            sec = base.get(key, {})
            sec = {"source": sec} if isinstance(sec, str) else dict(sec)
            base[key] = {**sec, **given}
            for f in given:                   # the file's flat value of the same field gives way too
                base.pop(f, None)
    base.update({k: v for k, v in fields.items() if v is not None})
    return from_dict(base)


def read_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise OnecompError(f"config file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        elif p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise OnecompError(f"config file {p}: unknown type; use .yaml, .toml or .json")
    except OnecompError:
        raise
    except Exception as exc:
        raise OnecompError(f"config file {p} does not parse: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise OnecompError(f"config file {p} must hold a table of fields")
    return data


def option_names(cls: type) -> set[str]:
    opt_cls = getattr(cls, "Options", None)
    return set() if opt_cls is None else {a.name for a in attrs.fields(opt_cls)}


def build_options(kind: str, name: str, cls: type, raw: dict, siblings: tuple[type, ...] = ()):
    """A component's validated ``Options`` from a raw table; errors name the component and field.
    ``siblings``: components of other kinds with the same name (a format and the projector that
    writes it, e.g. ``dbf``) share the table ``options.NAME``; each takes the keys it knows and
    a key is an error only when none of them knows it."""
    fields = option_names(cls)
    known_elsewhere = set().union(*(option_names(c) for c in siblings))
    raw = {k: v for k, v in raw.items() if k not in known_elsewhere or k in fields}
    opt_cls = getattr(cls, "Options", None)
    if opt_cls is None:
        if raw:
            raise OnecompError(f"{kind} {name!r} takes no options, got {', '.join(raw)}")
        return None
    unknown = sorted(set(raw) - fields)
    if unknown:
        fields |= known_elsewhere
        raise OnecompError(f"{kind} {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                           f"options: {', '.join(sorted(fields)) or 'none'}")
    try:
        return opt_cls(**raw)
    except OnecompError:
        raise
    except (TypeError, ValueError) as exc:
        raise OnecompError(f"{kind} {name!r} options: {str(exc).splitlines()[0]}") from None


def options_dict(options) -> dict:
    return {} if options is None else attrs.asdict(options)
