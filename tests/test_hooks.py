"""Every hook: registered in code through its hookspec, used by a run, documented.
The meta-tests at the end fail when a hookspec has no docs heading or no test."""
import json
import re
from pathlib import Path

import torch

import onecomp_core
from onecomp_core import hookspecs
from onecomp_core.sdk import LayerSpec, ModelAdapter, Plan, Planner, UniformFormat, hookimpl
from onecomp_core.testing import quick

ROOT = Path(__file__).resolve().parents[1]


class AttentionOnly(ModelAdapter):
    """A third-party adapter for Llama that quantizes only the attention linears."""
    name = "aaa-attention-only"          # sorts before the core's "decoder": tried first
    model_types = ("llama",)

    def linear_groups(self, block):
        return [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]


class EightBitDown(Planner):
    """A third-party planner: the run's grid everywhere, 8 bits for down_proj."""
    name = "eightbit-down"

    def plan(self, ctx):
        r = ctx.run
        return Plan({n: LayerSpec(name=n, format=r.format, projector=r.projector, bits=8 if n.endswith("down_proj") else r.bits,
                                  group_size=r.group_size, symmetric=r.symmetric) for n in ctx.shapes}, planner=self.name)


class CopyFormat(UniformFormat):
    name = "uniform-copy"


class Plugin:
    def __init__(self):
        self.blocks = []

    @hookimpl
    def onecomp_register_model_adapters(self, registry):
        registry.add_model_adapter(AttentionOnly)

    @hookimpl
    def onecomp_register_planners(self, registry):
        registry.add_planner(EightBitDown)

    @hookimpl
    def onecomp_register_formats(self, registry):
        registry.add_format(CopyFormat)

    @hookimpl
    def onecomp_block_start(self, index, total, layers):
        self.blocks.append((index, total, list(layers)))


def test_an_adapter_a_planner_and_a_format_registered_by_a_plugin(tiny_llama, tmp_path):
    p = Plugin()
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[p], planner="eightbit-down",
                                format="uniform-copy", **quick())
    assert set(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in rep["layers"]) == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}
    assert {li["format"] for li in rep["layers"].values()} == {"uniform-copy"}
    assert p.blocks == [(0, 2, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]),
                        (1, 2, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"])]
    with torch.no_grad():                       # the format registered in code also loads the checkpoint
        from onecomp_core.sdk import load_plugins
        model = onecomp_core.load_quantized(tmp_path / "q", plugins=load_plugins(extra=[Plugin()]))
        assert torch.isfinite(model(torch.randint(3, 300, (1, 8))).logits).all()


def test_the_planner_hook_decides_bits_per_module(tiny_llama, tmp_path):
    class OnlyPlanner:
        @hookimpl
        def onecomp_register_planners(self, registry):
            registry.add_planner(EightBitDown)
    rep = onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[OnlyPlanner()], planner="eightbit-down", **quick())
    bits = {n: li["bits"] for n, li in rep["layers"].items()}
    assert {b for n, b in bits.items() if n.endswith("down_proj")} == {8}
    assert {b for n, b in bits.items() if not n.endswith("down_proj")} == {4}
    assert json.loads((tmp_path / "q" / "onecomp.json").read_text())["modules"]["model.layers.0.mlp.down_proj"]["bits"] == 8


# -- meta-tests ----------------------------------------------------------------------------------
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("onecomp_"))


def test_every_hook_has_a_docs_heading():
    headings = [ln for ln in (ROOT / "docs" / "hooks.md").read_text().splitlines() if ln.startswith("#")]
    missing = [h for h in HOOKS if not any(f"`{h}" in ln for ln in headings)]
    assert not missing, f"hooks without a heading in docs/hooks.md: {missing}"


def test_every_hook_has_a_test():
    texts = [p.read_text() for d in ("tests", "plugins", "onecomp_plugins_gptq", "onecomp_plugins_dbf")
             for p in (ROOT / d).rglob("test_*.py") if p.name != "test_hooks.py"]
    texts.append(Path(__file__).read_text().split("# -- meta-tests")[0])
    missing = [h for h in HOOKS if not any(re.search(rf"\bdef {h}\(", t) for t in texts)]
    assert not missing, f"hooks no test implements: {missing}"


def test_plugins_import_only_the_public_api():
    """No plugin in the repository reaches into the core's internals: only ``onecomp_core``
    (the one-line API), ``onecomp_core.sdk`` and, in tests, ``onecomp_core.testing``."""
    allowed = {"onecomp_core", "onecomp_core.sdk", "onecomp_core.testing"}
    bad = []
    for d in [ROOT / "onecomp_plugins_gptq", ROOT / "onecomp_plugins_dbf", *(ROOT / "plugins").iterdir()]:
        for p in d.rglob("*.py"):
            for m in re.finditer(r"^\s*(?:from\s+(onecomp_core[\w.]*)\s+import|import\s+(onecomp_core[\w.]*))",
                                 p.read_text(), re.M):
                mod = m.group(1) or m.group(2)
                if mod not in allowed:
                    bad.append(f"{p.relative_to(ROOT)}: {mod}")
    assert not bad, bad
