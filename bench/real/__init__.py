"""Pareto Merging on real pretrained weights and real tasks, offline on CPU (``python -m bench.real``).

Text pool: all-MiniLM-L6-v2 fine-tuned on 4 tasks (fortune topic, language ID, WordNet noun and verb
supersenses); vision pool: EfficientNet-Lite0 (ImageNet) fine-tuned on Fashion-MNIST, digits and textures.
Install the data and weights with ``bench/real/setup.sh``. See ``run.py`` for the stages and caching.
"""
