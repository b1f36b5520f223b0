"""Data for training and evaluation (docs/official-implementation.md §3 "Data").

Modules: `synth` (the synthetic shapes world), `captions` (its caption templates), `sources`
(pair file formats), `superpixels` (Felzenszwalb cache and patch labels), `transforms`
(RandomResizedCrop + CLIP normalisation) and `pairs` (the torch dataset and epoch sampler).
Kept import-free so that `segclip-data synth` does not load torch.
"""
