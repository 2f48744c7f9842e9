"""Data pipeline of the pretraining recipe: config, corpus, tokenizer, sources, packing, sampler, stream, loader,
datamodule.

Import the modules themselves (``from recipes.data.datamodule import PretrainDataModule``): this package file imports
nothing, so that ``lowrank_recipes.recipes.data.config`` loads without ``datasets``, ``lightning`` or ``torchdata``.
"""
