"""Library output we understand and do not want in a service log (or between the demo's lines).

Each entry names what it drops and why it is safe; anything else the libraries say still shows.
`quiet_libraries()` is idempotent; the core's entry points (Engine, the synthetic writers, the
identity scorer) call it before they import diffusers or transformers models.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cache

# (logger name, message fragment, why it is noise)
DROPPED_MESSAGES = (
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to",
     "importing diffusers' SDXL pipeline touches CLIPImageProcessor/SiglipImageProcessor; without "
     "torchvision transformers 5 uses their PIL versions, which is what we want on a CPU install"),
    ("transformers.modeling_utils", "The new embeddings will be initialized from a multivariate normal",
     "load_textual_inversion resizes the token embeddings and overwrites the new rows with the "
     "bundle's own vectors at once: how the placeholder rows were initialised never matters"),
    ("diffusers.models.modeling_utils", "kept in float32: []",
     "diffusers 0.42 lists the modules it keeps in float32 on every .to(dtype=...), even when there are none"),
)


class _Drop(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@cache
def _drop_messages() -> None:
    for name, fragment, _why in DROPPED_MESSAGES:
        logging.getLogger(name).addFilter(_Drop(fragment))


@cache
def quiet_libraries(diffusers: bool = True) -> None:
    """Drop the messages above and the libraries' progress bars (a service log is no terminal).
    `diffusers=False` for callers that must not import diffusers (the identity scorer)."""
    from transformers.utils import logging as transformers_logging

    _drop_messages()
    transformers_logging.disable_progress_bar()
    if diffusers:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()


@contextmanager
def transformers_errors_only():
    """transformers 5 logs a "LOAD REPORT" calling every LoRA key of a text encoder MISSING while
    diffusers loads them (they are loaded: the hand-merged reference tests check it)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
