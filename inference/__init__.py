"""The inference core: pipeline, LoRA store, adapter cache, generation.

Kept free of heavy imports at package level so that light modules (settings, errors) can be
imported by the client and the API schema without pulling in torch.
"""
