"""The data sets themselves, apart from the Lightning data modules that serve them: the on-disk formats (reading,
decoding, layout checks) of PASCAL-Context, NYU-v2 and CIFAR-100, and the generated synthetic data. Each module
holds a ``torch.utils.data.Dataset`` and the functions it needs; ``files`` holds what the on-disk ones share."""
