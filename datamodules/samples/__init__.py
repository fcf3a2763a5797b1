"""Tiny data sets written in the real on-disk formats of PASCAL-Context (``PASCAL_MT``), NYU-v2 (``NYUD_MT``)
and CIFAR-100 (the python pickles), with content chosen so that decoding and augmentation can be checked exactly:
for the loaders' tests, the benchmarks' paper-size networks and trying a pipeline without the real data."""
