"""Hydra configs for FusionBench: ``hydra.searchpath=[pkg://paretomerge.integrations.fusion_bench_config]``."""
