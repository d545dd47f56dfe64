"""Real-world LoRA formats: Replicate trained_model.tar bundles, kohya and PEFT files of the same weights.

References are independent of our loader: plain diffusers with the bundle's embeddings loaded by
`load_textual_inversion` under the trainer's own token names, and LoRA weights merged by hand.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from inference.errors import ErrorCode, ServiceError
from inference.lora_store import LoraStore
from inference.pipeline import Engine, GenerationJob

STEPS = 3
PROMPT = "a photo of TOK, studio light"


@pytest.fixture
def store(tmp_path):
    return LoraStore(tmp_path / "cache", max_cache_bytes=1 << 30, max_lora_bytes=1 << 24, allow_local_paths=True)


@pytest.fixture
def engine(tiny_model):
    return Engine(str(tiny_model), device="cpu", max_resident_adapters=2)


def render(engine, loras=(), prompt=PROMPT, seed=5) -> np.ndarray:
    job = GenerationJob(prompt=prompt, num_inference_steps=STEPS, seed=seed, width=64, height=64, loras=list(loras))
    return np.asarray(engine.generate(job).images[0], dtype=np.int16)


def plain_diffusers(model_dir, prompt, embeddings: dict | None = None, seed=5) -> np.ndarray:
    """The base pipeline, with the trainer's <s0><s1> embeddings loaded the documented way when given."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if embeddings is not None:
        for index, (encoder, tokenizer) in enumerate(((pipe.text_encoder, pipe.tokenizer),
                                                      (pipe.text_encoder_2, pipe.tokenizer_2))):
            rows = embeddings[f"text_encoders_{index}"]
            pipe.load_textual_inversion(rows, token=[f"<s{i}>" for i in range(len(rows))],
                                        text_encoder=encoder, tokenizer=tokenizer)
    out = pipe(prompt, num_inference_steps=STEPS, width=64, height=64, guidance_scale=7.0,
               generator=torch.Generator("cpu").manual_seed(seed))
    return np.asarray(out.images[0], dtype=np.int16)


def bundle_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def make_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def test_synth_lora_writes_a_replicate_style_bundle(make_lora):
    members = bundle_members(make_lora(seed=4, fmt="replicate"))
    assert set(members) == {"lora.safetensors", "embeddings.pti", "special_params.json"}
    assert json.loads(members["special_params.json"]) == {"TOK": "<s0><s1>"}
    from safetensors.torch import load

    keys = list(load(members["lora.safetensors"]))
    assert keys and all(".processor.to_" in k and not k.startswith("unet.") for k in keys)  # cog-sdxl's layout
    assert {k: v.shape[0] for k, v in load(members["embeddings.pti"]).items()} == {"text_encoders_0": 2, "text_encoders_1": 2}


def test_every_format_of_the_same_weights_gives_the_same_image(engine, store, make_lora):
    images = {fmt: render(engine, [(store.fetch(fmt, str(make_lora(seed=4, fmt=fmt))), 0.8)], prompt="a portrait")
              for fmt in ("diffusers", "kohya", "replicate")}
    base = render(engine, prompt="a portrait")
    assert np.abs(images["diffusers"] - base).mean() > 2  # the LoRA matters, so the comparison can fail
    assert np.abs(images["kohya"] - images["diffusers"]).max() <= 1
    assert np.abs(images["replicate"] - images["diffusers"]).max() <= 1


def test_bundle_tokens_match_plain_diffusers_textual_inversion(engine, store, make_lora, tiny_model):
    bundle = store.fetch("rep", str(make_lora(seed=4, fmt="replicate")))
    from safetensors.torch import load

    embeddings = load(bundle_members(make_lora(seed=4, fmt="replicate"))["embeddings.pti"])
    # LoRA at scale 0: only the tokens act; TOK becomes <s0><s1> as Replicate's predictor does
    ours = render(engine, [(bundle, 0.0)])
    reference = plain_diffusers(tiny_model, "a photo of <s0><s1>, studio light", embeddings)
    assert np.array_equal(ours, reference)
    literal = plain_diffusers(tiny_model, PROMPT)  # TOK as plain text
    assert np.abs(ours - literal).mean() > 1  # so the tokens really changed the text embedding


def test_trigger_text_is_literal_without_the_bundle_and_after_its_eviction(engine, store, make_lora, tiny_model):
    literal = plain_diffusers(tiny_model, PROMPT)
    assert np.array_equal(render(engine), literal)
    vocab_before = [len(engine.txt2img.tokenizer), len(engine.txt2img.tokenizer_2)]
    rows_before = engine.txt2img.text_encoder.get_input_embeddings().weight.shape[0]

    bundle = store.fetch("rep", str(make_lora(seed=4, fmt="replicate")))
    with_tokens = render(engine, [(bundle, 1.0)])
    assert not np.array_equal(with_tokens, literal)
    assert np.array_equal(render(engine), literal)  # resident but not requested: TOK stays text

    others = [store.fetch(f"o{i}", str(make_lora(seed=20 + i))) for i in range(2)]
    for other in others:  # cap 2: the bundle is evicted, its tokens with it
        render(engine, [(other, 1.0)])
    assert bundle.sha256 not in {a.lora.sha256 for a in engine.adapters.resident()}
    assert [len(engine.txt2img.tokenizer), len(engine.txt2img.tokenizer_2)] == vocab_before
    assert engine.txt2img.text_encoder.get_input_embeddings().weight.shape[0] == rows_before
    assert np.array_equal(render(engine), literal)
    assert np.array_equal(render(engine, [(bundle, 1.0)]), with_tokens)  # and it comes back the same


def test_two_bundles_with_the_same_token_names_are_resident_together(engine, store, make_lora):
    a = store.fetch("a", str(make_lora(seed=4, fmt="replicate")))
    b = store.fetch("b", str(make_lora(seed=5, fmt="replicate")))
    image_a = render(engine, [(a, 0.0)])
    image_b = render(engine, [(b, 0.0)])
    assert len(engine.adapters.resident()) == 2
    assert not np.array_equal(image_a, image_b)  # each request got its own bundle's <s0><s1>
    assert np.array_equal(render(engine, [(a, 0.0)]), image_a)


def test_a_bundle_hotswapped_into_a_full_cache_brings_its_tokens(tiny_model, store, make_lora):
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=1)
    fresh = Engine(str(tiny_model), device="cpu", max_resident_adapters=1)
    a = store.fetch("a", str(make_lora(seed=4, fmt="replicate")))
    b = store.fetch("b", str(make_lora(seed=5, fmt="replicate")))
    render(engine, [(a, 1.0)])
    swapped = render(engine, [(b, 0.7)])  # UNet-only: hot-swapped into a's adapter
    assert [r.lora.sha256 for r in engine.adapters.resident()] == [b.sha256]
    assert np.abs(swapped - render(fresh, [(b, 0.7)])).max() <= 1


@pytest.mark.parametrize("case, needle", [
    ("traversal", "outside"), ("absolute", "outside"), ("symlink", "link"), ("no_lora", "no lora.safetensors"),
    ("full_unet", "full fine-tune"), ("too_many", "members"), ("bomb", "more than"), ("wide_tokens", "wide"),
    ("unknown_token", "<s5>"), ("bad_params", "JSON"), ("lora_garbage", "safetensors"),
])
def test_malicious_or_broken_bundles_are_refused_and_leave_nothing(tmp_path, engine, make_lora, case, needle):
    good = bundle_members(make_lora(seed=4, fmt="replicate"))
    members, links = dict(good), {}
    if case == "traversal":
        members["../../evil.txt"] = b"x"
    elif case == "absolute":
        members[str(tmp_path / "evil.txt")] = b"x"
    elif case == "symlink":
        links["embeddings.pti"] = "/etc/passwd"
        del members["embeddings.pti"]
    elif case == "no_lora":
        del members["lora.safetensors"]
    elif case == "full_unet":
        members = {"unet.safetensors": good["lora.safetensors"]}
    elif case == "too_many":
        members.update({f"samples/{i}.png": b"" for i in range(80)})
    elif case == "bomb":
        members["lora.safetensors"] = good["lora.safetensors"] + b"\0" * (1 << 25)
    elif case == "wide_tokens":
        members["embeddings.pti"] = save({"text_encoders_0": torch.zeros(2, 7), "text_encoders_1": torch.zeros(2, 7)})
    elif case == "unknown_token":
        members["special_params.json"] = json.dumps({"TOK": "<s5>"}).encode()
    elif case == "bad_params":
        members["special_params.json"] = b"{not json"
    elif case == "lora_garbage":
        members["lora.safetensors"] = b"\x00" * 64
    archive = make_tar(tmp_path / "bad.tar", members, links)
    if case == "bomb":  # compressed: 32 MiB of zeros in a few kB
        import gzip

        archive = tmp_path / "bad.tar.gz"
        archive.write_bytes(gzip.compress((tmp_path / "bad.tar").read_bytes()))
        assert archive.stat().st_size < 1 << 20
    vocab = [len(engine.txt2img.tokenizer), len(engine.txt2img.tokenizer_2)]
    cache = tmp_path / "cache"
    store = LoraStore(cache, max_cache_bytes=1 << 30, max_lora_bytes=1 << 24, allow_local_paths=True)

    with pytest.raises(ServiceError) as err:
        engine.generate(GenerationJob(prompt=PROMPT, num_inference_steps=1, width=64, height=64,
                                      loras=[(store.fetch("bad", str(archive)), 1.0)]))
    expected = ErrorCode.LORA_INCOMPATIBLE if case == "wide_tokens" else ErrorCode.LORA_INVALID
    assert err.value.code == expected and needle in err.value.message
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert not any((cache / ".tmp").iterdir())
    if case != "wide_tokens":  # refused by the store: nothing cached
        assert store.entries() == []
    assert engine.adapters.injected_names() == set()
    assert [len(engine.txt2img.tokenizer), len(engine.txt2img.tokenizer_2)] == vocab  # no token left behind


def test_bundles_are_cached_as_directories_and_evicted_whole(tmp_path, make_lora):
    bundle = make_lora(seed=4, fmt="replicate")
    size = sum(len(v) for v in bundle_members(bundle).values())
    store = LoraStore(tmp_path / "cache", max_cache_bytes=int(size * 1.5), max_lora_bytes=1 << 24, allow_local_paths=True)
    first = store.fetch("rep", str(bundle))
    assert first.source == "download" and first.entry.is_dir() and first.tokens.tokens == ("<s0>", "<s1>")
    assert first.size == size
    again = store.fetch("rep", str(bundle))
    assert again.source == "disk" and again.path == first.path and again.tokens == first.tokens
    store.fetch("other", str(make_lora(seed=5, fmt="replicate")))  # over the cap: the LRU bundle goes
    assert not first.entry.exists()
    assert [e.lora_id for e in store.entries()] == ["other"]


def test_a_bad_bundle_refused_at_a_full_cache_leaves_the_resident_adapter_working(tmp_path, tiny_model, store, make_lora):
    engine = Engine(str(tiny_model), device="cpu", max_resident_adapters=1)
    good = store.fetch("good", str(make_lora(seed=4, fmt="replicate")))
    image = render(engine, [(good, 1.0)])
    members = bundle_members(make_lora(seed=5, fmt="replicate"))
    members["embeddings.pti"] = save({"text_encoders_0": torch.zeros(2, 7), "text_encoders_1": torch.zeros(2, 7)})
    bad = store.fetch("bad", str(make_tar(tmp_path / "bad.tar", members)))
    with pytest.raises(ServiceError) as err:
        render(engine, [(bad, 1.0)])
    assert err.value.code == ErrorCode.LORA_INCOMPATIBLE
    assert engine.adapters.injected_names() == {a.name for a in engine.adapters.resident()}
    assert np.array_equal(render(engine, [(good, 1.0)]), image)
