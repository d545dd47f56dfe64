"""A Replicate bundle's pivotal-tuning tokens, loaded with its adapter and unloaded with it.

The embeddings go into both text encoders under tokens unique to the LoRA: every Replicate LoRA
calls its tokens <s0><s1>, so two resident bundles would otherwise collide. The prompt is rewritten
as Replicate's predictor does (each special_params.json text, e.g. TOK -> <s0><s1>, then the
trainer's <sN> names -> the tokens loaded for this LoRA).
"""

from __future__ import annotations

import re

from inference.errors import ErrorCode, ServiceError
from inference.lora_file import LoraFile

TRAINER_TOKEN = re.compile(r"<s\d+>")


def _encoders(pipe):
    return ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2))


def load_tokens(pipe, lora: LoraFile, rows: list | None) -> dict[str, str]:
    """Load a bundle's embeddings (`rows`, read by `inference.prepared`) into both text encoders;
    return trainer token -> loaded token.

    All or nothing: embeddings of the wrong width are refused before anything is loaded, and a
    failure half-way unloads what was loaded.
    """
    if lora.tokens is None:
        return {}
    names = {token: f"<{lora.sha256[:12]}_{token[1:-1]}>" for token in lora.tokens.tokens}
    for (encoder, _), row in zip(_encoders(pipe), rows):
        width = encoder.get_input_embeddings().embedding_dim
        if row.shape[1] != width:
            raise ServiceError(ErrorCode.LORA_INCOMPATIBLE,
                               f"the bundle's token embeddings are {row.shape[1]} wide; this text encoder takes {width}")
    loaded = []
    try:
        for (encoder, tokenizer), row in zip(_encoders(pipe), rows):
            pipe.load_textual_inversion(row, token=list(names.values()), text_encoder=encoder, tokenizer=tokenizer)
            loaded.append((encoder, tokenizer))
    except Exception as exc:
        for encoder, tokenizer in loaded:
            pipe.unload_textual_inversion(list(names.values()), tokenizer=tokenizer, text_encoder=encoder)
        raise ServiceError(ErrorCode.LORA_INVALID, f"the bundle's token embeddings could not be loaded: {exc}") from exc
    return names


def unload_tokens(pipe, tokens: dict[str, str]) -> None:
    for encoder, tokenizer in _encoders(pipe):
        present = [t for t in tokens.values() if t in tokenizer.get_vocab()]
        if present:
            pipe.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)


def rewrite_prompt(prompt: str, lora: LoraFile, tokens: dict[str, str]) -> str:
    """`prompt` with the bundle's trigger texts and trainer tokens replaced by its loaded tokens."""
    if not tokens or lora.tokens is None:
        return prompt
    for text, trainer_tokens in lora.tokens.substitutions:
        prompt = prompt.replace(text, trainer_tokens)
    return TRAINER_TOKEN.sub(lambda m: tokens.get(m.group(0), m.group(0)), prompt)
