"""The tools around the service: the `sdxl-lora` command line, the demo, the quality check
(`compare`), loopback servers for the demo, tests and benchmarks, and the benchmarks themselves.

Outside the core on purpose: `inference`, `api` and `handler` never import this package.
"""
