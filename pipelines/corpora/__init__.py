"""Corpus makers: data with ground truth for the demo, the tests and the reproduction (not the pipeline).

corpus.py          what a source draws (samples, turns, held-out phrasing) -> a corpus per stage
synthetic.py       seed -> coloured-shape scenes and rendered words, per stage, with answers
labelled.py        a labelled image -> captions and questions over its label
fashion_mnist.py   Debian's Fashion-MNIST -> the same corpora with real photos
emoji.py           Debian's colour emoji font -> the same corpora with drawn emoji
"""
