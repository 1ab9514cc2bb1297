"""Adapters that embed Pareto Merging in the merging codebases people already run.

* ``paretomerge.integrations.fusion_bench``: ``ParetoMergingAlgorithm``, a FusionBench method
  (``pip install 'pmkernels[fusionbench]'``), ``ParetoMergingCLIPAlgorithm`` (AdaMerging + PM on a CLIP pool),
  and Hydra configs shipped in ``paretomerge/integrations/fusion_bench_config``
  (``hydra.searchpath=[pkg://paretomerge.integrations.fusion_bench_config]``; the paper's CLIP ViT-B/32 × 8
  tasks recipe ``pareto_merging_clip_vit_b32_ta8`` through ``--config-dir``: docs/integrations.md).
* ``paretomerge.integrations.mergekit``: the MergeKit merge method ``pareto_merging``
  (``pip install 'pmkernels[mergekit]'``) and the ``paretomerge-mergekit`` console script.
* ``paretomerge.integrations.factors``: the Pareto factors file both read and write (no third-party imports).

Nothing here is imported by ``import paretomerge``: the adapters import their host library on use and
raise an ``ImportError`` naming the extra to install when it is missing.
"""
