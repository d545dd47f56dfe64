"""The private PEFT/diffusers calls of inference/peft_internals.py, checked against real objects.

Pinned: these were checked against the versions in CHECKED_VERSIONS. After an upgrade this test
fails first; re-check each wrapper against the new sources, then update the pin.
"""

from __future__ import annotations

from importlib.metadata import version

import pytest
import torch

from inference import peft_internals
from inference.lora_compat import read_lora


def test_the_installed_versions_are_the_ones_these_calls_were_checked_against():
    installed = {name: version(name) for name in peft_internals.CHECKED_VERSIONS}
    assert installed == peft_internals.CHECKED_VERSIONS, (
        "diffusers/peft changed: re-check inference/peft_internals.py against their sources, then update "
        "CHECKED_VERSIONS")


def test_every_wrapper_is_exercised_here():
    """The pin covers what this file checks: a wrapper added to peft_internals gets a check here."""
    import inspect
    from pathlib import Path

    here = Path(__file__).read_text()
    wrappers = [name for name, value in vars(peft_internals).items() if inspect.isfunction(value)
                and value.__module__ == peft_internals.__name__ and not name.startswith("_")]
    unchecked = [name for name in wrappers if f"peft_internals.{name}(" not in here]
    assert len(wrappers) > 20 and not unchecked, f"no check of {unchecked} in this file"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_layers(pipe, name: str) -> list[tuple[str, object]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(path, m) for path, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer) and name in m.lora_A]


@pytest.fixture
def probe(pipe, make_lora):
    """Adapter "probe" (UNet and text encoders) loaded by diffusers into `pipe`, removed afterwards."""
    weights = read_lora(pipe, make_lora(seed=10, text_encoders=True))
    peft_internals.load_into_pipeline(pipe, weights.state_dict, adapter_name="probe", network_alphas=None,
                                      metadata=weights.metadata)
    yield pipe
    peft_internals.purge_adapter(pipe, "probe")


def test_load_into_pipeline_injects_an_adapter_into_every_component_the_file_touches(pipe, make_lora):
    weights = read_lora(pipe, make_lora(seed=5, text_encoders=True))
    peft_internals.load_into_pipeline(pipe, weights.state_dict, adapter_name="probe", network_alphas=None,
                                      metadata=weights.metadata)
    try:
        for component in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            assert "probe" in component.peft_config
        assert unet_layers(pipe, "probe")
    finally:
        pipe.delete_adapters(["probe"])


def test_lora_config_and_rank_alpha_resolution_follow_the_file(pipe, make_lora):
    from inference.hotswap import UnetLora

    lora = UnetLora.parse(read_lora(pipe, make_lora(seed=6, rank=4)))
    config = peft_internals.lora_config_for(lora.state, None, None, {f"^{k}": v.shape[1] for k, v in lora.state.items()
                                                                     if ".lora_B." in k})
    assert config.r == 4
    path = next(iter(lora.modules))
    rank, alpha = peft_internals.rank_and_alpha(config, path)
    assert rank == 4 and alpha == config.lora_alpha


def test_hotswap_refusal_says_why_and_nothing_for_matching_configs(pipe, make_lora):
    from inference.hotswap import UnetLora

    config = UnetLora.parse(read_lora(pipe, make_lora(seed=7))).config
    assert peft_internals.hotswap_refusal(config, config) is None
    other = type(config)(**{**config.to_dict(), "use_rslora": not config.use_rslora})
    assert "incompatible" in peft_internals.hotswap_refusal(config, other).lower()


def test_rank_alpha_writes_and_exact_base_weight_restore_on_a_real_layer(pipe, make_lora):
    weights = read_lora(pipe, make_lora(seed=8))
    peft_internals.load_into_pipeline(pipe, weights.state_dict, adapter_name="probe", network_alphas=None,
                                      metadata=weights.metadata)
    try:
        _, layer = unet_layers(pipe, "probe")[0]
        alpha = peft_internals.alpha_for_scaling(layer, "probe", 0.25)
        peft_internals.set_rank_alpha(layer, "probe", layer.r["probe"], alpha, 0.25)
        layer.set_scale("probe", 1.0)  # PEFT recomputes scaling from alpha and rank here
        assert layer.scaling["probe"] == pytest.approx(0.25)

        base = layer.get_base_layer().weight.detach().clone()
        layer.merge(adapter_names=["probe"])
        assert layer.merged_adapters == ["probe"] and not torch.equal(layer.get_base_layer().weight, base)
        peft_internals.restore_base_weight(layer, base)
        assert layer.merged_adapters == [] and torch.equal(layer.get_base_layer().weight, base)
    finally:
        pipe.delete_adapters(["probe"])


def test_an_adapter_added_to_a_wrapped_layer_is_peft_shaped_and_carries_the_given_weights(pipe, make_lora):
    weights = read_lora(pipe, make_lora(seed=9))
    peft_internals.load_into_pipeline(pipe, weights.state_dict, adapter_name="probe", network_alphas=None,
                                      metadata=weights.metadata)
    try:
        path, layer = unet_layers(pipe, "probe")[0]
        assert peft_internals.is_plain_lora_linear(layer)
        assert not peft_internals.is_plain_lora_linear(layer.get_base_layer())
        config = pipe.unet.peft_config["probe"]
        down = torch.randn(2, layer.in_features, dtype=torch.float16)  # cast to the base layer's dtype
        up = torch.randn(layer.out_features, 2)
        peft_internals.register_adapter_config(pipe.unet, "added", config)
        peft_internals.add_adapter_to_layer(layer, "added", 2, 3.0, config, path, down, up)
        assert pipe.unet.peft_config["added"] is config and pipe.unet._hf_peft_config_loaded
        assert layer.r["added"] == 2 and layer.lora_alpha["added"] == 3.0 and layer.scaling["added"] == 1.5
        for module, expected in ((layer.lora_A["added"], down), (layer.lora_B["added"], up)):
            weight = module.weight
            assert weight.device.type == "cpu" and weight.dtype == layer.get_base_layer().weight.dtype
            assert torch.equal(weight, expected.float())
        assert layer.active_adapters == ["probe"], "adding an adapter activates nothing"
    finally:
        pipe.delete_adapters(["probe", "added"])
    assert unet_layers(pipe, "added") == [] and not getattr(pipe.unet, "peft_config", None)


def test_lora_layers_is_the_walk_over_every_peft_layer_of_the_pipeline_or_a_model(probe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = peft_internals.lora_layers(probe)
    expected = [(c, path, m) for c in ("unet", "text_encoder", "text_encoder_2")
                for path, m in getattr(probe, c).named_modules() if isinstance(m, BaseTunerLayer)]
    assert found == expected and {c for c, _, _ in found} == {"unet", "text_encoder", "text_encoder_2"}
    assert peft_internals.lora_layers(probe.unet) == [("", p, m) for c, p, m in expected if c == "unet"]
    _, path, layer = found[0]
    assert peft_internals.adapter_names(layer) == {"probe"}
    assert peft_internals.has_adapter(layer, "probe") and not peft_internals.has_adapter(layer, "other")
    assert peft_internals.adapter_config(probe.unet, "probe") is probe.unet.peft_config["probe"]
    assert peft_internals.base_layer_of(layer) is layer.base_layer
    assert peft_internals.base_layer_of(layer.base_layer) is layer.base_layer
    assert peft_internals.base_weight(layer) is layer.base_layer.weight


def test_adapter_weights_are_read_and_written_in_place(probe):
    _, _, layer = next(t for t in peft_internals.lora_layers(probe) if t[0] == "unet")
    down_shape, up_shape = peft_internals.adapter_weight_shapes(layer, "probe")
    assert (down_shape, up_shape) == (layer.lora_A["probe"].weight.shape, layer.lora_B["probe"].weight.shape)
    assert peft_internals.uses_rslora(layer, "probe") is False
    before = layer.lora_A["probe"].weight
    down, up = torch.randn(down_shape), torch.randn(up_shape)
    peft_internals.write_adapter_weights(layer, "probe", down, up)
    assert layer.lora_A["probe"].weight is before, "in place: the parameter object stays"
    assert torch.equal(layer.lora_A["probe"].weight, down) and torch.equal(layer.lora_B["probe"].weight, up)
    peft_internals.write_adapter_weights(layer, "probe", None, None)
    assert not layer.lora_A["probe"].weight.any() and not layer.lora_B["probe"].weight.any()


def test_config_flags_and_per_module_scaling_follow_peft(pipe):
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"to_q": 2}, alpha_pattern={"to_q": 6},
                        target_modules=["to_q"])
    assert peft_internals.module_scaling(config, "a.to_k") == 2.0
    assert peft_internals.module_scaling(config, "a.to_q") == 3.0
    rs = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["to_q"])
    assert peft_internals.module_scaling(rs, "a.to_k") == 4.0
    assert peft_internals.uses_rslora_config(rs) and not peft_internals.uses_rslora_config(config)
    assert not peft_internals.needs_peft_injection(config)
    for flag in ({"use_dora": True}, {"lora_bias": True}, {"lora_dropout": 0.1}):
        assert peft_internals.needs_peft_injection(LoraConfig(r=4, target_modules=["to_q"], **flag)), flag
    for cfg, expected in ((config, 8 / 4), (rs, 8 / 2)):  # PEFT's own layer computes the same scaling
        layer = Linear(torch.nn.Linear(8, 8), "a", r=4, lora_alpha=8, use_rslora=cfg.use_rslora, config=cfg)
        assert layer.scaling["a"] == expected == peft_internals.module_scaling(cfg, "x.to_k")


def test_active_adapters_scales_and_scaling_rewrites(probe):
    _, _, layer = next(t for t in peft_internals.lora_layers(probe) if t[0] == "unet")
    peft_internals.set_active_adapters(layer, [("probe", 0.5)])
    assert layer.active_adapters == ["probe"] and not layer.disable_adapters
    assert layer.scaling["probe"] == pytest.approx(0.5 * layer.lora_alpha["probe"] / layer.r["probe"])
    peft_internals.set_active_adapters(layer, [])
    assert layer.disable_adapters
    peft_internals.set_adapter_scaling(layer, "probe", 0.125)
    assert layer.scaling["probe"] == 0.125
    layer.set_scale("probe", 1.0)
    assert layer.scaling["probe"] == pytest.approx(0.125), "alpha was rewritten so set_scale keeps it"


def test_merge_adapters_is_peft_merge(probe):
    _, _, layer = next(t for t in peft_internals.lora_layers(probe) if t[0] == "unet")
    base = peft_internals.base_weight(layer).detach().clone()
    expected = base + layer.get_delta_weight("probe")
    peft_internals.merge_adapters(layer, ["probe"])
    assert layer.merged_adapters == ["probe"] and torch.equal(peft_internals.base_weight(layer), expected)
    peft_internals.restore_base_weight(layer, base)
    assert torch.equal(peft_internals.base_weight(layer), base)


def test_purge_adapter_removes_it_from_every_layer_and_config_even_half_injected(probe):
    assert "probe" in probe.text_encoder.peft_config
    del probe.text_encoder.peft_config["probe"]  # as a half-finished injection leaves it: unknown to one config
    peft_internals.purge_adapter(probe, "probe")
    assert not any(peft_internals.has_adapter(layer, "probe") for _, _, layer in peft_internals.lora_layers(probe))
    for component in (probe.unet, probe.text_encoder, probe.text_encoder_2):
        assert "probe" not in (getattr(component, "peft_config", None) or {})


def test_a_bias_merge_is_kept_to_restore_and_skipped_where_peft_cannot_merge():
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    config = LoraConfig(r=2, lora_alpha=2, lora_bias=True, target_modules=["x"])
    layer = Linear(torch.nn.Linear(4, 4), "b", r=2, lora_alpha=2, lora_bias=True, config=config)
    torch.nn.init.normal_(layer.lora_B["b"].weight)
    torch.nn.init.normal_(layer.lora_B["b"].bias)
    weight, bias = peft_internals.base_weight(layer).detach().clone(), layer.base_layer.bias.detach().clone()
    assert peft_internals.can_merge(layer, ["b"])
    assert peft_internals.bias_merged_by(layer, ["b"]) is layer.base_layer.bias
    peft_internals.merge_adapters(layer, ["b"])
    assert not torch.equal(layer.base_layer.bias, bias), "PEFT's merge adds the LoRA's bias"
    peft_internals.restore_base_weight(layer, weight, bias)
    assert torch.equal(layer.base_layer.bias, bias) and torch.equal(peft_internals.base_weight(layer), weight)

    plain = LoraConfig(r=2, lora_alpha=2, target_modules=["x"])
    no_bias = Linear(torch.nn.Linear(4, 4, bias=False), "p", r=2, lora_alpha=2, config=plain)
    assert peft_internals.can_merge(no_bias, ["p"]) and peft_internals.bias_merged_by(no_bias, ["p"]) is None
    no_bias.update_layer("b", 2, lora_alpha=2, config=config, lora_bias=True)
    assert not peft_internals.can_merge(no_bias, ["p", "b"])
    with pytest.raises(RuntimeError, match="no bias"):
        no_bias.merge(adapter_names=["b"])


def test_load_fault_names_missing_tensors_and_whole_module_wrappers_which_purge_undoes(probe):
    from peft.utils.other import ModulesToSaveWrapper

    assert peft_internals.load_fault(probe, "probe") is None
    _, path, layer = next(t for t in peft_internals.lora_layers(probe) if t[0] == "unet")
    real = layer.lora_B["probe"].weight
    layer.lora_B["probe"].weight = torch.nn.Parameter(torch.empty(real.shape, device="meta"), requires_grad=False)
    assert f"unet.{path}.lora_B.probe.weight" in peft_internals.load_fault(probe, "probe")
    layer.lora_B["probe"].weight = real

    path = next(name for name, _ in probe.text_encoder.named_modules() if name.endswith("final_layer_norm"))
    parent, _, child = path.rpartition(".")
    owner = probe.text_encoder.get_submodule(parent) if parent else probe.text_encoder
    norm = getattr(owner, child)
    setattr(owner, child, ModulesToSaveWrapper(norm, "probe"))
    assert "modules_to_save" in peft_internals.load_fault(probe, "probe")
    peft_internals.purge_adapter(probe, "probe")
    assert getattr(owner, child) is norm, "the original module is back"


def test_purge_after_a_failed_load_unwraps_the_layers_the_load_wrapped(tiny_model, make_lora):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model))
    before = [layer for _, _, layer in peft_internals.lora_layers(pipe)]
    modules = {c: [(n, type(m)) for n, m in getattr(pipe, c).named_modules()] for c in ("unet", "text_encoder")}
    weights = read_lora(pipe, make_lora(seed=11, text_encoders=True))
    peft_internals.load_into_pipeline(pipe, weights.state_dict, adapter_name="probe", network_alphas=None,
                                      metadata=weights.metadata)
    assert len(peft_internals.lora_layers(pipe)) > len(before), "the text encoders' layers were wrapped"
    peft_internals.purge_adapter(pipe, "probe", keep_layers=before)
    assert [layer for _, _, layer in peft_internals.lora_layers(pipe)] == before
    assert {c: [(n, type(m)) for n, m in getattr(pipe, c).named_modules()] for c in modules} == modules
