"""Corpus makers: data with ground truth for the demo, the tests and the reproduction (not the pipeline).

synthetic.py   seed -> coloured-shape scenes and rendered words, per stage, with answers
importers.py   Debian's Fashion-MNIST (and emoji) -> the same corpora with real images
"""
