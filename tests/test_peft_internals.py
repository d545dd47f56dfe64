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


@pytest.fixture(scope="module")
def pipe(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_layers(pipe, name: str) -> list[tuple[str, object]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(path, m) for path, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer) and name in m.lora_A]


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
