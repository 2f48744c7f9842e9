"""The pretraining recipe (installed as ``lowrank_recipes.recipes``): the run config (``config``, a leaf module), the
LLaMA (``model``), the learning-rate schedule (``schedule``), the LightningModule (``module``), the Trainer and its
callbacks (``trainer``), the data pipeline (``data``) and the entry point (``pretrain``, also the ``lowrank-pretrain``
console script)."""
